"""Checkpoints of every rank's RNGs, epoch and loader positions, saved and loaded as one unit.

``save_state("ckpt/rng.pt", plan)`` on every rank writes save number N:

1. rank 0 reads the commit record ``ckpt/rng.commit.json`` (the last complete save, N - 1) and
   draws a token for this save; every rank learns N and the token, and the ranks check that
   they were given one path and stand at one epoch and position (else nothing is written);
2. each rank writes its own file ``ckpt/rng.rank<r>.<N>.pt`` (temp file, fsync, rename; put
   ``{rank}`` in the path to place the files yourself: ``ckpt/{rank}/rng.pt`` writes
   ``ckpt/<r>/rng.<N>.pt`` and the record ``ckpt/0/rng.commit.json``);
3. only when every rank has written does rank 0 replace the commit record with N (and the
   token, and the name of rank 0's files, so that another path sharing the record's name is
   refused); only then does each rank delete its own older files (and temp files left by a
   killed save).

A save that fails or is killed on any rank therefore leaves the commit record on N - 1, whose
files are all still there: the previous complete checkpoint loads. ``load_state`` reads the
commit record on rank 0, and every rank loads its file of that save, verifies it (SHA-256 of its
content, format, save number and token, seed, world size) and checks with the others that they
resume at the same epoch and positions; only if all of that holds does any rank restore anything.

A state file holds only tensors, ints, floats, strings, None, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without any allow-list. Each call is
collective in a distributed job: every rank must make it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from .collective import Reports, call_id, disagreement, exchange, strip_rank
from .commit import (
    COMMIT_FORMAT,
    commit_path,
    path_text,
    rank0_files,
    rank_template,
    read_commit,
    read_commit_record,
    remove_other_saves,
    state_path,
)
from .compat import ELASTIC
from .errors import AgreementError, ArgumentError, StateError, first_line, shown
from .files import atomic_write_bytes, atomic_write_json, open_regular

if TYPE_CHECKING:
    from .plan import SeedPlan

FORMAT = "ddpseed.state/3"


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


class Saved(NamedTuple):
    """What one rank's file of a save holds, verified."""

    state: dict[str, Any]  # the plan's state
    extra: Any  # what save_state(extra=...) kept beside it on that rank, or None


def save_state(path: str | os.PathLike[str], plan: SeedPlan, *, extra: Any = None) -> Path:
    """Write this rank's ``plan.state_dict()`` as part of one checkpoint of every rank.

    ``extra`` (tensors and plain values: ``{"model": model.state_dict(), "opt":
    opt.state_dict(), "step": step}``) is written in the same file, so it commits with the
    RNGs and positions as one unit: a job killed between two separate saves cannot pair a
    model of one step with the data position of another. :func:`load_state` returns it.

    Collective in a distributed job. If any rank cannot write (disk full, read-only
    directory, killed), every rank raises :class:`StateError` naming it, and the previous
    complete checkpoint stays loadable. Ranks given different paths, or standing at
    different epochs or loader positions, are refused before anything is written. Returns
    this rank's file.
    """
    text, error = path_text(path, plan.rank, "save_state")
    bad_path = error is not None
    what = f"save_state({text!r})"
    number, token, where, state = 0, 0, 0, {}
    if not bad_path:
        try:
            if plan.rank == 0:
                number = (read_commit(path) or 0) + 1
                token = secrets.randbits(62) or 1  # tells this save's files from any other's
            state = plan.state_dict()
            where = _position_key(state)
        except StateError as exc:
            error = str(exc)
    begun = _begin("save_state", what, text, bad_path, (number, token, where), error, plan)
    number, token = begun.values[0][2:4]
    if len({v[4] for v in begun.values}) > 1:
        # Files of ranks at different steps would load as one checkpoint that no step wrote,
        # and committing them would delete the previous good one.
        listed = "\n".join(
            f"  rank {r}: epoch {s}" for r, s in enumerate(_gather_positions(state, plan, what))
        )
        raise AgreementError(
            f"{what}: the ranks stand at different epochs or loader positions, so their files "
            f"would not resume one step; nothing was written and {_previous(number)}:\n"
            f"{listed}\nfix: call save_state at the same step on every rank (every rank must "
            "take the same number of batches; a loader of one rank alone needs "
            "distributed=False)"
        )
    target = state_path(path, plan.rank, number)
    error = None
    try:
        buffer = io.BytesIO()
        payload = {
            "format": FORMAT,
            "save": number,
            "token": token,
            "digest": digest(state),
            "state": state,
        }
        if extra is not None:
            payload.update(extra=extra, extra_digest=_extra_digest(extra, plan.rank))
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
                    "token": token,
                    "rank0_files": rank0_files(path),
                    "epoch": plan.epoch,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                what="commit record",
            )
        except StateError as exc:
            error = str(exc)
    committed = exchange(what + " (commit)", (), error, plan.topology, plan.timeout)
    raise_failures(committed.lines(), what, plan, _previous(number))
    remove_other_saves(path, plan.rank, keep=number)
    return target


def _extra_digest(extra: Any, rank: int) -> str:
    try:
        return digest(extra)
    except (TypeError, ValueError) as exc:  # json.dumps of a value that is no plain value
        raise StateError(
            f"rank {rank}: save_state(extra=...) holds something that is not a tensor or a "
            f"plain value ({first_line(exc)}); keep tensors, numbers, strings, None, lists, "
            "tuples and dicts, as model.state_dict() and opt.state_dict() are"
        ) from None


def _begin(
    call: str,
    what: str,
    text: str,
    bad_path: bool,
    values: tuple[int, ...],
    error: str | None,
    plan: SeedPlan,
) -> Reports:
    """The first exchange of ``call``: every rank's values after (bad path, path id).

    Its identity is the call alone, not the path, so ranks given different paths meet here
    and are told so, instead of each blaming the others for being in another collective.
    Raises on every rank for a bad path, different paths, or a rank's error.
    """
    outcome = "nothing was written" if call == "save_state" else "nothing was restored"
    begun = exchange(
        what, (int(bad_path), call_id(text), *values), error, plan.topology, plan.timeout, call=call
    )
    bad = [r for r, v in enumerate(begun.values) if v[0]]
    if bad:
        lines = "\n".join(f"  rank {r}: {strip_rank(begun.messages[r], r)}" for r in bad)
        raise ArgumentError(
            f"{call}: invalid path on {len(bad)} of {plan.world_size} ranks; {outcome}:\n{lines}"
        )
    if len({v[1] for v in begun.values}) > 1:
        paths = _every_rank(f"{call} (paths)", text, plan)
        example = rank_template(paths) or "ckpt/rank{rank}/rng.pt"
        listed = "\n".join(f"  rank {r}: {p!r}" for r, p in enumerate(paths))
        raise ArgumentError(
            f"{call}: the ranks were given different paths, so their files would not form one "
            f"checkpoint; {outcome}:\n{listed}\nfix: pass one path on every rank; to give "
            "each rank its own place put {rank} in it, which ddpseed fills in (e.g. "
            f"{example!r}), instead of formatting the rank into the path yourself"
        )
    raise_failures(begun.lines(), what, plan, outcome)
    return begun


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


def read_state(
    path: str | os.PathLike[str], rank: int, save: int, token: int | None = None
) -> Saved:
    """Load and verify rank ``rank``'s file of save ``save``; raises :class:`StateError`.

    ``token``: the save's token from the commit record (None: a record without one, whose
    files are not checked for it).
    """
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
    if token is not None and payload.get("token") != token:
        raise StateError(
            f"state file {target} was written by another save_state call than the save {save} "
            f"that {commit_path(path)} records (token {shown(payload.get('token'))} in the file, "
            f"{token} in the record): files of different saves were mixed (another run's save of "
            "the same number, or two jobs saving into one directory); copy back every rank's "
            "file of one save"
        )
    state = payload.get("state")
    if not isinstance(state, dict) or digest(state) != payload.get("digest"):
        raise StateError(
            f"state file {target} is corrupted (its SHA-256 digest does not match its "
            "content); resume from an earlier checkpoint"
        )
    extra = payload.get("extra")
    if "extra" in payload and digest(extra) != payload.get("extra_digest"):
        raise StateError(
            f"state file {target} is corrupted (the SHA-256 digest of its extra= does not match "
            "it); resume from an earlier checkpoint"
        )
    return Saved(state, extra)


def _position_key(state: dict[str, Any]) -> int:
    """One number for "where this rank resumes": epoch and every loader's position."""
    where = sorted(
        (name, s.get("epoch"), s.get("position"), s.get("finished"))
        for name, s in state.get("loaders", {}).items()
        if isinstance(s, dict) and s.get("num_replicas", 1) > 1  # a rank's own loaders differ
    )
    return call_id(json.dumps([state.get("epoch"), where], default=str))


def load_state(path: str | os.PathLike[str], plan: SeedPlan, *, elastic: bool = False) -> Any:
    """Restore this rank's RNGs, epoch and loader positions from the last complete save, and
    return what ``save_state(extra=...)`` kept beside them on this rank (None if nothing).

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
    text, error = path_text(path, plan.rank, "load_state")
    bad_path = error is not None
    what = f"load_state({text!r})"
    number, world, token = 0, 0, 0
    if plan.rank == 0 and not bad_path:
        try:
            found = read_commit_record(path)
            if found is None:
                raise StateError(
                    f"no checkpoint at {text}: its commit record "
                    f"{commit_path(path)} does not exist (no save_state to that path completed "
                    "on every rank); pass the path given to save_state, or start fresh"
                )
            number, world, token = found.save, found.world_size, found.token or 0
        except StateError as exc:
            error = str(exc)
    begun = _begin("load_state", what, text, bad_path, (number, world, token), error, plan)
    number, world, token = begun.values[0][2:5]
    if elastic:
        from .elastic_load import load_elastic  # it reads files with this module's functions

        return load_elastic(path, plan, number, world, token or None)
    if world != plan.world_size:
        raise StateError(
            f"rank {plan.rank}: {what}: save {number} was written by {world} ranks but this job "
            f"has {plan.world_size}; its shards differ from this job's, so nothing was "
            f"restored. Resume with the saved number of ranks, or {ELASTIC}"
        )
    state: dict[str, Any] = {}
    error, extra = None, None
    try:
        state, extra = read_state(path, plan.rank, number, token or None)
        plan.check_state(state, source=str(state_path(path, plan.rank, number)))
    except StateError as exc:
        error = str(exc)
    checked = exchange(
        what + " (check)", (_position_key(state),), error, plan.topology, plan.timeout
    )
    raise_failures(checked.lines(), what, plan, "nothing was restored")
    if disagreement(checked, ["epoch and loader positions"]):
        listed = "\n".join(
            f"  rank {r}: epoch {s}" for r, s in enumerate(_gather_positions(state, plan, what))
        )
        raise AgreementError(
            f"{what}: the ranks' files of save {number} resume at different epochs or "
            f"positions, so the shards would no longer line up; nothing was restored:\n{listed}\n"
            "fix: restore every rank's files from one save_state"
        )
    plan.load_state_dict(state, source=str(state_path(path, plan.rank, number)))
    return extra


def _gather_positions(state: dict[str, Any], plan: SeedPlan, what: str) -> list[str]:
    """Every rank's epoch and loader positions, as text (only on the mismatch path)."""
    mine = f"{state.get('epoch')}, " + ", ".join(
        f"loader {n!r} at {s.get('position')}" + (" (pass finished)" if s.get("finished") else "")
        for n, s in sorted(state.get("loaders", {}).items())
    )
    return _every_rank(what + " (positions)", mine, plan)


def _every_rank(name: str, mine: str, plan: SeedPlan) -> list[str]:
    """Every rank's ``mine``, by rank (only on a mismatch path)."""
    shown = exchange(name, (), mine, plan.topology, plan.timeout)
    return [shown.messages.get(r, "?") for r in range(plan.world_size)]
