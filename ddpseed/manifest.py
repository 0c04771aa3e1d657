"""The run manifest: everything that determined a run's randomness, as JSON-able values."""

from __future__ import annotations

import dataclasses
import platform
import socket
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .derivation import rule

if TYPE_CHECKING:
    from .plan import SeedPlan


def manifest(plan: SeedPlan) -> dict[str, Any]:
    """What ``run_dir``'s manifest records of ``plan`` (see :meth:`SeedPlan.manifest`)."""
    return {
        "base_seed": plan.base_seed,
        "seed_source": plan.seed_source,
        "scheme": plan.scheme,
        "rule": rule(plan.scheme),
        "topology": dataclasses.asdict(plan.topology),
        "process_seed": plan.process_seed,
        "cuda_device": plan.cuda_device,
        "deterministic": list(plan.deterministic),
        "run_dir": str(plan.run_dir) if plan.run_dir else None,
        "mesh": plan.mesh.record() if plan.mesh is not None else None,
        "versions": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
