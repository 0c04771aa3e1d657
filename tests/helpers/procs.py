"""Processes, environments and ports for every test: the one place the suite gets them.

- ``REPO``: the checkout under test (child processes import ddpseed from it).
- ``clean_env``: this process's environment without any launcher's variables, with ddpseed
  importable. The suite may itself run inside torchrun, Slurm, mpirun or a batch job, so a
  child sees only the launcher variables its test passes.
- ``free_port``: a TCP port of the test's own (for its rendezvous store).
- ``ProcessGroup``: start commands in sessions of their own, wait with deadlines.
- ``kill_tree`` / ``stop_pids``: end what a test started, with a bounded wait.

tests/helpers/ranks.py starts ranks (env:// and torchrun) on top of these.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddpseed.topology import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[2]

# The settings of the launch/ scripts, read from the scripts themselves (every `${NAME:-...}`,
# `${NAME+...}`, ...), plus the interfaces gloo and NCCL bind to, which they set for nodes.
LAUNCH_SCRIPT_VARIABLES: frozenset[str] = frozenset(
    re.findall(
        r"\$\{([A-Z][A-Z0-9_]*):?[-+=?]",
        "".join(p.read_text() for p in sorted((REPO / "launch").iterdir()) if p.is_file()),
    )
) | {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"}
# Every variable ddpseed reads (its one list) and every launch/ setting; DDPSEED_* by prefix.
DROPPED = LAUNCHER_VARIABLES | LAUNCH_SCRIPT_VARIABLES
DROPPED_PREFIXES = ("DDPSEED_",)


def without_launcher(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without launcher variables, launch/ settings and ddpseed's own settings."""
    return {
        k: v for k, v in environ.items() if k not in DROPPED and not k.startswith(DROPPED_PREFIXES)
    }


def clean_env(extra: Mapping[str, object] | None = None, /, **more: object) -> dict[str, str]:
    """A child's environment: ``without_launcher(os.environ)``, ddpseed importable from REPO,
    unbuffered output, one OpenMP thread (the machine's cores are shared by parallel tests),
    then ``extra`` and ``more`` (values turned into strings)."""
    env = without_launcher(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in {**(extra or {}), **more}.items()})
    return env


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice for port 0), never the same one
    twice in this process: two stores of one test (or of two tests of one worker) must not
    meet. The kernel's ephemeral range lies above the 10000-30000 of ports derived from job
    ids, so these do not collide with the launchers' own choices either."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


# -- ending processes -------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
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


def _signal(pid: int, sig: int, *, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        (os.killpg if group else os.kill)(pid, sig)


def _alive(pid: int, *, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return group or not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Exited, waiting for its parent to reap it (or gone since)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def stop_pids(
    pids: Collection[int],
    *,
    groups: Collection[int] = (),
    grace: float = 5.0,
    reap: Sequence[subprocess.Popen[bytes]] | Sequence[subprocess.Popen[str]] = (),
) -> None:
    """SIGTERM ``pids`` and the process groups ``groups``, wait up to ``grace`` seconds for
    them to go (reaping ``reap``, our own children), then SIGKILL what is left. ``grace=0``
    kills at once (a process that already missed its deadline)."""
    if grace > 0:
        for pgid in groups:
            _signal(pgid, signal.SIGTERM, group=True)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            for proc in reap:
                proc.poll()
            if not any(_alive(p) for p in pids) and not any(_alive(g, group=True) for g in groups):
                break
            time.sleep(0.05)
    for pgid in groups:
        _signal(pgid, signal.SIGKILL, group=True)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def kill_tree(
    procs: Iterable[subprocess.Popen[bytes]] | Iterable[subprocess.Popen[str]],
    grace: float = 5.0,
) -> None:
    """End processes started with ``start_new_session=True``, their process groups (which
    outlive a leader that exited: a rank's data-loader workers) and every live descendant
    (a launcher's children may start sessions of their own), then reap them; bounded."""
    popens = list(procs)
    pids: set[int] = set()
    for proc in popens:
        if proc.poll() is None:
            pids.update((proc.pid, *descendants(proc.pid)))
    stop_pids(pids, groups=[p.pid for p in popens], grace=grace, reap=popens)
    for proc in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def processes_carrying(token: str) -> list[int]:
    """Pids whose command line or environment holds ``token`` (what one test case started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(token.encode() in (proc / f).read_bytes() for f in ("cmdline", "environ")):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


# -- a test's processes -----------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class ProcessGroup:
    """Starts commands in sessions of their own, waits with deadlines, and kills what is left
    (the ``procs`` fixture, which also kills at teardown)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        cmd: Sequence[str],
        env: Mapping[str, str],
        cwd: Path = REPO,
        *,
        stdin_pipe: bool = False,
    ) -> Proc:
        """Start ``cmd``; ``stdin_pipe`` gives it a stdin the test writes or closes."""
        log = self.logdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(cmd),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def wait_for_output(self, proc: Proc, text: str, timeout: float) -> str:
        """``proc``'s output once it holds ``text``; fails (after killing all) at the deadline
        or when ``proc`` exits without it."""
        deadline = time.monotonic() + timeout
        while text not in (output := proc.output()):
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                self.kill_all()
                pytest.fail(f"{proc.name} never printed {text!r}:\n" + self.dump())
            time.sleep(0.05)  # poll interval
        return output

    def wait_exit(self, proc: Proc, timeout: float) -> tuple[int, str]:
        """``proc``'s exit status and output; fails (after killing all) at the deadline."""
        try:
            code = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            pytest.fail(f"{proc.name} still running after {timeout:g}s:\n" + self.dump())
        return code, proc.output()

    def wait_all(
        self, timeout: float, *, stop_at_failure: bool = True
    ) -> dict[str, tuple[int, str]]:
        """Exit status and output of every process; fails (after killing all) at the deadline.

        The first non-zero exit kills the rest: a failed node leaves the others waiting for it
        in rendezvous until their own, much longer, timeouts. ``stop_at_failure=False`` waits
        for every process (a test of how each one fails).
        """
        deadline = time.monotonic() + timeout
        while any(p.popen.poll() is None for p in self.procs):
            if stop_at_failure and any(p.popen.returncode not in (None, 0) for p in self.procs):
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
        for proc in self.procs:
            if proc.popen.stdin is not None:
                proc.popen.stdin.close()
        kill_tree([p.popen for p in self.procs], grace)
