"""Checkpoints of every rank's RNGs, epoch and loader positions, saved and loaded as one unit.

``save_state("ckpt/rng.pt", plan)`` on every rank writes save number N:

1. rank 0 reads the commit record ``ckpt/rng.commit.json`` (the last complete save, N - 1) and
   every rank learns N;
2. each rank writes its own file ``ckpt/rng.rank<r>.<N>.pt`` (temp file, fsync, rename; put
   ``{rank}`` in the path to place the files yourself: ``ckpt/{rank}/rng.pt`` writes
   ``ckpt/<r>/rng.<N>.pt`` and the record ``ckpt/0/rng.commit.json``);
3. only when every rank has written does rank 0 replace the commit record with N; only then
   does each rank delete its own older files (and temp files left by a killed save).

A save that fails or is killed on any rank therefore leaves the commit record on N - 1, whose
files are all still there: the previous complete checkpoint loads. ``load_state`` reads the
commit record on rank 0, and every rank loads its file of that save, verifies it (SHA-256 of its
content, format, save number, seed, world size) and checks with the others that they resume at
the same epoch and positions; only if all of that holds does any rank restore anything.

A state file holds only tensors, ints, floats, strings, None, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without any allow-list. Each call is
collective in a distributed job: every rank must make it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .collective import call_id, disagreement, exchange
from .compat import ELASTIC
from .errors import AgreementError, ArgumentError, StateError, first_line
from .files import atomic_write_bytes, atomic_write_json, open_regular

if TYPE_CHECKING:
    from .plan import SeedPlan

FORMAT = "ddpseed.state/3"
COMMIT_FORMAT = "ddpseed.checkpoint/2"  # /2: the record names the world size that saved


def digest(value: Any) -> str:
    """SHA-256 over a state's structure and bytes (dict order does not matter)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in sorted(value):
            h.update(json.dumps(key).encode())
            _feed(h, value[key])
        h.update(b"}")
    elif isinstance(value, list | tuple):
        h.update(b"[")
        for item in value:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(json.dumps(value).encode())


def _rank_base(path: str | os.PathLike[str], rank: int) -> tuple[Path, str]:
    """Rank ``rank``'s files of ``path`` are ``<base>.<save><suffix>``: (base, suffix)."""
    text = os.fspath(path)
    p = Path(text.replace("{rank}", str(rank)))
    stem = p.stem if "{rank}" in text else f"{p.stem}.rank{rank}"
    return p.with_name(stem), p.suffix


def state_path(path: str | os.PathLike[str], rank: int, save: int) -> Path:
    """Where rank ``rank``'s file of save number ``save`` goes.

    >>> str(state_path("ckpt/rng.pt", 3, 7))
    'ckpt/rng.rank3.7.pt'
    >>> str(state_path("ckpt/{rank}/rng.pt", 3, 7))
    'ckpt/3/rng.7.pt'
    """
    base, suffix = _rank_base(path, rank)
    return base.with_name(f"{base.name}.{save}{suffix}")


def commit_path(path: str | os.PathLike[str]) -> Path:
    """The commit record: which save of ``path`` is complete (beside rank 0's files).

    >>> str(commit_path("ckpt/rng.pt")), str(commit_path("ckpt/{rank}/rng.pt"))
    ('ckpt/rng.commit.json', 'ckpt/0/rng.commit.json')
    """
    p = Path(os.fspath(path).replace("{rank}", "0"))
    return p.with_name(f"{p.stem}.commit.json")


def read_commit(path: str | os.PathLike[str]) -> int | None:
    """The number of the last complete save of ``path``, or None if there is none."""
    found = read_commit_record(path)
    return None if found is None else found[0]


def read_commit_record(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(save number, world size that wrote it) of the last complete save, or None."""
    record = commit_path(path)
    try:
        with open_regular(record, "commit record") as fh:
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read commit record {record}: {exc}") from exc
    try:
        data = json.loads(text)
        save, world = data["save"], data["world_size"]
        if data.get("format") != COMMIT_FORMAT or not isinstance(save, int) or save < 1:
            raise ValueError(f"format {data.get('format')!r}, save {save!r}")
        if not isinstance(world, int) or world < 1:
            raise ValueError(f"world_size {world!r}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise StateError(
            f"commit record {record} is corrupted ({type(exc).__name__}: {first_line(exc)}); "
            'restore it from a backup, or write {"format": "' + COMMIT_FORMAT + '", '
            '"save": N, "world_size": W} naming the last save whose W rank files are all present'
        ) from None
    return save, world


def save_state(path: str | os.PathLike[str], plan: SeedPlan) -> Path:
    """Write this rank's ``plan.state_dict()`` as part of one checkpoint of every rank.

    Collective in a distributed job. If any rank cannot write (disk full, read-only
    directory, killed), every rank raises :class:`StateError` naming it, and the previous
    complete checkpoint stays loadable. Returns this rank's file.
    """
    what = f"save_state({os.fspath(path)!r})"
    number, error = 0, None
    try:
        if plan.rank == 0:
            number = (read_commit(path) or 0) + 1
        state = plan.state_dict()
    except StateError as exc:
        error = str(exc)
    begun = exchange(what, (number,), error, plan.topology, plan.timeout)
    raise_failures(begun.lines(), what, plan, "nothing was written")
    number = begun.values[0][0]
    target = state_path(path, plan.rank, number)
    error = None
    try:
        buffer = io.BytesIO()
        payload = {"format": FORMAT, "save": number, "digest": digest(state), "state": state}
        torch.save(payload, buffer)
        atomic_write_bytes(target, buffer.getvalue(), what=f"rank {plan.rank} state")
    except StateError as exc:
        error = str(exc)
    written = exchange(what + " (write)", (), error, plan.topology, plan.timeout)
    raise_failures(written.lines(), what, plan, _previous(number))
    error = None
    if plan.rank == 0:
        try:
            atomic_write_json(
                commit_path(path),
                {
                    "format": COMMIT_FORMAT,
                    "save": number,
                    "world_size": plan.world_size,
                    "epoch": plan.epoch,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                what="commit record",
            )
        except StateError as exc:
            error = str(exc)
    committed = exchange(what + " (commit)", (), error, plan.topology, plan.timeout)
    raise_failures(committed.lines(), what, plan, _previous(number))
    _remove_other_saves(path, plan.rank, keep=number)
    return target


def _previous(number: int) -> str:
    if number == 1:
        return "there is no earlier complete checkpoint"
    return f"the previous complete checkpoint (save {number - 1}) is intact and still loads"


def raise_failures(lines: list[str], what: str, plan: SeedPlan, outcome: str) -> None:
    """Raise :class:`StateError` on every rank if any rank reported a failure."""
    if lines:
        raise StateError(
            f"{what} failed on {len(lines)} of {plan.world_size} ranks; {outcome}:\n"
            + "\n".join(f"  {line}" for line in lines)
        )


def _remove_other_saves(path: str | os.PathLike[str], rank: int, keep: int) -> None:
    """Delete this rank's files of other saves and temp files of killed saves."""
    base, suffix = _rank_base(path, rank)
    stem = base.name
    with contextlib.suppress(OSError):
        for entry in base.parent.iterdir():
            name = entry.name
            middle = name[len(stem) + 1 : len(name) - len(suffix)]
            old = name.startswith(stem + ".") and name.endswith(suffix) and middle.isdigit()
            torn = name.startswith(f".{stem}.") and name.endswith(".tmp")
            if (old and int(middle) != keep) or torn:
                with contextlib.suppress(OSError):
                    entry.unlink()


def read_state(path: str | os.PathLike[str], rank: int, save: int) -> dict[str, Any]:
    """Load and verify rank ``rank``'s file of save ``save``; raises :class:`StateError`."""
    target = state_path(path, rank, save)
    try:
        with open_regular(target, "state file") as fh:
            payload = torch.load(fh, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StateError(
            f"state file {target} of save {save} (the one {commit_path(path)} names) does not "
            "exist; copy every rank's file of that save back, or resume from another checkpoint"
        ) from None
    except StateError:
        raise
    except Exception as exc:
        raise StateError(
            f"state file {target} is truncated or not a ddpseed state file "
            f"({type(exc).__name__}: {first_line(exc)[:200]}); resume from an earlier checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise StateError(
            f"{target} is not a ddpseed state file (format {found!r}, expected {FORMAT!r})"
        )
    if payload.get("save") != save:
        raise StateError(
            f"state file {target} belongs to save {payload.get('save')!r}, not save {save} that "
            f"{commit_path(path)} names: files of different saves were mixed; copy back every "
            "rank's file of one save"
        )
    state = payload.get("state")
    if not isinstance(state, dict) or digest(state) != payload.get("digest"):
        raise StateError(
            f"state file {target} is corrupted (its SHA-256 digest does not match its "
            "content); resume from an earlier checkpoint"
        )
    return state


def _position_key(state: dict[str, Any]) -> int:
    """One number for "where this rank resumes": epoch and every loader's position."""
    where = sorted(
        (name, s.get("epoch"), s.get("position"), s.get("finished"))
        for name, s in state.get("loaders", {}).items()
        if isinstance(s, dict) and s.get("num_replicas", 1) > 1  # a rank's own loaders differ
    )
    return call_id(json.dumps([state.get("epoch"), where], default=str))


def load_state(path: str | os.PathLike[str], plan: SeedPlan, *, elastic: bool = False) -> None:
    """Restore this rank's RNGs, epoch and loader positions from the last complete save.

    Collective in a distributed job. Every rank verifies its file first; only if all are
    sound, from the same save and at the same epoch and positions does any rank restore, so
    one bad file stops the whole job with the same error instead of half a resume.

    ``elastic=True`` also accepts a save written by another number of ranks, num_workers or
    batch size: the interrupted epoch continues from the global position the old ranks
    reached, every unconsumed sample exactly once (see :mod:`ddpseed.elastic_load`).
    """
    if elastic and plan.mesh is not None:
        # Elastic resume re-derives each rank's streams from its rank alone, which would part
        # the streams the mesh policy keeps identical (tp peers). The mesh is agreed, so every
        # rank refuses here, before any collective.
        raise ArgumentError(
            f"rank {plan.rank}: load_state(elastic=True) does not support a device mesh yet "
            f"(mesh {plan.mesh.describe()}); resume on the saved mesh without elastic=True"
        )
    what = f"load_state({os.fspath(path)!r})"
    number, world, error = 0, 0, None
    if plan.rank == 0:
        try:
            found = read_commit_record(path)
            if found is None:
                raise StateError(
                    f"no checkpoint at {os.fspath(path)}: its commit record "
                    f"{commit_path(path)} does not exist (no save_state to that path completed "
                    "on every rank); pass the path given to save_state, or start fresh"
                )
            number, world = found
        except StateError as exc:
            error = str(exc)
    begun = exchange(what, (number, world), error, plan.topology, plan.timeout)
    raise_failures(begun.lines(), what, plan, "nothing was restored")
    number, world = begun.values[0]
    if elastic:
        from .elastic_load import load_elastic  # it reads files with this module's functions

        load_elastic(path, plan, number, world)
        return
    if world != plan.world_size:
        raise StateError(
            f"rank {plan.rank}: {what}: save {number} was written by {world} ranks but this job "
            f"has {plan.world_size}; its shards differ from this job's, so nothing was "
            f"restored. Resume with the saved number of ranks, or {ELASTIC}"
        )
    state: dict[str, Any] = {}
    error = None
    try:
        state = read_state(path, plan.rank, number)
        plan.check_state(state, source=str(state_path(path, plan.rank, number)))
    except StateError as exc:
        error = str(exc)
    checked = exchange(
        what + " (check)", (_position_key(state),), error, plan.topology, plan.timeout
    )
    raise_failures(checked.lines(), what, plan, "nothing was restored")
    if disagreement(checked, ["epoch and loader positions"]):
        shown = "\n".join(
            f"  rank {r}: epoch {s}" for r, s in enumerate(_gather_positions(state, plan, what))
        )
        raise AgreementError(
            f"{what}: the ranks' files of save {number} resume at different epochs or "
            f"positions, so the shards would no longer line up; nothing was restored:\n{shown}\n"
            "fix: restore every rank's files from one save_state"
        )
    plan.load_state_dict(state, source=str(state_path(path, plan.rank, number)))


def _gather_positions(state: dict[str, Any], plan: SeedPlan, what: str) -> list[str]:
    """Every rank's epoch and loader positions, as text (only on the mismatch path)."""
    mine = f"{state.get('epoch')}, " + ", ".join(
        f"loader {n!r} at {s.get('position')}" + (" (pass finished)" if s.get("finished") else "")
        for n, s in sorted(state.get("loaders", {}).items())
    )
    shown = exchange(what + " (positions)", (), mine, plan.topology, plan.timeout)
    return [shown.messages.get(r, "?") for r in range(plan.world_size)]
