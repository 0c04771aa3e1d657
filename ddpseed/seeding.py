"""Side effects: seeding, capturing and restoring the global RNGs; deterministic kernels.

The arithmetic lives in :mod:`ddpseed.derivation`; this module only applies its results.
Captured states hold only tensors and plain values, so ``torch.load(weights_only=True)``
reads them without an allow-list.

    >>> seed_process(7, cuda_device=None)
    >>> import random; random.random() == __import__("random").Random(7).random()
    True
"""

from __future__ import annotations

import logging
import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from .errors import TopologyError

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"
ENV_DETERMINISTIC = "DDPSEED_DETERMINISTIC"


def seed_cpu(seed: int) -> None:
    """Seed ``random``, NumPy's global RNG and torch's CPU generator (not CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed would also seed *every* CUDA device; other ranks own those.
    torch.default_generator.manual_seed(seed)


def seed_worker_rngs(seed: int) -> None:
    """Seed a DataLoader worker's RNGs: the CPU ones, and CUDA's if the worker started it.

    Not ``torch.manual_seed``: it also walks every accelerator backend (about 100 us against
    1 us), and a worker reseeds at every batch.
    """
    seed_cpu(seed)
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.manual_seed_all(seed)


def capture_cpu_rngs() -> tuple[Any, Any, torch.Tensor]:
    """The CPU RNG states as the libraries give them (in memory only, not for a file)."""
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def restore_cpu_rngs(saved: tuple[Any, Any, torch.Tensor]) -> None:
    """Put back what :func:`capture_cpu_rngs` returned."""
    python, numpy, torch_state = saved
    random.setstate(python)
    np.random.set_state(numpy)
    torch.set_rng_state(torch_state)


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
    """Put back what :func:`capture_rngs` returned."""
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


def local_cuda_device(local_rank: int) -> int | None:
    """The CUDA device index this rank owns, or None on a machine without CUDA.

    One visible GPU is this process's whatever its local rank: ``srun --gpus-per-task=1`` (or
    ``--gpu-bind``) shows each task its own GPU as device 0 while ``SLURM_LOCALID`` counts
    0..n-1. With several visible, local rank k owns device k.
    """
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank >= count:
        raise TopologyError(
            f"local rank {local_rank} has no GPU: only {count} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "start at most one process per visible GPU (--nproc_per_node / --gpus-per-task)"
        )
    return local_rank


def cuda_device_or_error(local_rank: int, rank: int) -> tuple[int | None, str]:
    """:func:`local_cuda_device`, or None and its error (for setup() to tell every rank)."""
    try:
        return local_cuda_device(local_rank), ""
    except TopologyError as exc:
        return None, f"rank {rank}: {exc}"


def seed_cuda(seed: int, device: int) -> None:
    """Seed the CUDA generator of ``device`` only, and make it this process's current device."""
    torch.cuda.set_device(device)
    # Lazy until CUDA starts; set_device above pins which generator it will reach.
    torch.cuda.manual_seed(seed)


def seed_process(seed: int, *, cuda_device: int | None) -> None:
    """Seed every RNG of this process: CPU ones, and CUDA on ``cuda_device`` alone."""
    seed_cpu(seed)
    if cuda_device is not None:
        seed_cuda(seed, cuda_device)


_ON, _OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def determinism_setting(value: object, rank: int) -> tuple[bool, str]:
    """(whether to enable determinism, the error of a bad setting or ''): ``deterministic=``
    must be a bool; ``DDPSEED_DETERMINISTIC`` one of the words below. Not bool(value): the
    string "false" would be True, and a typo in the variable would quietly mean off."""
    if value is not None:
        if isinstance(value, bool):
            return value, ""
        return False, (
            f"rank {rank}: deterministic={value!r} is of type {type(value).__name__}; pass True or "
            "False (or None to read DDPSEED_DETERMINISTIC)"
        )
    raw = os.environ.get(ENV_DETERMINISTIC, "")
    word = raw.strip().lower()
    if word in _ON or word in _OFF:
        return word in _ON, ""
    return False, (
        f"rank {rank}: {ENV_DETERMINISTIC}={raw!r} is neither on ({', '.join(_ON)}) nor off "
        f"({', '.join(repr(w) for w in _OFF)}); set one of them"
    )


def enable_determinism() -> list[str]:
    """Turn on deterministic kernels; returns the flags set (for the manifest)."""
    flags: list[str] = []
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            warnings.warn(
                "CUDA is already initialised, so CUBLAS_WORKSPACE_CONFIG set now may not take "
                "effect; call ddpseed.setup(deterministic=True) before any CUDA work, or export "
                f"CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} in the launcher",
                RuntimeWarning,
                stacklevel=3,
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    flags.append(f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    flags += ["torch.backends.cudnn.deterministic=True", "torch.backends.cudnn.benchmark=False"]
    torch.use_deterministic_algorithms(True)
    flags.append("torch.use_deterministic_algorithms(True)")
    hashseed = os.environ.get("PYTHONHASHSEED")
    if hashseed in (None, "", "random"):
        warnings.warn(
            "PYTHONHASHSEED is not fixed, so set/dict-of-str iteration order differs between "
            "runs; export PYTHONHASHSEED=0 in the launcher (it must be set before Python starts)",
            RuntimeWarning,
            stacklevel=3,
        )
    else:
        flags.append(f"PYTHONHASHSEED={hashseed}")
    log.info("deterministic mode: %s", ", ".join(flags))
    return flags
