"""Slurm and munge for the tests: found on PATH, else installed once with apt-get.

Shared by tests/test_slurm.py (the live cluster) and tests/test_parsers.py (``scontrol show
hostnames``) through the session fixture ``slurm_installed`` in tests/conftest.py; the
file-locked install itself is tests/helpers/apt_install.py.
"""

from __future__ import annotations

from helpers import apt_install

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged")


def missing() -> list[str]:
    return apt_install.missing(BINARIES)


def ensure_slurm_installed() -> float:
    """Install Slurm and munge with apt-get unless present; seconds spent installing."""
    return apt_install.ensure_installed("Slurm", PACKAGES, BINARIES)
