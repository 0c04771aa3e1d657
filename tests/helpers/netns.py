"""Two "hosts" on one machine: Linux network namespaces joined by a veth pair.

The ``netns_pair`` fixture (registered in tests/conftest.py) is shared by the multi-node
torchrun tests (tests/test_multinode.py) and the multi-host mpirun tests (tests/test_mpi.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

IFNAME = "ddp0"
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
    for pid in listed.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)


def netns_pair() -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair, addressed 10.x.y.{1,2}/30; removed afterwards."""
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    n = next(_counter)
    tag = f"ddpseed-{worker}-{os.getpid()}-{n}"
    # A /30 of 10.64.0.0/10 picked from (pid, counter), so concurrent tests use different ones.
    block = ((os.getpid() << 6) | (n & 63)) % (1 << 20)
    base = (10 << 24) | (64 << 16) | (block << 2)

    def addr(host: int) -> str:
        value = base + host
        return ".".join(str((value >> s) & 255) for s in (24, 16, 8, 0))

    hosts = (Host(f"{tag}-a", addr(1)), Host(f"{tag}-b", addr(2)))
    created: list[str] = []
    try:
        for host in hosts:
            done = _ip("netns", "add", host.ns)
            assert done.returncode == 0, done.stderr
            created.append(host.ns)
        setup = [
            (
                "link",
                "add",
                "name",
                IFNAME,
                "netns",
                hosts[0].ns,
                "type",
                "veth",
                "peer",
                "name",
                IFNAME,
                "netns",
                hosts[1].ns,
            ),
        ]
        for host in hosts:
            setup += [
                ("-n", host.ns, "link", "set", "lo", "up"),
                ("-n", host.ns, "addr", "add", f"{host.addr}/30", "dev", IFNAME),
                ("-n", host.ns, "link", "set", IFNAME, "up"),
            ]
        for args in setup:
            done = _ip(*args)
            assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr}"
        yield hosts
    finally:
        for ns in created:
            _kill_namespace_processes(ns)
            _ip("netns", "delete", ns)  # takes the veth pair with it
