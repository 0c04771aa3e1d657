"""Bring up ``torch.distributed`` for ddpseed: within the setup timeout, with a readable error.

The group is created (or an existing one checked against the launcher's topology) before the
seed agreement; ddpseed also destroys the group it made at exit, unless a collective may still
be running.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
import weakref
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import Backend, PrefixStore  # type: ignore[attr-defined]
from torch.distributed import distributed_c10d as c10d
from torch.distributed.rendezvous import rendezvous

from . import collective
from .collective import strip_rank
from .errors import ArgumentError, CoordinationError, TopologyError, first_line
from .topology import Topology

log = logging.getLogger(__name__)
# Backends whose group timeout torch can change after creation (c10d._set_pg_timeout).
_SETTABLE = ("gloo", "nccl")
VERDICT_GRACE = 10.0  # seconds rank 0 keeps a refusing start-up check's store for the others


def from_existing_group(topo: Topology) -> Topology:
    """``topo``, or the job of a process group the script made where no launcher variables
    describe one: the DDP tutorial's ``mp.spawn`` + ``init_process_group(rank=, world_size=)``
    with only ``MASTER_ADDR``/``MASTER_PORT`` set. Read as one process, every rank would take
    the same seeds and the whole dataset. The local rank (the GPU) is the device the script
    made current where it started CUDA (``torch.cuda.set_device``: a multi-node spawn of 2
    processes on 8-GPU nodes uses cuda:0 and cuda:1 on each), else the rank modulo the node's
    GPUs, as the tutorial places them; node counts are estimates for reports."""
    if topo.launcher != "single" or not dist.is_available() or not dist.is_initialized():
        return topo
    world = dist.get_world_size()
    if world == 1:
        return topo
    rank, per_node = dist.get_rank(), min(world, torch.cuda.device_count() or world)
    local = rank % per_node
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        local = torch.cuda.current_device()
        per_node = max(per_node, local + 1)
    log.info("rank %d of %d from the process group the script made", rank, world)
    return dataclasses.replace(
        topo,
        launcher="group",
        rank=rank,
        local_rank=local,
        world_size=world,
        local_world_size=per_node,
        node_rank=rank // per_node,
        num_nodes=-(-world // per_node),
    )


def ensure_process_group(
    topo: Topology,
    backend: str | None,
    timeout: float,
    *,
    pg_timeout: float | None = None,
    cuda_device: int | None = None,
    startup_error: str = "",
) -> bool:
    """Initialise the default group from ``topo`` unless one exists; True if we created it.

    ``timeout`` bounds the creation. The group then keeps ``pg_timeout`` seconds for its own
    collectives: torch's default for the backend when None (an existing group is left as is).
    ``cuda_device`` is this rank's GPU (NCCL binds the group to it). ``startup_error``, this
    rank's reason not to start (e.g. no GPU for its local rank), reaches every rank through
    the start-up check, before gloo/NCCL connect, and stops them all with one message.
    """
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
    if not topo.is_distributed:
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
    if chosen == "nccl" and cuda_device is not None:
        kwargs["device_id"] = torch.device("cuda", cuda_device)
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
    prefix = f"ddpseed/attempt_{attempt}/group_{_next_group()}"
    try:
        if topo.rank != 0:
            _wait_for_listener(topo.master_addr, topo.master_port, deadline)
        remaining = max(1.0, deadline - time.monotonic())
        store, _, _ = next(
            rendezvous(url, topo.rank, topo.world_size, timeout=timedelta(seconds=remaining))
        )
        _check_world(PrefixStore(prefix + "/world", store), topo, startup_error)
        dist.init_process_group(
            backend=chosen,
            store=PrefixStore(prefix, store),
            rank=topo.rank,
            world_size=topo.world_size,
            timeout=timedelta(seconds=timeout) if settable else lasting,
            **kwargs,  # type: ignore[arg-type]
        )
    except TopologyError:
        raise
    except Exception as exc:
        role = "listen" if topo.rank == 0 else "reach rank 0"
        if topo.rank == 0 and "EADDRINUSE" in str(exc):
            hint = (
                f" Another process listens at that port: if it is another launch (this one is "
                f"{_launch_name(topo.launch_id, topo.launcher)}), give each launch its own "
                "MASTER_PORT." + hint
            )
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


def _check_world(store: PrefixStore, topo: Topology, error: str = "") -> None:
    """Compare every rank's world size and launch, and gather their start-up errors, through
    the rendezvous store before gloo/NCCL connect.

    Why: a rank that counts another world waits in the connect for ranks that never come
    (about five times the timeout, then blaming the port); processes of two launches that meet
    at one port (two srun steps of one job on one node) would form a group of strangers; and a
    rank that cannot start would leave the others waiting out the timeout. Each rank claims
    its rank number (a second claimant is of another launch), rank 0 hears every rank and posts
    a verdict, the others compare themselves with rank 0 and wait for that verdict.
    """
    mine = {"world": topo.world_size, "launch": topo.launch_id, "launcher": topo.launcher}
    where = f"{topo.master_addr}:{topo.master_port}"
    claim = store.add(f"claim/{topo.rank}", 1)
    store.set(f"arrived/{topo.launch_id}/{topo.rank}", "1")
    if claim > 1:
        first = _entry(store, topo.rank)
        store.set(f"read/{topo.rank}/{claim}", "1")
        raise TopologyError(
            f"rank {topo.rank}: another process already joined {where} as rank {topo.rank} "
            f"({_launch_name(first['launch'], first['launcher'])}; this one is "
            f"{_launch_name(topo.launch_id, topo.launcher)}): two launches met at one port. "
            f"{_TWO_LAUNCHES_FIX}"
        )
    store.set(f"rank/{topo.rank}", json.dumps({**mine, "error": error}))
    if topo.rank != 0:
        problem = _differs(topo, "this rank", 0, _entry(store, 0), where)
        verdict = "" if problem else store.get("verdict").decode()
        if problem or verdict:  # read: rank 0 may go now, and its store with it
            store.set(f"read/{topo.rank}/1", "1")
        if problem:
            raise TopologyError(f"rank {topo.rank}: {problem}")
        if verdict:
            raise TopologyError(f"rank {topo.rank}: stopped with every rank: {verdict}")
        return
    entries: dict[int, dict[str, Any]] = {0: {**mine, "error": error}}
    verdict = ""
    for other in range(1, topo.world_size):
        entries[other] = _entry(store, other)
        verdict = _differs(topo, "rank 0", other, entries[other], where)
        if verdict:
            break
    failed = {r: e["error"] for r, e in entries.items() if e.get("error")}
    if failed and not verdict:
        verdict = (
            f"{len(failed)} of {topo.world_size} ranks cannot start; no rank was seeded:\n"
            + "\n".join(f"  rank {r}: {strip_rank(m, r)}" for r, m in failed.items())
        )
    store.set("verdict", verdict)
    if verdict:
        _linger(store, topo, stranger=any(e["launch"] != topo.launch_id for e in entries.values()))
        raise TopologyError(f"rank 0: {verdict}")


def _linger(store: PrefixStore, topo: Topology, *, stranger: bool) -> None:
    """Rank 0 refusing: the store lives in this process, so keep it (at most VERDICT_GRACE
    seconds a wait) until its own launch's ranks have arrived, where a stranger took a rank
    before them, and until every process that claimed a rank so far has read its verdict."""
    grace = timedelta(seconds=VERDICT_GRACE)
    # A rank that died or went stops none of this: the others still hear the verdict.
    if stranger:
        mine = [f"arrived/{topo.launch_id}/{r}" for r in range(1, topo.world_size)]
        with contextlib.suppress(Exception):
            store.wait(mine, grace)
    claims = {r: store.add(f"claim/{r}", 0) for r in range(1, topo.world_size)}
    with contextlib.suppress(Exception):
        store.wait([f"read/{r}/{k}" for r, n in claims.items() for k in range(1, n + 1)], grace)


_TWO_LAUNCHES_FIX = (
    "Give each launch its own MASTER_PORT, or leave MASTER_PORT unset where the launcher names "
    "its launches (ddpseed then derives one port per Slurm job step, jsrun, MPI job)"
)


def _entry(store: PrefixStore, rank: int) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(store.get(f"rank/{rank}"))
    return entry


def _launch_name(launch: str | None, launcher: str) -> str:
    return f"launch {launch}" if launch else f"an unnamed {launcher} launch"


def _differs(topo: Topology, me: str, other: int, theirs: dict[str, Any], where: str) -> str:
    """How rank ``other``'s entry contradicts this rank's (``me``) topology, or ''."""
    if theirs["launch"] != topo.launch_id:
        return (
            f"{me} is of {_launch_name(topo.launch_id, topo.launcher)} but rank {other} at "
            f"{where} is of {_launch_name(theirs['launch'], theirs['launcher'])}: two "
            f"launches met at one port. {_TWO_LAUNCHES_FIX}"
        )
    if theirs["world"] != topo.world_size:
        return (
            f"{me}'s {topo.launcher} environment says world size {topo.world_size}, rank "
            f"{other}'s says {theirs['world']}; every rank must be started with the same "
            "world size (WORLD_SIZE or the launcher's equivalent)"
        )
    return ""


_groups_made = 0


def _next_group() -> int:
    """How many groups this process has asked for, this one included: the same on every rank
    of a job. A group made again after destroy_process_group meets on the same store (the
    torchrun agent's) under keys of its own, not the previous group's gloo addresses."""
    global _groups_made
    _groups_made += 1
    return _groups_made


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


def refuse_unknown_launch(topo: Topology, env: Mapping[str, str]) -> None:
    """Raise where no launcher ddpseed reads was found, yet ``WORLD_SIZE`` says several ranks.

    PyTorch Lightning's own launcher starts its other processes with ``LOCAL_RANK`` and
    ``WORLD_SIZE`` but no ``RANK``, and makes the process group later: read as one process,
    each would take rank 0's seeds and the whole dataset.
    """
    world = env.get("WORLD_SIZE", "").strip()
    if topo.launcher != "single" or not world.isdecimal() or int(world) <= 1:
        return
    if "LOCAL_RANK" not in env:  # often exported in a batch script for a torchrun it starts
        log.warning(
            "WORLD_SIZE=%s is set but no launcher's rank variables are: running as one "
            "process (rank 0 of 1, the whole dataset)",
            world,
        )
        return
    raise TopologyError(
        f"WORLD_SIZE={world} and LOCAL_RANK={env['LOCAL_RANK']} are set but RANK is not, and "
        "no process group exists: a launcher ddpseed does not read started this process "
        "(PyTorch Lightning's own launcher does this), so its rank is unknown. fix: launch "
        "with torchrun, srun or mpirun, or call ddpseed.setup() after the process group "
        "exists (in a LightningModule or DataModule setup() hook)"
    )
