"""Side effects: seeding the global RNGs and switching on deterministic kernels.

The arithmetic lives in :mod:`ddpseed.derivation`; this module only applies its results.

    >>> seed_process(7, cuda_device=None)
    >>> import random; random.random() == __import__("random").Random(7).random()
    True
"""

from __future__ import annotations

import logging
import os
import random
import warnings

import numpy as np
import torch

from .errors import TopologyError

log = logging.getLogger(__name__)

CUBLAS_WORKSPACE = ":4096:8"


def seed_cpu(seed: int) -> None:
    """Seed ``random``, NumPy's global RNG and torch's CPU generator (not CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed would also seed *every* CUDA device; other ranks own those.
    torch.default_generator.manual_seed(seed)


def local_cuda_device(local_rank: int) -> int | None:
    """The CUDA device index this rank owns, or None on a machine without CUDA."""
    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise TopologyError(
            f"local rank {local_rank} has no GPU: only {count} visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); "
            "start at most one process per visible GPU (--nproc_per_node / --gpus-per-task)"
        )
    return local_rank


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
