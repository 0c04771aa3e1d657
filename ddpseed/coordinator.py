"""Bring up ``torch.distributed`` and make every rank agree on one base seed.

Every rank sends one :class:`Proposal` (its explicit seed or the error it hit validating it,
its scheme, deterministic flag and run directory); :func:`decide` is the pure verdict every
rank reaches from the same table of records, so a rank with a bad value fails *with* its peers
instead of leaving them blocked in a collective until a watchdog fires. The records travel in
one :func:`ddpseed.collective.exchange` (a gather to rank 0 and a broadcast of the table).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import socket
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum

import torch
import torch.distributed as dist
from torch.distributed import Backend, PrefixStore  # type: ignore[attr-defined]
from torch.distributed import distributed_c10d as c10d
from torch.distributed.rendezvous import rendezvous

from . import collective
from .collective import call_id, exchange, ranks_text, strip_rank
from .derivation import SCHEMES
from .errors import (
    ArgumentError,
    CoordinationError,
    SeedMismatchError,
    SeedValueError,
    TopologyError,
    first_line,
)
from .topology import Topology

log = logging.getLogger(__name__)
# Backends whose group timeout torch can change after creation (c10d._set_pg_timeout).
_SETTABLE = ("gloo", "nccl")


class Source(IntEnum):
    NONE = 0
    ARGUMENT = 1
    ENVIRONMENT = 2
    RECORD = 3
    ENTROPY = 4

    @property
    def label(self) -> str:
        return {
            Source.NONE: "none",
            Source.ARGUMENT: "argument",
            Source.ENVIRONMENT: "DDPSEED_SEED",
            Source.RECORD: "run record",
            Source.ENTROPY: "entropy",
        }[self]


@dataclass(frozen=True)
class Proposal:
    """What one rank brings to the agreement; every field travels as one int64 (None as -1)."""

    source: Source = Source.NONE
    seed: int | None = None
    fallback: int | None = None  # rank 0 only: the record or fresh entropy if nobody is explicit
    fallback_source: Source = Source.NONE
    world_size: int = 1
    run_dir: int = 0  # path_id of this rank's run directory, 0 for none
    explicit_dir: bool = False  # run_dir= or DDPSEED_RUN_DIR, not derived from a job id
    scheme: int = 0  # index into derivation.SCHEMES
    deterministic: bool = False
    mesh: int = 0  # MeshSpec.agreement_id() of this rank's mesh settings, 0 for no mesh
    mesh_error: bool = False  # the error is about the mesh settings, not the seed
    error: str | None = None  # this rank's validation error, shown on every rank

    def values(self) -> tuple[int, ...]:
        return tuple(
            -1 if (v := getattr(self, f.name)) is None else int(v)
            for f in dataclasses.fields(self)
            if f.name != "error"
        )

    @classmethod
    def from_values(cls, values: Sequence[int], error: str | None = None) -> Proposal:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "error"]
        raw = dict(zip(names, values, strict=True))
        return cls(
            source=Source(raw["source"]),
            seed=None if raw["seed"] < 0 else raw["seed"],
            fallback=None if raw["fallback"] < 0 else raw["fallback"],
            fallback_source=Source(raw["fallback_source"]),
            world_size=raw["world_size"],
            run_dir=raw["run_dir"],
            explicit_dir=bool(raw["explicit_dir"]),
            scheme=raw["scheme"],
            deterministic=bool(raw["deterministic"]),
            mesh=raw["mesh"],
            mesh_error=bool(raw["mesh_error"]),
            error=error,
        )


@dataclass(frozen=True)
class Agreement:
    base_seed: int
    source: Source
    # Only rank 0 touches the run record, so its run directory decides for every rank whether
    # the record step (a collective) happens; ranks given another directory are listed.
    record: bool = False
    other_run_dir: tuple[int, ...] = ()
    # Ranks sent different mesh settings: setup() then shows every rank's and stops them all.
    mesh_differs: bool = False


def path_id(path: str | None) -> int:
    """A stable nonzero 64-bit id of a path (0 for none).

    >>> path_id(None), path_id("/runs/a") == path_id("/runs/a") != 0
    (0, True)
    """
    return 0 if path is None else (call_id(path) or 1)


def _groups(values: Sequence[object]) -> str:
    by_value: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        by_value.setdefault(repr(value), []).append(rank)
    return "; ".join(f"{v} on ranks {ranks_text(rs)}" for v, rs in by_value.items())


def decide(records: Sequence[Proposal]) -> Agreement:
    """The verdict every rank reaches from the same records (pure; raises on conflict).

    >>> decide([Proposal(Source.ARGUMENT, 7, world_size=2)] * 2).base_seed
    7
    """
    world_size = len(records)
    if {r.world_size for r in records} != {world_size}:
        raise TopologyError(
            f"ranks disagree on the world size ({_groups([r.world_size for r in records])}); "
            "every rank must come from the same launch"
        )
    errors = [(rank, r.error) for rank, r in enumerate(records) if r.error]
    if errors:
        lines = "\n".join(f"  rank {rank}: {strip_rank(msg, rank)}" for rank, msg in errors)
        if all(records[rank].mesh_error for rank, _ in errors):
            raise ArgumentError(
                f"invalid mesh settings on {len(errors)} of {world_size} ranks; no rank was "
                f"seeded:\n{lines}"
            )
        raise SeedValueError(
            f"invalid seed on {len(errors)} of {world_size} ranks; no rank was seeded:\n{lines}"
        )
    for what, fix in (
        ("scheme", "pass the same scheme= to setup() on every rank"),
        ("deterministic", "pass the same deterministic= (or DDPSEED_DETERMINISTIC) everywhere"),
    ):
        seen = [getattr(r, what) for r in records]
        if len(set(seen)) > 1:
            shown = [SCHEMES[s] for s in seen] if what == "scheme" else seen
            raise SeedMismatchError(
                f"ranks were given different {what} settings: {_groups(shown)}; {fix}"
            )
    explicit: dict[tuple[int, Source], list[int]] = {}
    missing: list[int] = []
    for rank, r in enumerate(records):
        if r.seed is not None:
            explicit.setdefault((r.seed, r.source), []).append(rank)
        else:
            missing.append(rank)
    if explicit and (missing or len({seed for seed, _ in explicit}) > 1):
        groups = [
            f"  seed {seed} (from {src.label}) on ranks {ranks_text(rs)}"
            for (seed, src), rs in sorted(explicit.items(), key=lambda kv: kv[1][0])
        ]
        if missing:
            groups.append(f"  no seed on ranks {ranks_text(missing)}")
        raise SeedMismatchError(
            "ranks were given different seeds; ddpseed will not pick one silently:\n"
            + "\n".join(groups)
            + "\nfix: pass the same seed= on every rank, or set DDPSEED_SEED identically on "
            "every node (or unset it everywhere to draw one on rank 0)"
        )
    first = records[0]
    if explicit:
        (seed, src), _ = next(iter(explicit.items()))
    elif first.fallback is not None:
        seed, src = first.fallback, first.fallback_source
    else:
        raise CoordinationError("rank 0 sent no seed; this is a ddpseed bug, please report it")
    # An explicit directory always gets the record and manifest; a job-id one only when the
    # seed needs remembering (drawn from entropy, or already taken from a record).
    record = bool(first.run_dir) and (first.explicit_dir or src in (Source.ENTROPY, Source.RECORD))
    other = tuple(rank for rank, r in enumerate(records) if r.run_dir != first.run_dir)
    return Agreement(seed, src, record, other, len({r.mesh for r in records}) > 1)


def agree(proposal: Proposal, topo: Topology, timeout: float) -> Agreement:
    """Exchange every rank's record and return the common verdict (raises on every rank)."""
    hint = (
        "A rank that crashed or was killed before ddpseed.setup stops the whole job."
        + loopback_hint(topo)
    )
    reports = exchange(
        "seed agreement (ddpseed.setup)",
        proposal.values(),
        proposal.error,
        topo,
        timeout,
        hint=hint,
    )
    return decide(
        [
            Proposal.from_values(values, reports.messages.get(rank))
            for rank, values in enumerate(reports.values)
        ]
    )


def share_errors(error: str | None, topo: Topology, timeout: float, what: str) -> list[str]:
    """Every rank's error from a per-rank step (``None`` for success), seen on every rank.

    Returns ``["rank r: message", ...]`` for the ranks that failed; empty when all succeeded.
    """
    return exchange(what, (), error, topo, timeout).lines()


def ensure_process_group(
    topo: Topology, backend: str | None, timeout: float, *, pg_timeout: float | None = None
) -> bool:
    """Initialise the default group from ``topo`` unless one exists; True if we created it.

    ``timeout`` bounds the creation. The group then keeps ``pg_timeout`` seconds for its own
    collectives: torch's default for the backend when None (an existing group is left as is).
    """
    if not topo.is_distributed:
        return False
    if dist.is_initialized():
        if dist.get_world_size() != topo.world_size or dist.get_rank() != topo.rank:
            raise TopologyError(
                f"the existing process group has rank {dist.get_rank()}/"
                f"{dist.get_world_size()} but the {topo.launcher} environment says rank "
                f"{topo.rank}/{topo.world_size}; initialise both from the same launcher"
            )
        if pg_timeout is not None:
            _set_group_timeout(pg_timeout, topo)
        return False
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    hint = loopback_hint(topo)
    if hint:
        log.warning(hint.strip())
    # torchrun's agent keeps one TCPStore across restart attempts, while init_process_group's
    # keys are the same every attempt: a restarted rank could read the gloo address of a rank
    # that died. Namespacing the store by attempt keeps each attempt's keys apart.
    url = (
        "env://"
        if topo.launcher == "torchrun"
        else f"tcp://{_bracket(topo.master_addr)}:{topo.master_port}"
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    log.info(
        "rank %d: init_process_group(%s, %s, world %d, attempt %s)",
        topo.rank,
        chosen,
        url,
        topo.world_size,
        attempt,
    )
    kwargs = {}
    if chosen == "nccl":
        kwargs["device_id"] = torch.device("cuda", topo.local_rank)
    # Created under the setup timeout, so a rank lost between the rendezvous and its gloo/NCCL
    # connection fails every rank within it, and only then given its lasting timeout. Where
    # torch cannot change a group's timeout, the group is made with the lasting one instead.
    default = getattr(c10d, "_get_default_timeout", None)  # private: may move
    lasting: timedelta | None = (
        timedelta(seconds=pg_timeout)
        if pg_timeout is not None
        else (default(Backend(chosen)) if default is not None else None)
    )
    settable = lasting is not None and hasattr(c10d, "_set_pg_timeout") and chosen in _SETTABLE
    deadline = time.monotonic() + timeout
    try:
        if topo.rank != 0:
            _wait_for_listener(topo.master_addr, topo.master_port, deadline)
        remaining = max(1.0, deadline - time.monotonic())
        store, _, _ = next(
            rendezvous(url, topo.rank, topo.world_size, timeout=timedelta(seconds=remaining))
        )
        dist.init_process_group(
            backend=chosen,
            store=PrefixStore(f"ddpseed/attempt_{attempt}", store),
            rank=topo.rank,
            world_size=topo.world_size,
            timeout=timedelta(seconds=timeout) if settable else lasting,
            **kwargs,  # type: ignore[arg-type]
        )
    except Exception as exc:
        role = "listen" if topo.rank == 0 else "reach rank 0"
        raise CoordinationError(
            f"rank {topo.rank} on {socket.gethostname()}: could not {role} at "
            f"{topo.master_addr}:{topo.master_port} and gather {topo.world_size} ranks within "
            f"{timeout:g}s ({type(exc).__name__}: {first_line(exc)})."
            " Check that every rank has the same MASTER_ADDR/MASTER_PORT and WORLD_SIZE, that "
            "rank 0 is running, and that the port is free and reachable." + hint
        ) from exc
    if settable and lasting is not None:
        _set_group_timeout(lasting.total_seconds(), topo)
    atexit.register(_destroy_at_exit, weakref.ref(c10d._get_default_group()), os.getpid())
    return True


def _destroy_at_exit(made: weakref.ref[dist.ProcessGroup], pid: int) -> None:
    """Destroy the default group at interpreter exit if it is still the one ddpseed made.

    Why: gloo's worker thread drops its last reference to a finished collective (and so to the
    tensors it used) only after ``wait()`` has returned. If the script exits in that window
    (a loaded machine makes it wide), the thread's decref of a tensor that has a Python object
    needs the GIL while the interpreter is finalizing; Python ends that thread with a forced
    unwind through a noexcept destructor and the rank dies with "terminate called without an
    active exception" (SIGABRT). Destroying the group from atexit, while the interpreter is
    still whole, joins those threads first (unless something else, e.g. a DDP model, still
    holds the group: torch then keeps it to the end, and collective._await_release covers
    ddpseed's own collectives). A group the script made, or already destroyed, is
    left alone; so is a forked child's copy, and a group with a collective ddpseed gave up on
    (joining would wait for it up to the group's own timeout).
    """
    if os.getpid() != pid or not dist.is_initialized():
        return
    if c10d._get_default_group() is not made():
        return
    if collective.left_pending:
        log.info("not destroying the process group at exit: a collective may still be running")
        return
    try:
        dist.destroy_process_group()
    except Exception as exc:  # exiting anyway; the group goes with the process
        log.warning("destroying the process group at exit failed: %s", first_line(exc))


def _set_group_timeout(seconds: float, topo: Topology) -> None:
    """Give the default group ``seconds`` as its collectives' timeout (a private torch API)."""
    setter = getattr(c10d, "_set_pg_timeout", None)
    backend = dist.get_backend()
    if setter is None or backend not in _SETTABLE:
        raise ArgumentError(
            f"rank {topo.rank}: torch {torch.__version__} cannot change the timeout of an "
            f"existing {backend} group, so pg_timeout={seconds:g} cannot apply to the group the "
            "script made; pass timeout= to your own init_process_group instead, or drop "
            "pg_timeout"
        )
    setter(timedelta(seconds=seconds))
    log.info("rank %d: process group timeout %gs", topo.rank, seconds)


def _wait_for_listener(addr: str, port: int, deadline: float) -> None:
    """Return once something accepts connections at addr:port; raise at the deadline.

    torch's store client can take several times its timeout to give up on a port where nobody
    listens (seen under CPU load); probing first keeps the whole rendezvous inside the deadline.
    """
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"nothing accepted connections at {addr}:{port}")
        try:
            socket.create_connection((addr, port), timeout=min(1.0, left)).close()
            return
        except OSError:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))  # retry interval


def _bracket(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


def loopback_hint(topo: Topology) -> str:
    """A hint when gloo would advertise a loopback address to peers on other hosts."""
    if topo.num_nodes <= 1 or os.environ.get("GLOO_SOCKET_IFNAME"):
        return ""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""
    if not addr.startswith("127."):
        return ""
    return (
        f" Hint: this job spans {topo.num_nodes} nodes but hostname {socket.gethostname()!r} "
        f"resolves to loopback {addr}, so gloo tells peers to connect to 127.x; set "
        "GLOO_SOCKET_IFNAME to the interface that reaches the other nodes (e.g. "
        "GLOO_SOCKET_IFNAME=eth0) or fix /etc/hosts."
    )
