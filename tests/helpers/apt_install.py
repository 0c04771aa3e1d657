"""Debian packages for the tests: found on PATH, else installed once with apt-get.

Shared by the launcher fixtures in tests/conftest.py (``slurm_installed``,
``openmpi_installed``, ``mpich_installed``), so which test runs first never decides whether
another skips. Under pytest-xdist every worker has its own session; an exclusive lock on one
file serialises apt-get across workers (and across concurrent pytest runs on the machine), and
whoever gets it second finds the package installed.
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

INSTALL_LOCK = Path(tempfile.gettempdir()) / "ddpseed-test-apt-install.lock"


def _run(cmd: Sequence[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


def missing(binaries: Sequence[str]) -> list[str]:
    return [b for b in binaries if shutil.which(b) is None]


def ensure_installed(what: str, packages: Sequence[str], binaries: Sequence[str]) -> float:
    """Install ``packages`` with apt-get unless every one of ``binaries`` is on PATH; the
    seconds spent installing.

    Skips (with the reason) only where installing is impossible: not root, or no apt-get.
    """
    if not missing(binaries):
        return 0.0
    absent = ", ".join(missing(binaries))
    if os.geteuid() != 0:
        pytest.skip(f"{what} is not installed ({absent} missing) and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip(
            f"{what} is not installed ({absent} missing) and there is no apt-get to install it"
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
        *packages,
    ]
    with INSTALL_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one installer at a time across xdist workers
        if missing(binaries):
            done = _run(install, timeout=900, env=env)
            if done.returncode != 0:  # stale package lists on a fresh machine
                _run(["apt-get", "update", "-q"], timeout=600, env=env)
                done = _run(install, timeout=900, env=env)
            assert done.returncode == 0, (
                f"apt-get install {' '.join(packages)} failed:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
    assert not missing(binaries), f"{what}: still missing after install: {missing(binaries)}"
    return time.monotonic() - started
