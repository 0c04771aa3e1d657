"""Run identity: a new launch draws its own entropy seed, a restart of it continues that seed.

Each launcher is exercised for real where the behaviour is the launcher's: torchrun (static
and c10d rendezvous, ``--max-restarts``), the launch scripts, and env:// ranks carrying the
variables Slurm documents for steps and requeues.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch.distributed as dist

import ddpseed
from ddpseed import rundir
from helpers.procs import REPO, clean_env, free_port, without_launcher
from helpers.ranks import RankResult, parse_verify, run_ranks, torchrun

RANK_SCRIPT = REPO / "tests" / "helpers" / "fault_rank.py"  # prints "OK <base seed>"
DEMO = ["-m", "ddpseed.demo", "--epochs", "2", "--samples", "192", "--batch-size", "16"]
VERIFY = ["-m", "ddpseed", "verify", "--json", "--num-workers", "0"]
REUSED = "reused from the run record"


def runs_under(cache: Path) -> list[str]:
    root = cache / "ddpseed" / "runs"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def record_of(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "seed.json").read_text())
    return data


# -- torchrun ---------------------------------------------------------------------------------
def verify_under_torchrun(cache: Path, extra: list[str], **kw: Any) -> dict[str, Any]:
    proc = torchrun(
        VERIFY, nproc=2, timeout=240, extra=extra, env={"XDG_CACHE_HOME": str(cache)}, **kw
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = parse_verify(proc.stdout)
    assert len({r["base_seed"] for r in reports}) == 1, reports
    return reports[0]


def test_torchrun_with_the_same_rdzv_id_twice_draws_two_seeds(tmp_path: Path) -> None:
    # Before: both launches mapped to runs/torchrun-job7, so the second "continued" the first.
    cache = tmp_path / "cache"
    seeds = []
    for _ in range(2):
        rdzv = [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}",
            "--rdzv-id=job7",
            "--nnodes=1",
        ]
        report = verify_under_torchrun(cache, rdzv, standalone=False)
        assert report["seed_source"] == "entropy"
        seeds.append(report["base_seed"])
    assert seeds[0] != seeds[1]
    runs = runs_under(cache)
    assert len(runs) == 2 and all(name.startswith("torchrun-job7-") for name in runs), runs
    assert {record_of(cache / "ddpseed" / "runs" / n)["base_seed"] for n in runs} == set(seeds)


def test_launch_script_c10d_jobs_draw_their_own_seeds(
    tmp_path: Path, procs: Any, launch_env: Callable[..., dict[str, str]]
) -> None:
    # Before: every RDZV=c10d job had RUN_ID=ddpseed and shared one record, hence one seed.
    cache = tmp_path / "cache"
    reports = []
    for i in range(2):
        env = launch_env(
            RDZV="c10d", NPROC_PER_NODE=1, MASTER_PORT=free_port(), XDG_CACHE_HOME=str(cache)
        )
        cmd = [str(REPO / "launch" / "torchrun_multi_node.sh"), *VERIFY[1:]]
        procs.start(f"job{i}", cmd, env)
        (rc, output), *_ = procs.wait_all(timeout=240).values()
        procs.procs.clear()
        assert rc == 0, output[-4000:]
        (report,) = parse_verify(output)
        reports.append(report)
    assert [r["seed_source"] for r in reports] == ["entropy", "entropy"]
    assert reports[0]["base_seed"] != reports[1]["base_seed"]
    runs = runs_under(cache)
    assert len(runs) == 2 and "torchrun-ddpseed" not in runs, runs


def demo(
    tmp: Path,
    name: str,
    *extra: str,
    torchrun_extra: list[str],
    env: dict[str, str],
    standalone: bool = True,
) -> tuple[dict[str, Any], str]:
    out = tmp / f"{name}.json"
    proc = torchrun(
        [*DEMO, "--out", str(out), *extra],
        nproc=2,
        timeout=300,
        extra=torchrun_extra,
        env=env,
        standalone=standalone,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result, proc.stderr


def test_static_torchrun_restart_continues_the_entropy_seed(tmp_path: Path) -> None:
    # The repo's default launch path (static rendezvous, rdzv id "none"). Before: attempt 1
    # drew a new seed and the resume failed on the seed mismatch.
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache)}
    static = ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    kill = ["--ckpt-dir", str(tmp_path / "ckpt"), "--every", "4", "--kill-at-step", "9"]
    killed, stderr = demo(
        tmp_path,
        "killed",
        "--num-workers",
        "2",
        *kill,
        env=env,
        torchrun_extra=[*static, "--max-restarts=1"],
        standalone=False,
    )
    assert (killed["restarts"], killed["resumed_from_step"]) == (1, 8)
    assert killed["seed_source"] == "run record"
    # Logged once per job: rank 0 at WARNING (the others at INFO), naming the original source.
    assert stderr.count(REUSED) == 1, stderr[-4000:]
    assert "(source: entropy" in stderr and "torchrun restart 1" in stderr
    (run,) = runs_under(cache)
    assert run.startswith("torchrun-") and run != "torchrun-none"
    record = record_of(cache / "ddpseed" / "runs" / run)
    assert (record["base_seed"], record["source"]) == (killed["base_seed"], "entropy")
    # The continued seed is the one the job started with: a straight replay matches bitwise.
    replay, _ = demo(
        tmp_path,
        "replay",
        "--num-workers",
        "2",
        "--seed",
        str(killed["base_seed"]),
        env=env,
        torchrun_extra=[],
    )
    assert killed["weights_sha256"] == replay["weights_sha256"]


@pytest.fixture
def agent_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[], None]]:
    """A torchrun worker's environment around a store standing in for the agent's; calling
    the fixture's value starts a new launch (a new store)."""
    for name in set(os.environ) - set(without_launcher(os.environ)):
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stores: list[Any] = []

    def new_launch() -> None:
        port = free_port()
        stores.append(
            dist.TCPStore(
                "127.0.0.1",
                port,
                is_master=True,  # type: ignore[attr-defined]
                timeout=timedelta(seconds=30),
                wait_for_workers=False,
            )
        )
        env = {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "TORCHELASTIC_RUN_ID": "none",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        for k, v in env.items():
            monkeypatch.setenv(k, v)

    yield new_launch
    stores.clear()


def test_agent_store_key_names_the_launch(
    agent_store: Callable[[], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    agent_store()
    first = ddpseed.setup()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = ddpseed.setup()
    assert (again.base_seed, again.seed_source, again.run_dir) == (
        first.base_seed,
        "run record",
        first.run_dir,
    )
    agent_store()  # a new launch on a new store, same rdzv id "none"
    fresh = ddpseed.setup()
    assert fresh.seed_source == "entropy" and fresh.run_dir != first.run_dir
    assert len(runs_under(tmp_path / "cache")) == 2


# -- Slurm --------------------------------------------------------------------------------------
def ranks_in_slurm(cache: Path, step: str, **extra: str) -> list[RankResult]:
    """Two env:// ranks of job 77, step ``step``, as Slurm sets them (plus ``extra``)."""
    env = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": step,
        "XDG_CACHE_HOME": str(cache),
        "FAULT_TIMEOUT": "60",
        **extra,
    }
    results = run_ranks(RANK_SCRIPT, 2, timeout=180, env=env)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def seed_of(results: list[RankResult]) -> int:
    (seed,) = {int(r.stdout.split()[-1]) for r in results}
    return seed


def test_each_srun_step_draws_its_own_seed_and_a_requeue_continues_it(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    runs = cache / "ddpseed" / "runs"
    step0 = seed_of(ranks_in_slurm(cache, "0"))
    step1 = seed_of(ranks_in_slurm(cache, "1"))
    assert step0 != step1  # before: every step of the allocation got step 0's seed
    assert runs_under(cache) == ["slurm-77.0", "slurm-77.1"]
    requeued = ranks_in_slurm(cache, "0", SLURM_RESTART_COUNT="1")
    assert seed_of(requeued) == step0
    assert REUSED in requeued[0].stderr and "(source: entropy" in requeued[0].stderr
    assert "Slurm requeue 1" in requeued[0].stderr
    assert REUSED not in requeued[1].stderr  # once per job: the other ranks log at INFO
    assert record_of(runs / "slurm-77.0")["source"] == "entropy"  # not rewritten by the requeue


def test_a_first_attempt_never_continues_another_jobs_record(tmp_path: Path) -> None:
    # A Slurm job id used again (a reinstalled controller): not a requeue, so not a restart.
    cache = tmp_path / "cache"
    old = seed_of(ranks_in_slurm(cache, "0"))
    again = ranks_in_slurm(cache, "0")
    assert seed_of(again) != old
    assert "an earlier job with the same name" in again[0].stderr
    (aside,) = [n for n in runs_under(cache) if ".stale-" in n]
    assert record_of(cache / "ddpseed" / "runs" / aside)["base_seed"] == old  # kept, moved


# -- the record is append-only ----------------------------------------------------------------
def fault_ranks(run_dir: Path, **env: str) -> list[RankResult]:
    return run_ranks(
        RANK_SCRIPT,
        2,
        timeout=180,
        env={"FAULT_RUN_DIR": str(run_dir), "FAULT_TIMEOUT": "60", **env},
    )


def test_explicit_seed_never_overwrites_the_recorded_entropy_seed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = fault_ranks(run_dir)
    assert all(r.returncode == 0 for r in first), first[0].stderr[-3000:]
    entropy = seed_of(first)
    recorded = (run_dir / "seed.json").read_bytes()
    assert json.loads(recorded)["source"] == "entropy"
    refused = fault_ranks(run_dir, DDPSEED_SEED="7")
    for r in refused:  # every rank, the recorded value and the fix
        assert r.returncode == 3, r.stderr[-3000:]
        assert "DDPSEED_ERROR StateError" in r.stderr, r.stderr[-3000:]
        assert f"rank 0: seed.json holds base seed {entropy} (source: entropy)" in r.stderr
        assert f"this run's is 7 (from DDPSEED_SEED): pass seed={entropy} or no" in r.stderr
        assert "or a new run_dir=" in r.stderr and str(run_dir) in r.stderr
    assert (run_dir / "seed.json").read_bytes() == recorded  # before: it said 7
    restarted = fault_ranks(run_dir)
    assert seed_of(restarted) == entropy
    assert (run_dir / "seed.json").read_bytes() == recorded  # before: source "run record"
    assert json.loads((run_dir / "manifest.json").read_text())["seed_source"] == "run record"
    same = fault_ranks(run_dir, DDPSEED_SEED=str(entropy))  # agreeing with it is fine
    assert seed_of(same) == entropy and (run_dir / "seed.json").read_bytes() == recorded


# -- bad run directories and records ------------------------------------------------------------
@pytest.fixture
def single(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in set(os.environ) - set(without_launcher(os.environ)):
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_empty_run_dir_is_refused(single: Path) -> None:
    with pytest.raises(
        ddpseed.RunDirError,
        match=r"rank 0: run_dir='' names no directory.*"
        r"pass a directory path, or run_dir=None",
    ):
        ddpseed.setup(run_dir="")
    assert not (single / "seed.json").exists() and not (single / "manifest.json").exists()


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deeply_nested_seed_record_is_a_state_error(single: Path, depth: int) -> None:
    # 100,000 levels exceed the size bound; 5,000 fit in it but not in the recursion limit.
    run_dir = single / "run"
    run_dir.mkdir()
    (run_dir / "seed.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(ddpseed.StateError, match=r"rank 0: .*seed record") as info:
        ddpseed.setup(run_dir=run_dir)
    assert "move it away to draw a new seed" in str(info.value)
    assert str(run_dir / "seed.json") in str(info.value)


def test_old_derived_run_dirs_are_pruned(single: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = single / "cache" / "ddpseed" / "runs"
    old = time.time() - (rundir.PRUNE_AFTER_DAYS + 1) * 86400
    for name in ("slurm-1.0", "torchrun-x-20200101T000000Z-00000000", "mine", "slurm-2.0"):
        (runs / name).mkdir(parents=True)
        (runs / name / "seed.json").write_text('{"base_seed": 1, "source": "entropy"}')
        if name != "slurm-2.0":
            os.utime(runs / name / "seed.json", (old, old))
    monkeypatch.setenv("SLURM_JOB_ID", "3")  # a new derived record prunes the unused ones
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    ddpseed.setup()
    assert sorted(p.name for p in runs.iterdir()) == ["mine", "slurm-2.0", "slurm-3.0"]


def test_programs_of_the_batch_script_itself_keep_no_record_to_mix_up(
    single: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two programs the batch script runs (step "batch") used to share slurm-<job>.batch, so
    # after a requeue the first continued the second's seed. Now neither keeps a record: a
    # requeue draws fresh entropy for each (and load_state refuses a checkpoint of the old
    # seed, naming it), unless run_dir= names the run.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    a, b = ddpseed.setup(), ddpseed.setup()
    assert a.run_dir is None and (a.seed_source, b.seed_source) == ("entropy", "entropy")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = ddpseed.setup()
    assert again.seed_source == "entropy" and again.base_seed not in (b.base_seed,)
    assert runs_under(single / "cache") == []


def test_a_record_of_another_process_with_this_pid_is_not_taken_for_ours(
    single: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Containers start their processes at small pids: "written by host and pid" let a new
    # launch continue an earlier one's record on a first attempt.
    monkeypatch.setenv("SLURM_JOB_ID", "88")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    earlier = single / "cache" / "ddpseed" / "runs" / "slurm-88.0"
    earlier.mkdir(parents=True)
    launch = f"launch slurm-88.0 [{socket.gethostname()} pid {os.getpid()}]"
    (earlier / "seed.json").write_text(
        json.dumps({"base_seed": 111, "source": "entropy", "launch": launch})
    )
    plan = ddpseed.setup()
    assert plan.seed_source == "entropy" and plan.base_seed != 111
    (aside,) = [n for n in runs_under(single / "cache") if ".stale-" in n]
    assert record_of(earlier.with_name(aside))["base_seed"] == 111  # kept, moved aside
    again = ddpseed.setup()  # setup() again in this process continues its own record
    assert (again.base_seed, again.seed_source) == (plan.base_seed, "run record")


def test_torchruns_inside_one_slurm_step_keep_their_own_records(
    agent_store: Callable[[], None], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Two torchrun launches in one step (a batch script starting train, then eval; or two at
    # once): a restart of the first used to continue whichever record the step held last.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    agent_store()
    first = ddpseed.setup()
    agent_store()
    second = ddpseed.setup()
    assert first.run_dir != second.run_dir and first.base_seed != second.base_seed
    assert all(n.startswith("slurm-4242.batch-torchrun-") for n in runs_under(tmp_path / "cache"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the second launch restarts
    again = ddpseed.setup()
    assert (again.base_seed, again.run_dir) == (second.base_seed, second.run_dir)


def dry_run(*args: str, **env: str) -> tuple[int, str]:
    script = REPO / "launch" / "torchrun_multi_node.sh"
    clean = without_launcher(os.environ)
    done = subprocess.run(
        [str(script), "--dry-run", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_launch_script_gives_each_c10d_job_its_own_rdzv_id() -> None:
    ids = set()
    for _ in range(2):
        rc, out = dry_run("--rdzv=c10d", NPROC_PER_NODE="1")
        assert rc == 0, out
        (rdzv,) = [a for a in out.split() if a.startswith("--rdzv-id=")]
        ids.add(rdzv)
    assert len(ids) == 2 and "--rdzv-id=ddpseed" not in ids
    rc, out = dry_run("--rdzv=c10d", NPROC_PER_NODE="1", SLURM_JOB_ID="55")
    assert rc == 0 and "--rdzv-id=slurm-55" in out, out
    rc, out = dry_run("--rdzv=c10d", "--nnodes=2", NPROC_PER_NODE="1")
    assert rc == 2 and "RDZV=c10d on 2 nodes needs RUN_ID" in out, out


# -- found in the setup review ------------------------------------------------------------------
_SETUP_FIFO = """
import sys

import ddpseed
try:
    ddpseed.setup(seed=3, run_dir=sys.argv[1], timeout=20)
except ddpseed.StateError as exc:
    print("STATE_ERROR", exc)
"""


def test_a_fifo_as_the_seed_record_is_refused_without_blocking(tmp_path: Path) -> None:
    # A plain open() of a FIFO waits for a writer: rank 0 hung past every timeout.
    os.mkfifo(tmp_path / "seed.json")
    try:
        done = subprocess.run(
            [sys.executable, "-c", _SETUP_FIFO, str(tmp_path)],
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("setup blocked opening a FIFO as the seed record")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"seed record {tmp_path / 'seed.json'} is not a regular file (a FIFO)" in done.stdout


def test_a_slurm_requeue_of_a_torchrun_is_a_new_launch_without_a_false_warning(
    agent_store: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    agent_store()
    with caplog.at_level("WARNING"):
        plan = ddpseed.setup()
    assert plan.seed_source == "entropy"
    assert "holds no run record" not in caplog.text  # it blamed a first attempt that failed


def test_a_launch_that_loses_the_race_to_create_a_record_is_told_so(tmp_path: Path) -> None:
    """Two launches started at once on one new run_dir: the one whose record came second used
    to be told to "pass no seed" (it had passed none)."""
    from ddpseed import startup
    from ddpseed.topology import Topology

    found = rundir.Found(rundir.RunDir(tmp_path, explicit=True), tmp_path, None, "test")
    rundir.create_seed_record(found, 111, "entropy")  # the other launch, a moment earlier
    topo = Topology("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500)
    plan = ddpseed.SeedPlan(222, topo, source="entropy", collective=False)
    error, _ = startup._check_or_write(plan, found)
    assert "another launch created" in error and "(base seed 111)" in error
    assert "entropy seed 222, which is now unused; start this launch again" in error
