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

What a rank's file holds, and how it is verified, is :mod:`ddpseed.payload`'s. Each call is
collective in a distributed job: every rank must make it.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .collective import Reports, call_id, disagreement, exchange, strip_rank
from .commit import (
    Commit,
    commit_path,
    path_text,
    rank_template,
    read_commit,
    read_commit_record,
    remove_other_saves,
    state_path,
    write_commit_record,
)
from .compat import ELASTIC
from .errors import AgreementError, ArgumentError, StateError, first_line
from .files import atomic_write_bytes
from .payload import encode, read_state

if TYPE_CHECKING:
    from .plan import SeedPlan


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
        data = encode(number, token, state, extra, plan.rank)
        atomic_write_bytes(target, data, what=f"rank {plan.rank} state")
    except StateError as exc:
        error = str(exc)
    except Exception as exc:  # whatever torch.save makes of extra=: every rank hears of it
        error = (
            f"rank {plan.rank}: writing its state failed ({type(exc).__name__}: {first_line(exc)})"
        )
    written = exchange(what + " (write)", (), error, plan.topology, plan.timeout)
    raise_failures(written.lines(), what, plan, _previous(number))
    error = None
    if plan.rank == 0:
        try:
            write_commit_record(path, Commit(number, plan.world_size, token), plan.epoch)
        except StateError as exc:
            error = str(exc)
    committed = exchange(what + " (commit)", (), error, plan.topology, plan.timeout)
    raise_failures(committed.lines(), what, plan, _previous(number))
    remove_other_saves(path, plan.rank, keep=number)
    return target


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


def _position_key(state: dict[str, Any]) -> int:
    """One number for "where this rank resumes": epoch and every loader's position."""
    where = sorted(
        (name, s.get("epoch"), s.get("position"), s.get("finished"))
        for name, s in state.get("loaders", {}).items()
        # Loaders every rank iterates (distributed=True, even over a data world of one under
        # a mesh) stand at one position; a rank's own loaders may differ.
        if isinstance(s, dict) and s.get("distributed", s.get("num_replicas", 1) > 1)
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
