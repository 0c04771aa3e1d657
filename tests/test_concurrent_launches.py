"""Two launches on one node, as real processes: srun steps of one Slurm job emulated by their
variables (a sweep: `srun --exact -n2 python train.py --lr $lr &` twice in one allocation).

Each step derives a port of its own from the job and step ids; where two launches still meet at
one port (a MASTER_PORT exported to both), the group's start-up check compares every rank's
launch through the rendezvous store, before gloo connects, and every process stops naming both
launches instead of joining a group of strangers. Also here: per-rank start-up errors (a local
rank with no GPU, mocked) reaching every rank at once through that check.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ddpseed.launchers import job_port
from helpers.procs import REPO, Proc, ProcessGroup, clean_env

STEP_RANK = REPO / "tests" / "helpers" / "step_rank.py"
MARKER = "STEP_RANK "
TIMEOUT = 20.0  # each rank's setup timeout
DEADLINE = 150.0  # what a case may take on a loaded 2-core machine before it counts as hung


def free_job() -> int:
    """A Slurm job id whose steps 0 and 1 derive ports nothing listens on now (derived ports
    cannot come from free_port, whose ephemeral range lies above them)."""
    rng = random.SystemRandom()
    while True:
        job = rng.randrange(10**6, 10**7)
        ports = {job_port(str(job), str(step)) for step in (0, 1)}
        if len(ports) == 2 and all(_unused(p) for p in ports):
            return job


def _unused(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def task_env(job: int, step: int, task: int, tmp: Path, **extra: object) -> dict[str, str]:
    """Task ``task`` of a 2-task srun step ``step`` of ``job`` on one node, as srun sets it."""
    return clean_env(
        {
            "SLURM_JOB_ID": job,
            "SLURM_STEP_ID": step,
            "SLURM_PROCID": task,
            "SLURM_LOCALID": task,
            "SLURM_NODEID": 0,
            "SLURM_STEP_NUM_TASKS": 2,
            "SLURM_STEP_NUM_NODES": 1,
            "SLURM_STEP_TASKS_PER_NODE": 2,
            "SLURM_STEP_NODELIST": "localhost",
            "SLURM_JOB_NODELIST": "localhost",
            "MASTER_ADDR": "127.0.0.1",  # as launch/slurm_srun.sbatch exports it
            "TAG": f"step{step}/task{task}",
            "TIMEOUT": TIMEOUT,
            "XDG_CACHE_HOME": tmp / "cache",
        },
        **extra,
    )


def start_step(
    procs: ProcessGroup, job: int, step: int, tmp: Path, *, hold: bool = False, **extra: object
) -> list[Proc]:
    env = {"HOLD": "1"} if hold else {}
    return [
        procs.start(
            f"step{step}-task{task}",
            [sys.executable, str(STEP_RANK)],
            task_env(job, step, task, tmp, **env, **extra),
            stdin_pipe=hold,
        )
        for task in (0, 1)
    ]


def report(output: str) -> dict[str, Any]:
    lines = [line for line in output.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, output[-4000:]
    found: dict[str, Any] = json.loads(lines[0][len(MARKER) :])
    return found


def error(output: str) -> str:
    at = output.find("DDPSEED_ERROR ")
    assert at >= 0, output[-4000:]
    return output[at:]


def elapsed(output: str) -> float:
    return float(next(ln.split()[1] for ln in output.splitlines() if ln.startswith("ELAPSED ")))


def test_two_srun_steps_of_one_job_on_one_node_get_ports_of_their_own(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """Before: both steps derived 10000 + job % 20000 and met there; in 3 of 4 trials one task
    of each formed a working 2-rank group (two strangers sharing seeds and shards)."""
    job = free_job()
    start_step(procs, job, 0, tmp_path)
    start_step(procs, job, 1, tmp_path)
    results = procs.wait_all(DEADLINE)
    for name, (code, output) in results.items():
        assert code == 0, f"{name} exited {code}:\n{procs.dump()}"
        step = int(name[len("step")])
        r = report(output)
        assert r["group"] == [f"step{step}/task0", f"step{step}/task1"], (name, r)
        assert r["master_port"] == job_port(str(job), str(step)), r
        assert r["launch_id"] == f"slurm-{job}.{step}", r


def test_two_launches_meeting_at_one_port_stop_naming_both(
    procs: ProcessGroup, tmp_path: Path, free_port: int
) -> None:
    """Both steps given one MASTER_PORT (`export MASTER_PORT=...` before `srun ... &` twice).
    Before: step 1's rank 1 joined step 0's store as rank 1 and waited in gloo's connect until
    the timeout, blaming the port; now it stops at once naming both launches, and step 1's
    rank 0, which cannot listen there, says another process holds the port. Step 0, whose
    group was already up, is untouched."""
    job = free_job()
    first = start_step(procs, job, 0, tmp_path, hold=True, MASTER_PORT=free_port)
    for proc in first:
        procs.wait_for_output(proc, MARKER, DEADLINE)
    second = start_step(procs, job, 1, tmp_path, MASTER_PORT=free_port)
    listener, joiner = (procs.wait_exit(p, DEADLINE) for p in second)
    assert listener[0] == 3, listener[1][-4000:]
    said = error(listener[1])
    assert "CoordinationError: rank 0" in said and "EADDRINUSE" in said, said
    hint = (
        f"Another process listens at that port: if it is another launch (this one is launch "
        f"slurm-{job}.1), give each launch its own MASTER_PORT"
    )
    assert hint in said, said
    assert joiner[0] == 3, joiner[1][-4000:]
    said = error(joiner[1])
    named = (
        f"TopologyError: rank 1: another process already joined 127.0.0.1:{free_port} as rank 1 "
        f"(launch slurm-{job}.0; this one is launch slurm-{job}.1): two launches met at one port"
    )
    assert named in said, said
    assert "Give each launch its own MASTER_PORT" in said, said
    assert elapsed(joiner[1]) < TIMEOUT / 2, joiner[1][-2000:]
    for proc in first:
        assert proc.popen.stdin is not None
        proc.popen.stdin.close()
        code, output = procs.wait_exit(proc, DEADLINE)
        assert code == 0, output[-4000:]
        assert report(output)["group"] == ["step0/task0", "step0/task1"], output[-4000:]


def test_two_launches_started_together_at_one_port_never_form_a_mixed_group(
    procs: ProcessGroup, tmp_path: Path, free_port: int
) -> None:
    """The reviewed race: both steps start at once on one port. Whichever process listens and
    whichever claims each rank first, no group may hold tasks of both steps, and each task
    that fails says why: two launches met, or another process holds the port. (A rank 0 that
    starts listening only after the other step's rank 0 has refused and gone finds its own
    ranks already gone with it: it can only time out, as any rank 0 left alone does.)"""
    job = free_job()
    tasks = [
        *start_step(procs, job, 0, tmp_path, hold=True, MASTER_PORT=free_port),
        *start_step(procs, job, 1, tmp_path, hold=True, MASTER_PORT=free_port),
    ]
    deadline = time.monotonic() + DEADLINE
    while any(p.popen.poll() is None and MARKER not in p.output() for p in tasks):
        assert time.monotonic() < deadline, procs.dump()
        time.sleep(0.05)  # poll interval
    for proc in tasks:
        assert proc.popen.stdin is not None
        proc.popen.stdin.close()
    outcomes = {p.name: procs.wait_exit(p, DEADLINE) for p in tasks}
    said = {}
    for name, (code, output) in outcomes.items():
        step = name[: len("stepN")]
        if code == 0:
            assert set(report(output)["group"]) == {f"{step}/task0", f"{step}/task1"}, output
            continue
        assert code == 3, f"{name} exited {code}:\n{procs.dump()}"
        said[name] = error(output)
    named = [n for n, e in said.items() if "two launches met at one port" in e or "EADDRINUSE" in e]
    assert named, procs.dump()
    for name in set(said) - set(named):  # the late rank 0 above, and only that
        assert name.endswith("task0") and "waiting for clients" in said[name], procs.dump()


@pytest.mark.parametrize("gpus", [1, 2])
def test_mock_gpu_srun_gpus_per_task_one_visible_gpu_serves_every_local_rank(
    procs: ProcessGroup, tmp_path: Path, free_port: int, gpus: int
) -> None:
    """`srun --gpus-per-task=1`: each task sees one GPU (device 0) while SLURM_LOCALID counts
    0..n-1. Before: task 1 raised 'local rank 1 has no GPU' and task 0 waited out the timeout.
    With two visible GPUs each local rank keeps its own."""
    start_step(procs, free_job(), 0, tmp_path, MASTER_PORT=free_port, MOCK_GPUS=gpus)
    results = procs.wait_all(DEADLINE)
    for name, (code, output) in results.items():
        assert code == 0, f"{name} exited {code}:\n{procs.dump()}"
        r = report(output)
        assert r["cuda_device"] == (0 if gpus == 1 else r["rank"]), r


@pytest.mark.parametrize("script_group", [False, True], ids=["ddpseed-group", "script-group"])
def test_mock_gpu_a_local_rank_without_a_gpu_stops_every_rank_at_once(
    procs: ProcessGroup, tmp_path: Path, free_port: int, script_group: bool
) -> None:
    """Three local ranks, two visible GPUs. Before: rank 2 raised before the group existed and
    ranks 0 and 1 waited out the timeout (then blamed the network). Now every rank stops with
    one message naming rank 2: through the group's start-up check where ddpseed makes the
    group, through the seed agreement where the script made it."""
    for rank in range(3):
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 3, "LOCAL_WORLD_SIZE": 3}
        if script_group:
            env["SCRIPT_GROUP"] = 1
        procs.start(
            f"rank{rank}",
            [sys.executable, str(STEP_RANK)],
            clean_env(
                env,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=free_port,
                MOCK_GPUS=2,
                TIMEOUT=TIMEOUT,
                XDG_CACHE_HOME=tmp_path / "cache",
            ),
        )
    results = procs.wait_all(DEADLINE, stop_at_failure=False)
    for name, (code, output) in results.items():
        assert code == 3, f"{name} exited {code}:\n{procs.dump()}"
        said = error(output)
        assert "TopologyError" in said and "1 of 3 ranks" in said, said
        assert "rank 2: local rank 2 has no GPU: only 2 visible" in said, said
        assert "--gpus-per-task" in said, said
        assert elapsed(output) < TIMEOUT / 2, said
