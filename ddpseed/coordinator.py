"""Bring up ``torch.distributed`` and make every rank agree on one base seed.

Agreement gathers a fixed-size int64 record from every rank to rank 0, then broadcasts the
table: one collective round more than a bare broadcast of rank 0's seed. Each rank contributes
its own explicit seed (or the error it hit validating it), so every rank sees every other rank's
input and reaches the same verdict. A rank with a bad value therefore fails *with* its peers
instead of leaving them blocked in a collective until a watchdog fires. (gloo's all_gather and
all_reduce would do it in one call, but as rings of ``world_size - 1`` sequential hops they
measured 2-6x slower than gather + broadcast at 4-32 ranks.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import IntEnum
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import Backend, PrefixStore  # type: ignore[attr-defined]
from torch.distributed import distributed_c10d as c10d
from torch.distributed.rendezvous import rendezvous

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

_MAGIC = 0xDD5EED01
_HEADER = 10
_TEXT_BYTES = 256
_WIDTH = _HEADER + _TEXT_BYTES // 8
# Record field 1: what the rank brings.
_NO_SEED, _SEED, _ERROR = 0, 1, 2
# Record field 8: the rank's run directory (bits); field 9: a hash of its path.
_HAS_DIR, _EXPLICIT_DIR = 1, 2
_generation = 0
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
    """What one rank brings to the agreement."""

    source: Source = Source.NONE
    seed: int | None = None
    error: str | None = None  # this rank's validation error, shown on every rank
    fallback: int | None = (
        None  # rank 0 only: the record or fresh entropy used if nobody is explicit
    )
    fallback_source: Source = Source.NONE
    run_dir: str | None = None  # where this rank would keep the run record
    explicit_dir: bool = False  # run_dir= or DDPSEED_RUN_DIR, not derived from a job id


@dataclass(frozen=True)
class Agreement:
    base_seed: int
    source: Source
    # Only rank 0 touches the run record, so its run directory decides for every rank whether
    # the record step (a collective) happens; ranks given another directory are listed.
    record: bool = False
    other_run_dir: tuple[int, ...] = ()


def _path_hash(path: str | None) -> int:
    """A stable signed 64-bit hash of a path (0 for none).

    >>> _path_hash(None), _path_hash("/runs/a") == _path_hash("/runs/a")
    (0, True)
    """
    if path is None:
        return 0
    return int.from_bytes(
        hashlib.blake2b(path.encode(), digest_size=8).digest(), "big", signed=True
    )


def _encode(p: Proposal, world_size: int) -> torch.Tensor:
    text = (p.error or "").encode()[:_TEXT_BYTES]
    header = [
        _MAGIC,
        _ERROR if p.error else (_SEED if p.seed is not None else _NO_SEED),
        int(p.source),
        p.seed if p.seed is not None else -1,
        p.fallback if p.fallback is not None else -1,
        int(p.fallback_source),
        world_size,
        len(text),
        (_HAS_DIR if p.run_dir is not None else 0) | (_EXPLICIT_DIR if p.explicit_dir else 0),
        _path_hash(p.run_dir),
    ]
    packed = np.frombuffer(text.ljust(_TEXT_BYTES, b"\0"), dtype=np.int64)
    return torch.from_numpy(np.concatenate([np.array(header, dtype=np.int64), packed]))


def _decode_text(row: Sequence[int]) -> str:
    raw = np.array(row[_HEADER:], dtype=np.int64).tobytes()
    return raw[: int(row[7])].decode(errors="replace")


def ranks_text(ranks: Sequence[int]) -> str:
    """Compact rank list: ``ranks_text([0, 1, 2, 5])`` is ``'0-2,5'``."""
    parts: list[str] = []
    items = sorted(ranks)
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)


def decide(table: torch.Tensor, world_size: int) -> Agreement:
    """The verdict every rank reaches from the gathered records (pure; raises on conflict)."""
    rows: list[list[int]] = table.tolist()  # one conversion; per-element tensor access is slow
    odd = [r for r, row in enumerate(rows) if row[0] != _MAGIC]
    if odd:
        raise CoordinationError(
            f"ranks {ranks_text(odd)} sent something other than a ddpseed seed record: another "
            "collective is running concurrently on the default group; call ddpseed.setup at "
            "the same point of the script on every rank"
        )
    sizes = {row[6] for row in rows}
    if sizes != {world_size}:
        raise TopologyError(
            f"ranks disagree on the world size ({sorted(sizes)}); every rank must come from "
            "the same launch"
        )
    errors = [(r, _decode_text(row)) for r, row in enumerate(rows) if row[1] == _ERROR]
    if errors:
        lines = "\n".join(f"  {rank_line(r, msg)}" for r, msg in errors)
        raise SeedValueError(
            f"invalid seed on {len(errors)} of {world_size} ranks; no rank was seeded:\n{lines}"
        )
    explicit: dict[tuple[int, Source], list[int]] = {}
    missing: list[int] = []
    for r, row in enumerate(rows):
        if row[1] == _SEED:
            explicit.setdefault((row[3], Source(row[2])), []).append(r)
        else:
            missing.append(r)
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
    if explicit:
        (seed, src), _ = next(iter(explicit.items()))
    else:
        seed, src = rows[0][4], Source(rows[0][5])
        if seed < 0:
            raise CoordinationError("rank 0 sent no seed; this is a ddpseed bug, please report it")
    # An explicit directory always gets the record and manifest; a job-id one only when the
    # seed needs remembering (drawn from entropy, or already taken from a record).
    flags = rows[0][8]
    record = bool(flags & _HAS_DIR) and (
        bool(flags & _EXPLICIT_DIR) or src in (Source.ENTROPY, Source.RECORD)
    )
    other = tuple(r for r, row in enumerate(rows) if row[9] != rows[0][9])
    return Agreement(seed, src, record, other)


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # diagnostics only: a private API may move between torch releases
        return None


def _absent_ranks(key: str, topo: Topology, timeout: float) -> list[int] | None:
    """After a failed agreement: the ranks that never reached it, or None if unknown.

    Only the failure path touches the store, so a healthy setup costs no extra round trip.
    Rank 0 (which hosts the store) waits a short grace for the live ranks' marks, publishes
    one verdict, and stays until they have read it, so every rank names the same ranks.
    """
    store = _default_store()
    if store is None or topo.world_size > 4096:
        return None
    grace = timedelta(seconds=min(5.0, max(1.0, timeout / 4)))
    marks = [f"{key}/{r}" for r in range(topo.world_size)]
    verdict = f"{key}/verdict"
    try:
        store.set(marks[topo.rank], "1")
        if topo.rank == 0:
            with contextlib.suppress(Exception):  # timing out here is the expected outcome
                store.wait(marks, grace)
            absent = [r for r, k in enumerate(marks) if not store.check([k])]
            store.set(verdict, ",".join(map(str, absent)))
            acks = [f"{key}/ack/{r}" for r in range(1, topo.world_size) if r not in absent]
            with contextlib.suppress(Exception):
                store.wait(acks, grace)
            return absent
        store.wait([verdict], grace * 3)
        text = store.get(verdict).decode()
        store.set(f"{key}/ack/{topo.rank}", "1")
        return [int(r) for r in text.split(",") if r]
    except Exception:  # the store lives on rank 0's host; it may be the thing that died
        return None


def _gather(row: torch.Tensor, world_size: int, timeout: float) -> torch.Tensor:
    """All ranks' ``row``, stacked on the CPU; bounded by ``timeout`` whatever the group's own."""
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    table = torch.empty((world_size, row.numel()), dtype=row.dtype, device=device)
    slots = [table[r] for r in range(world_size)] if dist.get_rank() == 0 else None
    _wait(dist.gather(row.to(device), slots, dst=0, async_op=True), timeout)
    _wait(dist.broadcast(table, src=0, async_op=True), timeout)
    return table.cpu()


def _wait(work: Any, timeout: float) -> None:
    assert work is not None
    work.wait(timeout=timedelta(seconds=timeout))


def agree(proposal: Proposal, topo: Topology, timeout: float) -> Agreement:
    """Gather every rank's proposal and return the common verdict (raises on every rank)."""
    if not topo.is_distributed:
        return decide(_encode(proposal, 1).unsqueeze(0), 1)
    global _generation
    _generation += 1
    key = f"ddpseed/agree/{_generation}"
    try:
        rows = _gather(_encode(proposal, topo.world_size), topo.world_size, timeout)
    except Exception as exc:
        absent = _absent_ranks(key, topo, timeout)
        who = (
            f"rank{'s' if len(absent) > 1 else ''} {ranks_text(absent)} never reached it"
            if absent
            else "a peer failed or disconnected during it"
        )
        raise CoordinationError(
            f"rank {topo.rank} on {socket.gethostname()}: seed agreement over "
            f"{topo.world_size} ranks did not complete within {timeout:g}s: {who}. "
            f"Look for the first error in those ranks' logs; a rank that crashed or was "
            f"killed before ddpseed.setup stops the whole job. ({type(exc).__name__}: "
            f"{first_line(exc)})" + loopback_hint(topo)
        ) from exc
    return decide(rows, topo.world_size)


def rank_line(rank: int, message: str) -> str:
    """``"rank r: message"``, keeping the prefix once if the message already starts with it.

    >>> rank_line(1, "disk full"), rank_line(1, "rank 1: disk full")
    ('rank 1: disk full', 'rank 1: disk full')
    """
    prefix = f"rank {rank}: "
    return message if message.startswith(prefix) else prefix + message


def share_errors(error: str | None, topo: Topology, timeout: float, what: str) -> list[str]:
    """Every rank's error from a per-rank step (``None`` for success), seen on every rank.

    Returns ``["rank r: message", ...]`` for the ranks that failed; empty when all succeeded.
    """
    if not topo.is_distributed or not dist.is_initialized():
        return [rank_line(topo.rank, error)] if error else []
    try:
        rows = _gather(_encode(Proposal(error=error), topo.world_size), topo.world_size, timeout)
    except Exception as exc:
        raise CoordinationError(
            f"rank {topo.rank}: ranks did not all report on {what} within {timeout:g}s "
            f"({type(exc).__name__}); look for the first error in the other ranks' logs"
        ) from exc
    table: list[list[int]] = rows.tolist()
    return [rank_line(r, _decode_text(row)) for r, row in enumerate(table) if row[1] == _ERROR]


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
    return True


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
