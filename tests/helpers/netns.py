"""Two "hosts" on one machine: Linux network namespaces joined through a bridge (veth pairs).

The ``netns_pair`` fixture (registered in tests/conftest.py) is shared by the multi-node
torchrun tests (tests/test_multinode.py) and the multi-host mpirun tests (tests/test_mpi.py).
The namespaces are made by the same bash function as launch/local_multinode.sh's.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from helpers.procs import REPO, stop_pids

IFNAME = "ddp0"
LIB_SH = REPO / "launch" / "lib.sh"
# Runs ddpseed_netns_hosts and prints the namespaces it made, also those of a failed attempt.
BUILD = (
    'source "$0"; NAMESPACES=(); ddpseed_netns_hosts "$@"; rc=$?; echo "${NAMESPACES[@]}"; exit $rc'
)
_counter = itertools.count()


@dataclass(frozen=True)
class Host:
    ns: str
    addr: str


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=False)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed (apt-get install iproute2)"
    probe = f"ddpseed-probe-{os.getpid()}"
    made = _ip("netns", "add", probe)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    _ip("netns", "delete", probe)
    return None


def _kill_namespace_processes(ns: str) -> None:
    listed = _ip("netns", "pids", ns)
    stop_pids([int(pid) for pid in listed.stdout.split() if pid.isdigit()], grace=0)


def netns_pair() -> Iterator[tuple[Host, Host]]:
    """Two hosts, built by launch/lib.sh's ``ddpseed_netns_hosts`` (what local_multinode.sh
    uses): namespaces ``<tag>n0``/``<tag>n1`` at ``<subnet>.1``/``.2`` on ``ddp0``, joined
    through a bridge namespace; removed afterwards with every process left in them."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    n = next(_counter)
    tag = f"ddpseed-{worker}-{os.getpid()}-{n}-"
    # A /24 of 10.64.0.0/10 picked from (pid, counter), so concurrent tests use different ones
    # (local_multinode.sh picks from 10.200.0.0/16 - 10.249.255.0).
    block = ((os.getpid() << 6) | (n & 63)) % (1 << 14)
    subnet = f"10.{64 + (block >> 8)}.{block & 255}"
    created: list[str] = []
    try:
        made = subprocess.run(
            ["bash", "-c", BUILD, str(LIB_SH), tag, subnet, "2"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        created = made.stdout.split()
        assert made.returncode == 0, f"ddpseed_netns_hosts failed: {made.stderr}"
        yield Host(f"{tag}n0", f"{subnet}.1"), Host(f"{tag}n1", f"{subnet}.2")
    finally:
        for ns in created:
            _kill_namespace_processes(ns)
            _ip("netns", "delete", ns)  # takes its interfaces with it
