"""The suite's own process helpers (tests/helpers/procs.py) do what every other test relies on:
a child sees no launcher, ports are not handed out twice, and a kill ends a whole tree within
its bound. Real processes throughout."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddpseed.topology import LAUNCHER_VARIABLES
from helpers.procs import (
    LAUNCH_SCRIPT_VARIABLES,
    REPO,
    ProcessGroup,
    clean_env,
    free_port,
    kill_tree,
    processes_carrying,
)


def test_clean_env_drops_every_launcher_launch_setting_and_ddpseed_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [*LAUNCHER_VARIABLES, "NPROC_PER_NODE", "DDPSEED_RUN_DIR", "DDPSEED_ANYTHING"]:
        monkeypatch.setenv(name, "7")
    # read from the launch/ scripts, not listed by hand: a new setting is dropped by itself
    assert {"NPROC_PER_NODE", "RDZV", "MPIRUN_EXTRA_ARGS", "PPN", "SUBNET"} <= (
        LAUNCH_SCRIPT_VARIABLES
    )
    env = clean_env({"RANK": 3}, WORLD_SIZE=4)
    assert not {k for k in env if k.startswith("DDPSEED_")}
    assert not set(env) & (LAUNCHER_VARIABLES - {"RANK", "WORLD_SIZE"})
    assert not set(env) & LAUNCH_SCRIPT_VARIABLES
    assert (env["RANK"], env["WORLD_SIZE"], env["OMP_NUM_THREADS"]) == ("3", "4", "1")
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_free_port_is_never_handed_out_twice() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50


def _tree_script(token: str, ignore_term: bool) -> str:
    """A leader that starts a grandchild in its process group, then exits (like a rank whose
    data-loader worker lingers) or waits; the grandchild may ignore SIGTERM."""
    child = (
        "import signal, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        + "time.sleep(300)\n"
    )
    return (
        "import subprocess, sys\n"
        f"subprocess.Popen([sys.executable, '-c', {child!r}, {token!r}])\n"
        "print('started', flush=True)\n"
        "sys.stdin.read() if len(sys.argv) > 1 else None\n"
    )


@pytest.mark.parametrize("ignore_term", [False, True])
@pytest.mark.parametrize("leader_exits", [True, False])
def test_kill_tree_ends_the_group_within_its_bound(
    ignore_term: bool, leader_exits: bool, tmp_path: Path
) -> None:
    token = f"ddpseed-procs-{tmp_path.name}"
    args = [sys.executable, "-c", _tree_script(token, ignore_term)]
    if not leader_exits:
        args.append("wait")
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=clean_env(),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    if leader_exits:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    assert processes_carrying(token), "the grandchild should be running"
    started = time.monotonic()
    kill_tree([proc], grace=1.0)
    assert time.monotonic() - started < 15
    deadline = time.monotonic() + 10  # SIGKILL is delivered, reaping by init may lag
    while processes_carrying(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_carrying(token) == []
    assert proc.poll() is not None


def test_process_group_fails_at_its_deadline_and_leaves_nothing(tmp_path: Path) -> None:
    token = f"ddpseed-group-{tmp_path.name}"
    group = ProcessGroup(tmp_path)
    cmd = [sys.executable, "-c", "import time; time.sleep(300)", token]
    group.start("sleeper", cmd, clean_env())
    with pytest.raises(pytest.fail.Exception, match=r"still running after 0\.5s"):
        group.wait_all(timeout=0.5)
    assert processes_carrying(token) == []
