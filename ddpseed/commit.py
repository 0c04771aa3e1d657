"""Where a checkpoint's files go, and the commit record that says which save is complete.

``save_state("ckpt/rng.pt", plan)`` writes rank ``r``'s file of save ``N`` to
``ckpt/rng.rank<r>.<N>.pt`` (``{rank}`` in the path places the files instead) and, once every
rank has written, the record ``ckpt/rng.commit.json``: the save number, the world size that
wrote it, the save's token (which tells its files from any other save's of the same number)
and the name of rank 0's files (paths that differ only after the last dot share one record,
which commits one of them). The protocol around these files is :mod:`ddpseed.state`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

from .errors import StateError, first_line, shown
from .files import atomic_write_json, open_regular

COMMIT_FORMAT = "ddpseed.checkpoint/2"  # /2: the record names the world size that saved
# Save numbers, world sizes and tokens travel as int64 exchange values: well inside that.
LIMIT = 2**62


class Commit(NamedTuple):
    """What a commit record says: the last complete save of a path."""

    save: int
    world_size: int
    token: int | None  # None: written by a ddpseed without per-save tokens


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


def rank0_files(path: str | os.PathLike[str]) -> str:
    """The name of rank 0's files of ``path`` ("{save}" for the number), kept in the commit
    record: paths that differ only after the last dot share one record, and this tells whose
    checkpoint it commits.

    >>> rank0_files("ckpt/rng.step100"), rank0_files("ckpt/{rank}/rng.pt")
    ('rng.rank0.{save}.step100', 'rng.{save}.pt')
    """
    base, suffix = _rank_base(path, 0)
    return f"{base.name}.{{save}}{suffix}"


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


def read_commit_record(path: str | os.PathLike[str]) -> Commit | None:
    """The last complete save of ``path``, or None if there is none.

    Raises :class:`StateError` if the record cannot be read, is corrupted, or commits the
    checkpoint of another path that shares its name (see :func:`rank0_files`).
    """
    record = commit_path(path)
    try:
        with open_regular(record, "commit record") as fh:
            text = fh.read().decode(errors="replace")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: a name the OS cannot take
        raise StateError(f"cannot read commit record {record}: {exc}") from exc
    try:
        data = json.loads(text)
        save, world = data["save"], data["world_size"]
        token, files = data.get("token"), data.get("rank0_files", rank0_files(path))
        if data.get("format") != COMMIT_FORMAT or not _counts(save):
            raise ValueError(f"format {data.get('format')!r}, save {shown(save)}")
        if not _counts(world):
            raise ValueError(f"world_size {shown(world)}")
        if not (token is None or _counts(token)) or not isinstance(files, str):
            raise ValueError(f"token {shown(token)}, rank0_files {shown(files)}")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise StateError(
            f"commit record {record} is corrupted ({type(exc).__name__}: {first_line(exc)}); "
            'restore it from a backup, or write {"format": "' + COMMIT_FORMAT + '", '
            '"save": N, "world_size": W} naming the last save whose W rank files are all present'
        ) from None
    if files != rank0_files(path):
        raise StateError(
            f"commit record {record} commits the checkpoint whose rank 0 files are {files!r}, "
            f"not those of {os.fspath(path)!r} ({rank0_files(path)!r}): paths that differ "
            "only after the last dot (or in where {rank} goes) share one commit record, which "
            "holds one checkpoint. To load that checkpoint pass the path it was saved with; to "
            "keep checkpoints side by side give each its own stem or directory (e.g. "
            "rng_step200.pt, not rng.step200), or save every checkpoint to one fixed path "
            "(saves are numbered; the last complete one is kept)"
        )
    return Commit(save, world, token)


def write_commit_record(path: str | os.PathLike[str], commit: Commit, epoch: int) -> None:
    """Make ``commit`` the last complete save of ``path`` (atomically; rank 0, once every
    rank's file is written). Read back by :func:`read_commit_record`."""
    record = {
        "format": COMMIT_FORMAT,
        "save": commit.save,
        "world_size": commit.world_size,
        "token": commit.token,
        "rank0_files": rank0_files(path),
        "epoch": epoch,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(commit_path(path), record, what="commit record")


def _counts(value: object) -> bool:
    """A save number, world size or token: an int in [1, LIMIT) (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value < LIMIT


def path_text(path: object, rank: int, call: str) -> tuple[str, str | None]:
    """``path`` as text, and why it is no path (None if it is one).

    Asked of every rank before any collective: a path that fails only where it is first
    used (rank 0 reading the commit record) would leave the other ranks waiting for it.
    """
    text = os.fspath(path) if isinstance(path, str | os.PathLike) else None
    if not isinstance(text, str):
        return "", (
            f"rank {rank}: {call}(path={shown(path, 200)}): the path's type is "
            f"{type(path).__name__}, not str or an os.PathLike of str; pass e.g. "
            "'ckpt/rng.pt' (os.fsdecode turns bytes into str)"
        )
    if "\0" in text:
        return "", (
            f"rank {rank}: {call}({text!r}): the path contains a NUL byte, which no file name "
            "can hold; pass the path without it"
        )
    return text, None


def rank_template(paths: list[str]) -> str | None:
    """The path with "{rank}" that gives every rank's path, if one does (the rank formatted
    in by the script).

    >>> rank_template(["ck/rank0/rng.pt", "ck/rank1/rng.pt"]), rank_template(["a", "b"])
    ('ck/rank{rank}/rng.pt', None)
    """
    first = paths[0]
    for at in (i for i, c in enumerate(first) if c == "0"):
        template = f"{first[:at]}{{rank}}{first[at + 1 :]}"
        if all(template.replace("{rank}", str(r)) == p for r, p in enumerate(paths)):
            return template
    return None


def remove_other_saves(path: str | os.PathLike[str], rank: int, keep: int) -> None:
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
