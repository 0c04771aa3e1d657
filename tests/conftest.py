"""Shared fixtures: a free TCP port, and running launchers end to end.

The launcher tests (test_slurm, test_multinode, test_docker) start real process trees
(torchrun agents, srun tasks, Slurm daemons). Everything here is built so that they can run in
parallel under ``pytest -n auto``: each test gets its own port, processes run in their own
session so one kill reaches the whole tree, every wait has a deadline, and teardown kills what
is left even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import apt_install, netns, ranks, slurm_install

REPO = Path(__file__).resolve().parents[1]
SHARD_ITEMS = 64  # `ddpseed verify` shards a 64-item dataset


@pytest.fixture
def free_port() -> int:
    """A TCP port of this test's own."""
    return ranks.free_port()


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without launcher variables, with ddpseed importable."""
    env = ranks.without_launcher(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHON"] = sys.executable  # the interpreter the launch scripts run torchrun with
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def slurm_installed() -> float:
    """Slurm and munge on PATH, installed with apt-get (under a file lock) if missing; the
    seconds spent installing. Every test that needs a Slurm binary asks for this, so none of
    them depends on another having run first."""
    return slurm_install.ensure_slurm_installed()


@pytest.fixture
def netns_pair() -> Iterator[tuple[netns.Host, netns.Host]]:
    """Two "hosts": network namespaces joined by a veth pair (tests/helpers/netns.py)."""
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


def check_verify(
    reports: Sequence[Mapping[str, Any]],
    *,
    nodes: int,
    per_node: int,
    launcher: str,
    seed: int | None = None,
    static_nodes: bool = True,
) -> None:
    """Every rank agrees and reports the topology its launcher gave it.

    ``static_nodes`` means node ``k`` holds ranks ``k*per_node ...``; with c10d rendezvous the
    node ranks come from arrival order, so only their consistency is checked.
    """
    world = nodes * per_node
    brief = [
        {k: r.get(k) for k in ("rank", "node_rank", "local_rank", "launcher", "base_seed")}
        for r in reports
    ]
    assert [r["rank"] for r in reports] == list(range(world)), brief
    assert all(r["agree"] is True for r in reports), brief
    assert len({r["base_seed"] for r in reports}) == 1, brief
    if seed is not None:
        assert reports[0]["base_seed"] == seed, brief
    assert len({r["process_seed"] for r in reports}) == world, "process seeds must differ"
    places = set()
    for r in reports:
        assert r["launcher"] == launcher, brief
        assert r["world_size"] == world, r
        assert r["local_world_size"] == per_node, r
        assert r["num_nodes"] == nodes, r
        assert 0 <= r["local_rank"] < per_node, r
        assert 0 <= r["node_rank"] < nodes, r
        assert r["rank"] == r["node_rank"] * per_node + r["local_rank"], r
        if static_nodes:
            assert r["node_rank"] == r["rank"] // per_node, r
        places.add((r["node_rank"], r["local_rank"]))
        assert isinstance(r["draws"], dict), r
    assert len(places) == world, f"two ranks claim one (node, local rank): {brief}"
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1, reports
    shards = [list(r["shard"]) for r in reports]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)), f"sampler shards overlap: {shards}"
    assert sorted(flat) == list(range(SHARD_ITEMS)), f"shards do not cover the data: {shards}"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _children(pid: int) -> list[int]:
    """All descendants of ``pid`` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


class ProcessGroup:
    """Starts commands in sessions of their own, waits with deadlines, and kills what is left."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(
        self, name: str, cmd: Sequence[str], env: Mapping[str, str], cwd: Path = REPO
    ) -> Proc:
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(cmd),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_all(self, timeout: float) -> dict[str, tuple[int, str]]:
        """Exit status and output of every process; fails (after killing all) at the deadline.

        The first non-zero exit kills the rest: a failed node leaves the others waiting for it
        in rendezvous until their own, much longer, timeouts.
        """
        deadline = time.monotonic() + timeout
        while any(p.popen.poll() is None for p in self.procs):
            if any(p.popen.returncode not in (None, 0) for p in self.procs):
                break
            if time.monotonic() > deadline:
                running = [p.name for p in self.procs if p.popen.poll() is None]
                self.kill_all()
                pytest.fail(f"{running} still running after {timeout:g}s:\n" + self.dump())
            time.sleep(0.1)
        self.kill_all()
        return {p.name: (p.popen.returncode, p.output()) for p in self.procs}

    def dump(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.output()[-tail:]}" for p in self.procs)

    def kill_all(self, grace: float = 5.0) -> None:
        live = [p for p in self.procs if p.popen.poll() is None]
        pids = {p.popen.pid for p in live}
        for p in live:
            pids.update(_children(p.popen.pid))
        for p in live:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGTERM)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
            for p in live:
                p.popen.poll()  # reap our own children so they do not linger as zombies
            time.sleep(0.05)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Start launcher processes; whatever still runs at teardown is killed."""
    group = ProcessGroup(tmp_path)
    try:
        yield group
    finally:
        group.kill_all()


@pytest.fixture
def launch_env() -> Callable[..., dict[str, str]]:
    """``launch_env(VAR=value, ...)``: a clean environment for a launcher plus those values."""
    return lambda **extra: clean_env({k: str(v) for k, v in extra.items()})


@pytest.fixture
def verify_reports() -> Callable[[str], list[dict[str, Any]]]:
    return ranks.parse_verify


@pytest.fixture
def verify_checker() -> Callable[..., None]:
    return check_verify
