"""RNG state as tensors and plain values, and its safe on-disk form.

A state dict holds only tensors, ints, floats, strings, None, lists and dicts, so
``torch.load(path, weights_only=True)`` reads it without any allow-list. Each rank writes its
own file (``save_state("ckpt/rng.pt", plan)`` writes ``ckpt/rng.rank0.pt``,
``ckpt/rng.rank1.pt``, ...; put ``{rank}`` in the path to place it yourself). Files are written
atomically and carry a SHA-256 digest of their content, so a torn or corrupted file is refused
by name instead of resuming from garbage.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .coordinator import share_errors
from .errors import StateError, first_line
from .files import atomic_write_bytes, open_regular

if TYPE_CHECKING:
    from .plan import SeedPlan

FORMAT = "ddpseed.state/1"


def capture_rngs(cuda_device: int | None) -> dict[str, Any]:
    """This process's RNG states: Python, NumPy global, torch CPU and this rank's CUDA device."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if cuda_device is not None:
        state["cuda"] = {"device": cuda_device, "state": torch.cuda.get_rng_state(cuda_device)}
    return state


def restore_rngs(state: dict[str, Any], cuda_device: int | None) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and cuda_device is not None:
        torch.cuda.set_rng_state(cuda["state"], cuda_device)


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


def state_path(path: str | os.PathLike[str], rank: int) -> Path:
    """Where rank ``rank``'s state goes.

    >>> str(state_path("ckpt/rng.pt", 3))
    'ckpt/rng.rank3.pt'
    >>> str(state_path("ckpt/{rank}/rng.pt", 3))
    'ckpt/3/rng.pt'
    """
    text = os.fspath(path)
    if "{rank}" in text:
        return Path(text.replace("{rank}", str(rank)))
    p = Path(text)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def save_state(path: str | os.PathLike[str], plan: SeedPlan) -> Path:
    """Atomically write this rank's ``plan.state_dict()``; returns the file written.

    Collective when the job is distributed: if any rank cannot write (disk full, read-only
    directory), every rank raises :class:`StateError` naming it. A rank that failed keeps its
    previous file; ranks that succeeded have already replaced theirs.
    """
    target = state_path(path, plan.rank)
    error = None
    try:
        state = plan.state_dict()
        payload = {"format": FORMAT, "digest": digest(state), "state": state}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        atomic_write_bytes(target, buffer.getvalue(), what=f"rank {plan.rank} RNG state")
    except StateError as exc:
        error = str(exc)
    _raise_shared(error, plan, f"saving {path}", "ranks not listed replaced their files")
    return target


def _raise_shared(error: str | None, plan: SeedPlan, what: str, outcome: str) -> None:
    failures = share_errors(error, plan.topology, plan.timeout, what)
    if failures:
        raise StateError(
            f"{what} failed on {len(failures)} of {plan.world_size} ranks; {outcome}:\n"
            + "\n".join(f"  {line}" for line in failures)
        )


def read_state(path: str | os.PathLike[str], rank: int) -> dict[str, Any]:
    """Load and verify rank ``rank``'s state file; raises :class:`StateError` naming the file."""
    target = state_path(path, rank)
    try:
        with open_regular(target, f"rank {rank}: state file") as fh:
            payload = torch.load(fh, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StateError(
            f"rank {rank}: state file {target} does not exist; pass the path given to "
            "save_state (the rank suffix is added for you), or start fresh"
        ) from None
    except StateError:
        raise
    except Exception as exc:
        raise StateError(
            f"rank {rank}: state file {target} is truncated or not a ddpseed state file "
            f"({type(exc).__name__}: {first_line(exc)[:200]}); "
            "resume from an earlier checkpoint"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise StateError(
            f"rank {rank}: {target} is not a ddpseed state file (format {found!r}, expected "
            f"{FORMAT!r})"
        )
    state = payload.get("state")
    if digest(state) != payload.get("digest"):
        raise StateError(
            f"rank {rank}: state file {target} is corrupted (its SHA-256 digest does not match "
            "its content); resume from an earlier checkpoint"
        )
    assert isinstance(state, dict)
    return state


def load_state(path: str | os.PathLike[str], plan: SeedPlan) -> None:
    """Restore this rank's RNGs, epoch and data position from ``save_state``'s file.

    Every rank validates its file first; only if all of them are sound does any rank restore,
    so one torn file stops the whole job with the same error instead of half a resume.
    """
    source = str(state_path(path, plan.rank))
    error, state = None, None
    try:
        state = read_state(path, plan.rank)
        plan.check_state(state, source=source)
    except StateError as exc:
        error = str(exc)
    _raise_shared(error, plan, f"loading {path}", "nothing was changed")
    assert state is not None
    plan.load_state_dict(state, source=source)
