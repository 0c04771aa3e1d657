"""Slurm and munge for the tests: found on PATH, else installed once with apt-get.

Shared by tests/test_slurm.py (the live cluster) and tests/test_parsers.py (``scontrol show
hostnames``) through the session fixture ``slurm_installed`` in tests/conftest.py, so which of
them runs first does not decide whether the other skips. Under pytest-xdist every worker has
its own session; an exclusive lock on one file serialises apt-get across workers (and across
concurrent pytest runs on the machine), and whoever gets it second finds Slurm installed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged")
INSTALL_LOCK = Path(tempfile.gettempdir()) / "ddpseed-test-slurm-install.lock"


def _run(cmd: Sequence[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def ensure_slurm_installed() -> float:
    """Install Slurm and munge with apt-get unless present; seconds spent installing.

    Skips (with the reason) only where installing is impossible: not root, or no apt-get.
    """
    if not missing():
        return 0.0
    if os.geteuid() != 0:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing())} missing) and installing it needs root"
        )
    if shutil.which("apt-get") is None:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing())} missing) and there is no "
            "apt-get to install it"
        )
    started = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "-o",
        "DPkg::Lock::Timeout=300",
        "--no-install-recommends",
        *PACKAGES,
    ]
    with INSTALL_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time across xdist workers
        if missing():
            done = _run(install, timeout=900, env=env)
            if done.returncode != 0:  # stale package lists on a fresh machine
                _run(["apt-get", "update", "-q"], timeout=600, env=env)
                done = _run(install, timeout=900, env=env)
            assert done.returncode == 0, (
                f"apt-get install failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
    assert not missing(), f"still missing after install: {missing()}"
    return time.monotonic() - started
