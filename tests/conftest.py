"""Shared fixtures: a free TCP port, installed launchers, and running launchers end to end.

The launcher tests (test_slurm, test_multinode, test_mpi, test_docker) start real process trees
(torchrun agents, srun tasks, mpirun daemons, Slurm daemons). Everything is built so that they
can run in parallel under ``pytest -n auto``: each test gets its own port, processes run in
their own session so one kill reaches the whole tree, every wait has a deadline, and teardown
kills what is left even when the test failed. The machinery is in tests/helpers/procs.py
(environments, ports, processes) and tests/helpers/ranks.py (ranks, verify reports).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import apt_install, netns, ranks, slurm_install
from helpers.procs import ProcessGroup, clean_env, free_port


@pytest.fixture(name="free_port")
def port_of_this_test() -> int:
    """``free_port``: a TCP port of this test's own (tests/helpers/procs.py)."""
    return free_port()


@pytest.fixture(scope="session")
def slurm_installed() -> float:
    """Slurm and munge on PATH, installed with apt-get (under a file lock) if missing; the
    seconds spent installing. Every test that needs a Slurm binary asks for this, so none of
    them depends on another having run first."""
    return slurm_install.ensure_slurm_installed()


@pytest.fixture
def netns_pair() -> Iterator[tuple[netns.Host, netns.Host]]:
    """Two "hosts": network namespaces joined through a bridge (tests/helpers/netns.py)."""
    yield from netns.netns_pair()


@pytest.fixture(scope="session")
def openmpi_installed() -> str:
    """Open MPI's ``mpirun`` (Debian's ``openmpi-bin``), installed like Slurm if missing. The
    path is Open MPI's own name for it: with MPICH installed too, plain ``mpirun`` is
    whichever the alternatives system picked."""
    apt_install.ensure_installed("Open MPI", ("openmpi-bin",), ("mpirun.openmpi",))
    return "mpirun.openmpi"


@pytest.fixture(scope="session")
def mpich_installed() -> str:
    """MPICH's Hydra ``mpiexec`` (Debian's ``mpich``, which installs beside Open MPI: both
    register ``mpirun``/``mpiexec`` with update-alternatives)."""
    apt_install.ensure_installed("MPICH", ("mpich",), ("mpiexec.mpich",))
    return "mpiexec.mpich"


@pytest.fixture(scope="session")
def verify_command() -> list[str]:
    """What every rank runs: ``python -m ddpseed verify --json`` (interpreter included)."""
    return [sys.executable, "-m", "ddpseed", "verify", "--json"]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Start launcher processes; whatever still runs at teardown is killed (bounded)."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.kill_all()


@pytest.fixture
def launch_env() -> Callable[..., dict[str, str]]:
    """``launch_env(VAR=value, ...)``: a clean environment for a launch script (run with this
    interpreter, ``PYTHON``) plus those values."""
    return lambda **extra: clean_env({"PYTHON": sys.executable, **extra})


@pytest.fixture
def verify_reports() -> Callable[[str], list[dict[str, Any]]]:
    return ranks.parse_verify


@pytest.fixture
def verify_checker() -> Callable[..., None]:
    return ranks.check_verify
