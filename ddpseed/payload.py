"""What one rank's checkpoint file holds, and how it is verified when read.

A file is a ``torch.save`` of one record: ``format``, the save number, the save's ``token``,
the plan ``state`` and its SHA-256 ``digest`` over structure and bytes, and, if
``save_state(extra=...)`` was given one, ``extra`` and its own digest. Only tensors and plain
values go in, so ``torch.load(path, weights_only=True)`` reads it without any allow-list.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, NamedTuple

import torch

from .commit import commit_path, state_path
from .errors import StateError, first_line, shown
from .files import open_regular

FORMAT = "ddpseed.state/3"


_PLAIN = (
    "keep tensors, numbers, strings, None, lists, tuples and dicts, as model.state_dict() "
    "and opt.state_dict() are"
)


class Saved(NamedTuple):
    """What one rank's file of a save holds, verified."""

    state: dict[str, Any]  # the plan's state
    extra: Any  # what save_state(extra=...) kept beside it on that rank, or None


def digest(value: Any) -> str:
    """SHA-256 over a state's structure and bytes (dict order does not matter)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        # reshape: a 0-dim tensor (BatchNorm's num_batches_tracked, Adam's step) has no view.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"{")
        for key in _sorted_keys(value):
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


def _sorted_keys(mapping: dict[Any, Any]) -> list[Any]:
    try:
        return sorted(mapping)
    except TypeError:  # keys of mixed types (1 and "a"): ordered by type, then text
        return sorted(mapping, key=lambda k: (type(k).__name__, json.dumps(k)))


def encode(save: int, token: int, state: dict[str, Any], extra: Any, rank: int) -> bytes:
    """Rank ``rank``'s file of save ``save``: its plan state and ``extra``, each digested.
    Raises :class:`StateError` for an ``extra`` that :func:`read_state` could not read back."""
    payload = {
        "format": FORMAT,
        "save": save,
        "token": token,
        "digest": digest(state),
        "state": state,
    }
    if extra is not None:
        payload.update(extra=extra, extra_digest=_extra_digest(extra, rank))
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    if extra is not None:
        _loads_back(buffer.getvalue(), rank)
    return buffer.getvalue()


def _extra_digest(extra: Any, rank: int) -> str:
    try:
        return digest(extra)
    except (TypeError, ValueError) as exc:  # json.dumps of a value that is no plain value
        raise StateError(
            f"rank {rank}: save_state(extra=...) holds something that is not a tensor or a "
            f"plain value ({first_line(exc)}); {_PLAIN}"
        ) from None


def _loads_back(data: bytes, rank: int) -> None:
    """Refuse a file that load_state could not read: json takes subclasses of float, int and
    str (numpy.float64, an IntEnum) that pickle keeps and weights_only loading refuses, and
    committing such a save would delete the last one that loads."""
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StateError(
            f"rank {rank}: save_state(extra=...) holds a value torch.load(weights_only=True) "
            f"refuses ({type(exc).__name__}: {first_line(exc)[:200]}); {_PLAIN} (float(x) "
            "for a numpy number)"
        ) from None


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
