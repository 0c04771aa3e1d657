"""Exact resume: a killed and restarted job ends bitwise identical to one never stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpseed
from ddpseed.demo import AugmentedBlobs
from ddpseed.topology import Topology
from helpers.ranks import torchrun

DEMO = ["-m", "ddpseed.demo", "--epochs", "2", "--samples", "192", "--batch-size", "16"]


def kill_at_step_9(tmp: Path) -> list[str]:
    """Checkpoint every 4 steps and SIGKILL rank 1 at step 9: with 6 batches per rank per epoch,
    that is mid-epoch 1, and the restart resumes from step 8."""
    return ["--ckpt-dir", str(tmp / "ckpt"), "--every", "4", "--kill-at-step", "9"]


def demo_run(
    tmp: Path, name: str, *extra: str, restarts: int = 0, env: dict[str, str] | None = None
) -> dict:  # type: ignore[type-arg]
    out = tmp / f"{name}.json"
    proc = torchrun(
        [*DEMO, "--out", str(out), *extra],
        nproc=2,
        timeout=300,
        extra=[f"--max-restarts={restarts}"],
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result: dict = json.loads(out.read_text())  # type: ignore[type-arg]
    return result


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_sigkill_mid_epoch_and_torchrun_restart_is_bitwise_identical(
    tmp_path: Path, workers: int, persistent: bool
) -> None:
    opts = ["--seed", "77", "--num-workers", str(workers)]
    opts += ["--persistent-workers"] if persistent else []
    straight = demo_run(tmp_path, "straight", *opts)
    killed = demo_run(tmp_path, "killed", *opts, *kill_at_step_9(tmp_path), restarts=1)
    assert (killed["restarts"], killed["resumed_from_step"]) == (1, 8)
    assert killed["steps"] == straight["steps"] == 12
    assert killed["trace"] == straight["trace"][8:]
    assert killed["weights_sha256"] == straight["weights_sha256"]


@pytest.mark.parametrize(
    "extra", [["--val-every", "3"], ["--probe"]], ids=["validation-before-checkpoint", "probe"]
)
def test_resume_with_a_validation_loader_or_a_probe_iter_is_bitwise_identical(
    tmp_path: Path, extra: list[str]
) -> None:
    """A validation loader evaluated in full before the checkpoint (steps 3 and 6, checkpoint
    at 8) evaluates in full again after the restart; a probe next(iter(loader)) after
    load_state does not move the resumed position."""
    opts = ["--seed", "77", "--num-workers", "2", *extra]
    straight = demo_run(tmp_path, "straight", *opts)
    killed = demo_run(tmp_path, "killed", *opts, *kill_at_step_9(tmp_path), restarts=1)
    assert (killed["restarts"], killed["resumed_from_step"]) == (1, 8)
    assert killed["trace"] == [t for t in straight["trace"] if t[0] > 8]
    assert killed["weights_sha256"] == straight["weights_sha256"]


def test_entropy_seed_survives_the_restart(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    killed = demo_run(
        tmp_path, "killed", "--num-workers", "2", *kill_at_step_9(tmp_path), restarts=1, env=env
    )
    assert killed["seed_source"] == "run record"  # the restart found attempt 0's entropy seed
    replay = demo_run(tmp_path, "replay", "--num-workers", "2", "--seed", str(killed["base_seed"]))
    assert killed["weights_sha256"] == replay["weights_sha256"]


def make_plan(seed: int = 5) -> ddpseed.SeedPlan:
    return ddpseed.SeedPlan(seed, Topology("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500))


@pytest.mark.parametrize(("workers", "persistent"), [(0, False), (2, False), (2, True)])
def test_in_process_resume_continues_data_and_rngs(workers: int, persistent: bool) -> None:
    def fresh() -> tuple[ddpseed.SeedPlan, torch.utils.data.DataLoader]:  # type: ignore[type-arg]
        plan = make_plan()
        ddpseed.seeding.seed_process(plan.process_seed, cuda_device=None)
        return plan, plan.dataloader(
            AugmentedBlobs(48), batch_size=8, num_workers=workers, persistent_workers=persistent
        )

    def consume(plan, loader, epochs, stop=None):  # type: ignore[no-untyped-def]
        seen, state = [], None
        for epoch in range(plan.epoch, epochs):
            plan.set_epoch(epoch)
            for i, (x, _) in enumerate(loader):
                seen.append((float(x.double().sum()), float(torch.rand(1))))
                if (epoch, i) == stop:
                    state = plan.state_dict()
        return seen, state

    plan, loader = fresh()
    full, state = consume(plan, loader, 2, stop=(1, 2))
    plan, loader = fresh()
    plan.load_state_dict(state)
    assert plan.epoch == 1
    rest, _ = consume(plan, loader, 2)
    assert rest == full[-len(rest) :] and len(rest) == 3


def test_state_file_loads_with_weights_only_and_no_allowlist(tmp_path: Path) -> None:
    plan = make_plan()
    random.random()
    np.random.random()
    path = ddpseed.save_state(tmp_path / "rng.pt", plan)
    assert path.name == "rng.rank0.1.pt"
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "ddpseed.state/3" and payload["state"]["base_seed"] == 5
    assert payload["save"] == 1
    expected = (random.random(), float(np.random.random()), float(torch.rand(1)))
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert (random.random(), float(np.random.random()), float(torch.rand(1))) == expected


def test_failed_load_leaves_training_state_untouched(tmp_path: Path) -> None:
    ddpseed.save_state(tmp_path / "rng.pt", make_plan(5))
    other = make_plan(6)
    other.set_epoch(3)
    before = torch.get_rng_state().clone(), random.getstate(), other.epoch
    with pytest.raises(ddpseed.StateError, match=r"saved with base seed 5 but this run has 6"):
        ddpseed.load_state(tmp_path / "rng.pt", other)
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert other.epoch == 3


def test_state_from_another_torch_version_is_refused(tmp_path: Path) -> None:
    plan = make_plan()
    state = plan.state_dict()
    state["torch_version"] = "1.13.1"
    with pytest.raises(ddpseed.StateError, match=r"saved with torch '1.13.1'"):
        plan.load_state_dict(state)


def test_slurm_requeue_finds_the_entropy_seed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("DDPSEED_SEED", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job keeps its id
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # and numbers its srun steps from 0 again
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = ddpseed.setup()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # what Slurm sets in a requeued job
    again = ddpseed.setup()
    assert (again.base_seed, again.seed_source) == (first.base_seed, "run record")
    assert (tmp_path / "ddpseed" / "runs" / "slurm-4242.0" / "seed.json").exists()


def test_changed_batch_size_is_refused(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(range(32), batch_size=4)
    next(iter(loader))
    ddpseed.save_state(tmp_path / "s.pt", plan)
    again = make_plan()
    again.set_epoch(2)
    kept = again.dataloader(range(32), batch_size=8)  # noqa: F841 - plans hold loaders weakly
    before = torch.get_rng_state().clone()
    with pytest.raises(ddpseed.StateError, match="saved with batch size 4 but is now batch size 8"):
        ddpseed.load_state(tmp_path / "s.pt", again)
    assert torch.equal(before, torch.get_rng_state()) and again.epoch == 2
