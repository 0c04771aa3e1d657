"""The run directory: where a base seed drawn from entropy survives a restart.

Rank 0 keeps ``seed.json`` (the base seed and where it came from) and ``manifest.json``
(everything that determined the run's randomness). A restarted job that finds ``seed.json``
reuses its seed instead of drawing a new one, so torchrun's ``--max-restarts`` and Slurm's
requeue continue the same random streams.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .derivation import validate_seed
from .errors import SeedValueError, StateError
from .files import atomic_write_json
from .topology import Topology

SEED_FILE = "seed.json"
MANIFEST_FILE = "manifest.json"


def resolve_run_dir(run_dir: str | os.PathLike[str] | None, topo: Topology) -> Path | None:
    """The run directory: the argument, ``DDPSEED_RUN_DIR``, or one named by the launcher's
    job id (torchrun's rdzv id, Slurm's job id) under ``~/.cache/ddpseed/runs``."""
    if run_dir is not None:
        return Path(run_dir)
    if os.environ.get("DDPSEED_RUN_DIR"):
        return Path(os.environ["DDPSEED_RUN_DIR"])
    if topo.run_id:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return cache / "ddpseed" / "runs" / topo.run_id
    return None


def read_seed_record(run_dir: Path) -> int | None:
    """The base seed recorded in ``run_dir``, or None if there is none yet."""
    path = run_dir / SEED_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read seed record {path}: {exc}") from exc
    try:
        data = json.loads(text)
        return validate_seed(data["base_seed"], source=f"{path}: base_seed")
    except SeedValueError as exc:  # a ValueError too, so it must be caught first
        raise StateError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"seed record {path} is corrupted ({type(exc).__name__}: {exc}); restore it from "
            "a backup, or delete it to draw a new seed (the run will not continue the old one)"
        ) from None


def write_seed_record(run_dir: Path, base_seed: int, source: str) -> None:
    atomic_write_json(
        run_dir / SEED_FILE, {"base_seed": base_seed, "source": source}, what="seed record"
    )
