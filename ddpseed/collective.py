"""One small collective with a deadline: every rank's values and message, seen on every rank.

:func:`exchange` is the only transport ddpseed uses after the process group is up. Each rank
sends a fixed-width int64 row (a marker, the name of the call, up to :data:`MAX_VALUES` values
and the length of its message), rank 0 gathers the rows and broadcasts the table. Only when some
rank has a message does a second round carry the messages, padded to the longest one, so every
message reaches every rank whole and a healthy call costs one gather and one broadcast.

Because every ddpseed collective has the same width and carries its call's name, a rank that is
in another ddpseed call (``save_state`` here, ``load_state`` there) is named as such instead of
corrupting the other call, and a rank that never arrives is named after the deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import CoordinationError, TopologyError, first_line
from .topology import Topology

MAX_VALUES = 16
_MARKER = 0xDD5EED02
_HEADER = 5  # marker, call id, number of values, message length, name length
ROW_WIDTH = _HEADER + MAX_VALUES  # int64s every rank sends in one exchange
_generation = 0
RELEASE_GRACE = 1.0  # seconds _gather waits for gloo's worker to drop its tensors
left_pending = False  # a wait here gave up on a work the backend may still be running


@dataclass(frozen=True)
class Reports:
    """What every rank sent to one :func:`exchange`, indexed by rank."""

    values: list[tuple[int, ...]]
    messages: dict[int, str]

    def lines(self) -> list[str]:
        """``["rank r: message", ...]`` for the ranks that sent a message, by rank."""
        return [f"rank {r}: {strip_rank(m, r)}" for r, m in sorted(self.messages.items())]


def ranks_text(ranks: Sequence[int]) -> str:
    """Compact rank list.

    >>> ranks_text([0, 1, 2, 5])
    '0-2,5'
    """
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


def strip_rank(message: str, rank: int) -> str:
    """``message`` without a leading ``"rank <rank>: "`` (the table adds it once).

    >>> strip_rank("rank 3: disk full", 3)
    'disk full'
    """
    prefix = f"rank {rank}: "
    return message[len(prefix) :] if message.startswith(prefix) else message


def call_id(name: str) -> int:
    """A stable signed 64-bit id of a call's name (also used for paths and loader names).

    >>> call_id("save_state") == call_id("save_state") != call_id("load_state")
    True
    """
    return int.from_bytes(
        hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True
    )


def exchange(
    name: str,
    values: Sequence[int],
    message: str | None,
    topo: Topology,
    timeout: float,
    *,
    hint: str = "",
    call: str = "",
) -> Reports:
    """Every rank's ``values`` and ``message`` on every rank; raises on every rank if a rank
    is missing, late, or in another ddpseed call.

    ``name`` says what the call is (``"save_state"``); ``hint`` is appended to a timeout's
    message (what to do when only some ranks make this call on purpose). ``call``, if given,
    identifies the call instead of ``name``: a name holding text that may differ between ranks
    (a path) would make each rank blame the others for being in another collective.
    """
    if len(values) > MAX_VALUES:
        raise ValueError(f"{len(values)} values; an exchange carries at most {MAX_VALUES}")
    text = strip_rank(message, topo.rank).encode() if message else b""
    _check_world(name, topo)
    if not topo.is_distributed:
        return Reports([tuple(values)], {topo.rank: text.decode()} if message else {})
    if not dist.is_initialized():
        raise CoordinationError(
            f"rank {topo.rank}: {name} is collective in a job of {topo.world_size} ranks, but "
            "torch.distributed is not initialized here (destroy_process_group already called?); "
            f"call {name} on every rank while the process group is up"
        )
    global _generation
    _generation += 1
    said = name.encode()
    row = [_MARKER, call_id(call or name), len(values), len(text), len(said), *values]
    row += [0] * (ROW_WIDTH - len(row))
    key = f"ddpseed/exchange/{_generation}"
    started = time.monotonic()
    try:
        table: list[list[int]] = _gather(torch.tensor(row, dtype=torch.int64), timeout).tolist()
        _check_calls(table, name, said, topo, timeout)
        longest = max(r[3] for r in table)
        texts = _gather_text(text, longest, timeout) if longest else [b""] * topo.world_size
    except CoordinationError:
        raise
    except Exception as exc:
        elapsed = time.monotonic() - started
        raise _timeout_error(name, key, topo, (elapsed, timeout), exc, hint) from exc
    return Reports(
        [tuple(r[_HEADER : _HEADER + r[2]]) for r in table],
        {
            r: texts[r][: table[r][3]].decode(errors="replace")
            for r in range(topo.world_size)
            if table[r][3]
        },
    )


def _check_world(name: str, topo: Topology) -> None:
    """Raise if torch.distributed's world is not the one ``setup()`` found.

    PyTorch Lightning's own launcher starts the other ranks and the process group after the
    script's top: a ``setup()`` there made a plan of one rank, and every rank would take rank
    0's seeds and the whole dataset while DDP averages their gradients.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size()
    if world != topo.world_size:
        raise TopologyError(
            f"rank {dist.get_rank()}: {name}: ddpseed.setup() made this plan for a world of "
            f"{topo.world_size} ({topo.launcher}), but torch.distributed now has {world} ranks "
            "(a process group made after setup(), as PyTorch Lightning's own launcher does): "
            "every rank would take the same seeds and data. fix: call ddpseed.setup() after "
            "the process group exists (in a LightningModule or DataModule setup() hook), or "
            "launch with torchrun, srun or mpirun"
        )


def disagreement(reports: Reports, fields: Sequence[str]) -> str:
    """Which of ``fields`` differ between ranks, each with every rank's value ('' if none).

    >>> print(disagreement(Reports([(100, 4), (90, 4)], {}), ["dataset length", "batch size"]))
    dataset length: 100 on ranks 0; 90 on ranks 1
    """
    lines = []
    for i, field in enumerate(fields):
        by_value: dict[int, list[int]] = {}
        for rank, values in enumerate(reports.values):
            by_value.setdefault(values[i], []).append(rank)
        if len(by_value) > 1:
            shown = "; ".join(f"{v} on ranks {ranks_text(rs)}" for v, rs in by_value.items())
            lines.append(f"{field}: {shown}")
    return "\n".join(lines)


def _check_calls(
    table: list[list[int]], name: str, said: bytes, topo: Topology, timeout: float
) -> None:
    """Raise on every rank if some rank is in another collective than this ``name``.

    When every rank is in one of ddpseed's exchanges (each sees the same table, so all take
    this path), one more round carries each rank's call, and the message shows them all
    (``plan.dataloader(name='train')`` here, ``name='trn'`` there) on every rank alike.
    """
    mine = table[topo.rank][1]
    if all(row[0] == _MARKER and row[1] == mine for row in table):
        return
    fix = (
        "ddpseed's calls (setup, dataloader, iter(loader), save_state, load_state) are "
        "collective: make them at the same point of the script, with the same loader names, "
        "on every rank"
    )
    if any(row[0] != _MARKER for row in table):
        foreign = [r for r, row in enumerate(table) if row[0] != _MARKER]
        raise CoordinationError(
            f"rank {topo.rank}: ranks {ranks_text(foreign)} were in another collective (not "
            f"ddpseed's) when the others called {name}; {fix}"
        )
    calls = _gather_text(said, max(row[4] for row in table), timeout)
    by_call: dict[str, list[int]] = {}
    for r, text in enumerate(calls):
        by_call.setdefault(text[: table[r][4]].decode(errors="replace"), []).append(r)
    shown = "\n".join(f"  {call} on ranks {ranks_text(rs)}" for call, rs in by_call.items())
    raise CoordinationError(
        f"rank {topo.rank}: the ranks are in different ddpseed calls:\n{shown}\n{fix}"
    )


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _gather(row: torch.Tensor, timeout: float) -> torch.Tensor:
    """Every rank's ``row`` stacked, on every rank: a gather to rank 0 and a broadcast, each
    bounded by ``timeout`` whatever the group's own timeout is.

    (gloo's all_gather is a ring of world_size - 1 sequential hops; gather + broadcast measured
    2-6x faster at 4-32 ranks.)
    """
    device = _device()
    world = dist.get_world_size()
    table = torch.empty((world, row.numel()), dtype=row.dtype, device=device)
    slots = [table[r] for r in range(world)] if dist.get_rank() == 0 else None
    sent = row.to(device)
    used = [sent, table, *(slots or [])]
    before = _refcounts(used)
    _wait(dist.gather(sent, slots, dst=0, async_op=True), timeout)
    _wait(dist.broadcast(table, src=0, async_op=True), timeout)
    if device.type == "cpu":
        _await_release(used, before)
    return table.cpu()


def _refcounts(tensors: Sequence[torch.Tensor]) -> list[int]:
    return [sys.getrefcount(t) for t in tensors]


def _await_release(tensors: Sequence[torch.Tensor], before: Sequence[int]) -> None:
    """Return once the backend no longer holds ``tensors`` (at most ``RELEASE_GRACE`` seconds).

    Why: gloo's worker thread drops a finished work, and the tensors in it, only after
    ``wait()`` returned. While C++ holds a tensor torch keeps a reference to its Python object
    (so ``sys.getrefcount`` is one higher), and dropping that reference needs the GIL: if the
    script has exited meanwhile, that happens during interpreter finalization, Python ends the
    thread with a forced unwind through a noexcept destructor, and the rank aborts with
    "terminate called without an active exception". Waiting here (normally not at all) keeps a
    ddpseed call that is the script's last collective from leaving that behind; torch versions
    that do not count C++ holders this way return at once.
    """
    deadline = time.monotonic() + RELEASE_GRACE
    while time.monotonic() < deadline and any(
        now > then for now, then in zip(_refcounts(tensors), before, strict=True)
    ):
        time.sleep(0.001)  # releases the GIL, which the worker needs to drop them


def _gather_text(text: bytes, longest: int, timeout: float) -> list[bytes]:
    padded = torch.frombuffer(bytearray(text.ljust(longest, b"\0")), dtype=torch.uint8)
    return [bytes(row.numpy().tobytes()) for row in _gather(padded, timeout)]


def _wait(work: Any, timeout: float) -> None:
    assert work is not None
    try:
        work.wait(timeout=timedelta(seconds=timeout))
    except Exception:
        # The backend's worker may still be running it (only our wait gave up): destroying the
        # group at exit would wait for it (see group._destroy_at_exit).
        global left_pending
        left_pending = True
        raise


def _timeout_error(
    name: str,
    key: str,
    topo: Topology,
    times: tuple[float, float],
    exc: Exception,
    hint: str,
) -> CoordinationError:
    elapsed, timeout = times
    # Only a wait that ran out (ours, or the process group's own shorter timeout) can mean a
    # rank never arrived. An early failure is a peer that died, perhaps rank 0 whose host
    # serves the store: asking it would only add torch's C++ stack traces to the log.
    timed_out = elapsed >= timeout or "timed out" in str(exc).lower()
    absent = absent_ranks(key, topo, timeout) if timed_out else None
    if absent:
        who = f"rank{'s' if len(absent) > 1 else ''} {ranks_text(absent)} never reached it"
    else:
        who = "a peer failed or disconnected during it"
    # A peer that dies is noticed at once; "within 8s" would then say what did not happen.
    ended = f"did not complete within {timeout:g}s"
    if elapsed < timeout:
        ended = (
            f"{'timed out' if timed_out else 'failed'} after {elapsed:.1f}s (limit {timeout:g}s)"
        )
    return CoordinationError(
        f"rank {topo.rank} on {socket.gethostname()}: {name} over {topo.world_size} ranks "
        f"{ended}: {who}. {name} is collective: every rank must call "
        f"it at the same point of the script; look for the first error in those ranks' logs."
        f"{' ' + hint if hint else ''} ({type(exc).__name__}: {first_line(exc)})"
    )


def _default_store() -> Any:
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # diagnostics only: a private API may move between torch releases
        return None


def absent_ranks(key: str, topo: Topology, timeout: float) -> list[int] | None:
    """After a failed collective: the ranks that never reached it, or None if unknown.

    Only the failure path touches the store, so a healthy call costs no extra round trip.
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
        found = store.get(verdict).decode()
        store.set(f"{key}/ack/{topo.rank}", "1")
        return [int(r) for r in found.split(",") if r]
    except Exception:  # the store lives on rank 0's host; it may be the thing that died
        return None
