"""Real multi-process runs: torchrun and torch.multiprocessing.spawn over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

import ddpseed
from helpers.procs import clean_env, free_port, processes_carrying
from helpers.ranks import parse_verify, run_ranks, torchrun

STEP_RANK = Path(__file__).parent / "helpers" / "step_rank.py"


def verify(nproc: int, *extra: str, env: dict[str, str] | None = None) -> list[dict]:  # type: ignore[type-arg]
    proc = torchrun(
        ["-m", "ddpseed", "verify", "--json", *extra], nproc=nproc, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return parse_verify(proc.stdout)


def test_torchrun_four_ranks_agree_and_shard_like_torch() -> None:
    reports = verify(4, "--seed", "2024")
    assert [r["rank"] for r in reports] == [0, 1, 2, 3]
    for r in reports:
        assert r["agree"] and r["launcher"] == "torchrun" and r["world_size"] == 4
        assert r["base_seed"] == 2024 and r["process_seed"] == 2024 + r["rank"]
        assert r["draws"] == r["expected"]
        assert r["worker_seeds"] == {str(w): 2024 + r["rank"] * 2 + w for w in range(2)}
        torch_order = list(DistributedSampler(range(64), num_replicas=4, rank=r["rank"], seed=2024))
        assert r["shard"] == torch_order
    shards = [set(r["shard"]) for r in reports]
    assert set().union(*shards) == set(range(64)) and sum(map(len, shards)) == 64


def test_torchrun_entropy_seed_is_shared_and_announced_once() -> None:
    cmd = ["-m", "ddpseed", "verify", "--json", "--num-workers", "0"]
    proc = torchrun(cmd, nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = parse_verify(proc.stdout)
    assert len({r["base_seed"] for r in reports}) == 1
    assert reports[0]["seed_source"] == "entropy"
    # rank 0 alone prints the replay hint, so a 1000-rank job does not print it 1000 times
    hint = f"replay this run with DDPSEED_SEED={reports[0]['base_seed']}"
    assert proc.stderr.count(hint) == 1, proc.stderr[-4000:]


def test_torchrun_environment_seed() -> None:
    reports = verify(2, "--num-workers", "0", env={"DDPSEED_SEED": "31"})
    assert {(r["base_seed"], r["seed_source"]) for r in reports} == {(31, "DDPSEED_SEED")}


def test_verify_exits_nonzero_when_ranks_disagree(tmp_path: Path) -> None:
    # Different DDPSEED_SEED per rank through a tiny wrapper: setup must refuse on every rank.
    wrapper = tmp_path / "per_rank_seed.py"
    wrapper.write_text(
        "import os, runpy, sys\n"
        "os.environ['DDPSEED_SEED'] = str(100 + int(os.environ['RANK']))\n"
        "sys.argv = ['ddpseed', 'verify']\n"
        "runpy.run_module('ddpseed', run_name='__main__')\n"
    )
    proc = torchrun([str(wrapper)], nproc=2, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count("ranks were given different seeds") >= 2
    assert "seed 100 (from DDPSEED_SEED) on ranks 0" in proc.stderr


def _spawned(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    plan = ddpseed.setup(seed=8, timeout=60)
    sampler = plan.sampler(range(30))
    plan.set_epoch(1)
    Path(out_dir, f"{rank}.json").write_text(
        json.dumps({"base": plan.base_seed, "process": plan.process_seed, "shard": list(sampler)})
    )
    import torch.distributed as dist

    dist.destroy_process_group()


def test_multiprocessing_spawn_ranks_agree(tmp_path: Path) -> None:
    mp.spawn(_spawned, args=(3, free_port(), str(tmp_path)), nprocs=3, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(3)]
    assert [g["process"] for g in got] == [8, 9, 10]
    for r, g in enumerate(got):
        s = DistributedSampler(range(30), num_replicas=3, rank=r, seed=8)
        s.set_epoch(1)
        assert g["shard"] == list(s)


def _spawned_with_own_group(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    # The DDP tutorial: no launcher variables, the group made from rank= and world_size=.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    plan = ddpseed.setup(seed=8, timeout=60)
    Path(out_dir, f"{rank}.json").write_text(
        json.dumps(
            {"rank": plan.rank, "world": plan.world_size, "shard": list(plan.sampler(range(30)))}
        )
    )
    dist.destroy_process_group()


def test_a_process_group_the_script_made_gives_the_ranks(tmp_path: Path) -> None:
    """Before: with no launcher variables every rank was 'rank 0 of 1' (same seeds, whole
    dataset), whatever group the script had made."""
    mp.spawn(_spawned_with_own_group, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    for r, g in enumerate(got):
        assert g["shard"] == list(DistributedSampler(range(30), num_replicas=2, rank=r, seed=8))


def _spawned_setup_before_the_group(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    # PyTorch Lightning's own launcher: the script's top (setup()) runs before the group.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    plan = ddpseed.setup(seed=8, timeout=60)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        plan.dataloader(range(30), batch_size=5)
        said = "no error"
    except ddpseed.TopologyError as exc:
        said = str(exc)
    Path(out_dir, f"{rank}.txt").write_text(said)
    dist.destroy_process_group()


def test_a_plan_made_before_the_process_group_is_refused_where_it_deals_data(
    tmp_path: Path,
) -> None:
    """Lightning's own launcher: both ranks used to take rank 0's seeds and the whole
    dataset, with no message."""
    mp.spawn(_spawned_setup_before_the_group, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        said = (tmp_path / f"{rank}.txt").read_text()
        assert said.startswith(
            f"rank {rank}: plan.dataloader(name='loader0'): ddpseed.setup() made"
        )
        assert "for a world of 1 (single), but torch.distributed now has 2 ranks" in said
        assert "call ddpseed.setup() after the process group exists" in said


def test_world_size_without_rank_and_no_group_is_refused_naming_the_variables() -> None:
    """A process Lightning's launcher started (LOCAL_RANK and WORLD_SIZE, no RANK) used to
    read as a world of one."""
    env = clean_env({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": str(free_port())})
    proc = subprocess.run(
        [sys.executable, "-c", "import ddpseed; ddpseed.setup(seed=1, timeout=20)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "TopologyError: WORLD_SIZE=2 and LOCAL_RANK=1 are set but RANK is not" in proc.stderr
    alone = subprocess.run(  # a WORLD_SIZE exported for a torchrun the batch script starts
        [sys.executable, "-c", "import ddpseed; print(ddpseed.setup(seed=1, timeout=20).rank)"],
        env={k: v for k, v in env.items() if k != "LOCAL_RANK"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alone.returncode == 0 and alone.stdout.strip() == "0", alone.stderr[-2000:]
    assert "WORLD_SIZE=2 is set but no launcher's rank variables are" in alone.stderr
    assert "launch with torchrun, srun or mpirun" in proc.stderr


_SETUP_AGAIN = """
import torch
import torch.distributed as dist

import ddpseed

for run in range(4):  # trainings one after another in one launch
    plan = ddpseed.setup(seed=run, timeout=60)
    total = torch.tensor([plan.rank + 1.0])
    dist.all_reduce(total)
    print(f"run {run} rank {plan.rank} sum {total.item():g}", flush=True)
    dist.destroy_process_group()
"""


def test_setup_again_after_destroying_the_group_meets_under_fresh_store_keys(
    tmp_path: Path,
) -> None:
    """Each new group used to meet under the previous one's store keys (torchrun's agent
    store outlives it): gloo could read a stale address, failing about one run in three."""
    script = tmp_path / "again.py"
    script.write_text(_SETUP_AGAIN)
    proc = torchrun([str(script)], nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(f"run {run} rank {r} sum 3" in proc.stdout for run in range(4) for r in (0, 1))


def test_an_inner_launcher_in_kubeflow_pods_gives_every_worker_its_own_rank(
    tmp_path: Path,
) -> None:
    """Two PyTorchJob pods (nprocPerNode 1), each running a per-GPU launcher other than
    torchrun (DeepSpeed's) that exports RANK/LOCAL_RANK/WORLD_SIZE for two workers, without
    TORCHELASTIC_RUN_ID. Before: the pod's PET_* variables won, both workers of a pod were
    kubeflow rank <pod> of 2, and the job never formed; now the innermost launcher wins."""
    workers = {
        rank: {
            "PET_NODE_RANK": str(rank // 2),
            "LOCAL_RANK": str(rank % 2),
            "LOCAL_WORLD_SIZE": "2",
            "TAG": f"pod{rank // 2}/worker{rank % 2}",
        }
        for rank in range(4)
    }
    pod = {"PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "127.0.0.1",
           "TIMEOUT": "20", "XDG_CACHE_HOME": str(tmp_path)}  # fmt: skip
    results = run_ranks(STEP_RANK, 4, timeout=150, env=pod, per_rank_env=workers)
    tags = [workers[rank]["TAG"] for rank in range(4)]
    for r in results:
        assert r.returncode == 0, r.stderr[-4000:]
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("STEP_RANK "))
        report = json.loads(line[len("STEP_RANK ") :])
        assert (report["rank"], report["world_size"], report["group"]) == (r.rank, 4, tags)


def test_demo_ends_with_identical_weights() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ddpseed", "demo", "--nproc", "2", "--epochs", "1"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "bitwise identical: yes" in proc.stdout
    assert "from entropy" in proc.stdout


def test_demo_timeout_stops_every_process_and_says_so() -> None:
    token = f"ddpseed-demo-timeout-{uuid.uuid4().hex}"
    proc = subprocess.run(
        [sys.executable, "-m", "ddpseed", "demo", "--nproc", "2", "--timeout", "2"],
        env=clean_env(DDPSEED_TEST_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "did not finish within --timeout=2s; its processes were stopped" in proc.stderr
    assert "Traceback" not in proc.stderr.split("Last output:")[0]
    assert processes_carrying(token) == []


def test_env_command_reports_torchrun_topology() -> None:
    env = clean_env(
        RANK="3",
        LOCAL_RANK="1",
        WORLD_SIZE="4",
        LOCAL_WORLD_SIZE="2",
        GROUP_RANK="1",
        MASTER_ADDR="10.0.0.1",
        MASTER_PORT="1234",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ddpseed", "env", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    topo = json.loads(proc.stdout)
    assert (topo["launcher"], topo["rank"], topo["node_rank"], topo["num_nodes"]) == (
        "torchrun",
        3,
        1,
        2,
    )
