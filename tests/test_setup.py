"""setup() and SeedPlan in one process: seed sources, RNGs, workers, sampler, determinism."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

import ddpseed
from ddpseed import seeding
from ddpseed.topology import Topology
from helpers.procs import without_launcher


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in set(os.environ) - set(without_launcher(os.environ)):
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def plan_for(rank: int, world: int, seed: int = 1234) -> ddpseed.SeedPlan:
    topo = Topology("torchrun", rank, rank, world, world, 0, 1, "127.0.0.1", 29500)
    return ddpseed.SeedPlan(seed, topo, collective=False)


def test_seed_argument_environment_and_precedence(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert ddpseed.setup(seed=42).base_seed == 42
    monkeypatch.setenv("DDPSEED_SEED", "77")
    plan = ddpseed.setup()
    assert (plan.base_seed, plan.seed_source) == (77, "DDPSEED_SEED")
    with caplog.at_level(logging.WARNING, logger="ddpseed"):
        assert ddpseed.setup(seed=5).base_seed == 5
    assert "ignoring DDPSEED_SEED='77'" in caplog.text


def test_entropy_seed_is_logged_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ddpseed"):
        plan = ddpseed.setup()
    assert plan.seed_source == "entropy" and 0 <= plan.base_seed < 2**32
    assert f"DDPSEED_SEED={plan.base_seed}" in caplog.text
    assert plan.manifest()["base_seed"] == plan.base_seed


@pytest.mark.parametrize("bad", ["-1", str(2**32), "1e3", "abc", ""])
def test_bad_environment_seed_names_rank_value_and_fix(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("DDPSEED_SEED", bad)
    with pytest.raises(ddpseed.SeedValueError) as info:
        ddpseed.setup()
    text = str(info.value)
    shown = bad if bad.lstrip("-").isdigit() else repr(bad)  # numbers are shown parsed
    assert f"rank 0: DDPSEED_SEED={shown}" in text
    assert "[0, 2**32)" in text


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, True, "x"])
def test_bad_argument_seed(bad: object) -> None:
    with pytest.raises(ddpseed.SeedValueError, match="rank 0: seed="):
        ddpseed.setup(seed=bad)  # type: ignore[arg-type]


def test_every_rng_is_seeded_with_the_process_seed() -> None:
    plan = ddpseed.setup(seed=99)
    draws = (random.random(), float(np.random.random()), float(torch.rand(1)))
    gen = torch.Generator().manual_seed(99)
    assert draws == (
        random.Random(99).random(),
        float(np.random.RandomState(99).random_sample()),
        float(torch.rand(1, generator=gen)),
    )
    assert plan.process_seed == 99 and plan.generator().initial_seed() == 99


def test_cuda_seeding_touches_only_the_local_device_mocked_no_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No GPU on this machine: torch.cuda is replaced by recorders to check *which* calls happen.
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("manual_seed", s)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(("ALL", s)))
    device = seeding.local_cuda_device(2)
    seeding.seed_process(1236, cuda_device=device)
    assert calls == [("set_device", 2), ("manual_seed", 1236)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(ddpseed.TopologyError, match=r"local rank 5 has no GPU: only 4 visible"):
        seeding.local_cuda_device(5)


def test_mock_gpu_group_the_script_made_keeps_the_device_the_script_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DDP tutorial's multi-node mp.spawn, 2 processes per node on 8-GPU nodes: node 1's
    first process is rank 2 of 4 and already called set_device(0). Before: ddpseed took
    rank % min(world, GPUs) = cuda:2 and seeded (and ran its collectives on) another GPU."""
    import torch.distributed as dist

    from ddpseed import group
    from ddpseed.topology import detect

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    topo = group.from_existing_group(detect({}))
    assert (topo.launcher, topo.rank, topo.world_size, topo.local_rank) == ("group", 2, 4, 0)
    assert seeding.local_cuda_device(topo.local_rank) == 0
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)  # any device it chose
    assert group.from_existing_group(detect({})).local_rank == 5
    # CUDA not started by the script: the tutorial's placement, rank modulo the node's GPUs
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert group.from_existing_group(detect({})).local_rank == 2


def test_deterministic_mode_sets_and_lists_every_flag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    try:
        with pytest.warns(RuntimeWarning, match="PYTHONHASHSEED is not fixed"):
            plan = ddpseed.setup(seed=1, deterministic=True)
        flags = plan.manifest()["deterministic"]
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert "torch.use_deterministic_algorithms(True)" in flags
        assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in flags
        monkeypatch.setenv("PYTHONHASHSEED", "0")
        monkeypatch.setenv("DDPSEED_DETERMINISTIC", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert "PYTHONHASHSEED=0" in ddpseed.setup(seed=1).manifest()["deterministic"]
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_run_dir_records_entropy_seed_and_manifest(tmp_path: Path) -> None:
    first = ddpseed.setup(run_dir=tmp_path)
    assert json.loads((tmp_path / "seed.json").read_text())["base_seed"] == first.base_seed
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["base_seed"] == first.base_seed and manifest["seed_source"] == "entropy"
    again = ddpseed.setup(run_dir=tmp_path)  # a restart finds the record
    assert (again.base_seed, again.seed_source) == (first.base_seed, "run record")


def test_torchelastic_run_id_alone_names_no_run_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An rdzv id is not a launch: torchrun's agent store holds the launch key (see
    # test_run_identity); without that store there is nothing to continue.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job42")
    first, second = ddpseed.setup(), ddpseed.setup()
    assert (first.seed_source, second.seed_source) == ("entropy", "entropy")
    assert first.run_dir is None and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_matches_torch_at_every_epoch(world: int, drop_last: bool) -> None:
    data = range(103)
    for rank in range(world):
        plan = plan_for(rank, world)
        ours = plan.sampler(data, drop_last=drop_last)
        theirs = DistributedSampler(
            data, num_replicas=world, rank=rank, seed=1234, drop_last=drop_last
        )
        for epoch in range(3):
            plan.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)


def test_sampler_shards_disjoint_and_cover() -> None:
    shards = [set(plan_for(r, 4).sampler(range(64))) for r in range(4)]
    assert set().union(*shards) == set(range(64)) and sum(map(len, shards)) == 64


class SeedProbe:
    """Each item reports which worker fetched it and what that worker's RNGs were seeded with."""

    def __init__(self, n: int = 24) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id if info else -1, torch.initial_seed())


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_seeds_observed_inside_real_workers(context: str) -> None:
    """The first batch of each worker slot is drawn with that worker's seed of the current
    epoch, persistent workers or not, under both start methods.

    Whole passes of one batch per worker (a shard of 3): torch 2.13's spawned workers can
    abort ("terminate called without an active exception") when an iterator is dropped while
    they still put prefetched batches, which plain torch shows too (seen under pytest's fd
    capture, about one run in four)."""
    plan = plan_for(1, 2, seed=500)
    for persistent in (False, True):
        loader = plan.dataloader(
            SeedProbe(6),
            batch_size=1,
            num_workers=3,
            multiprocessing_context=context,
            persistent_workers=persistent,
        )
        for epoch in (0, 1):
            plan.set_epoch(epoch)
            first_three = [(int(w), int(s)) for w, s in loader]
            assert dict(first_three) == {w: plan.worker_seed(w, 3, epoch) for w in range(3)}
            assert dict(first_three)[0] == 500 + (epoch * 2 + 1) * 3 + 0
        plan.set_epoch(0)


def test_exact_loader_first_batch_of_each_worker_sees_the_worker_seed() -> None:
    plan = plan_for(0, 1, seed=7)
    loader = plan.dataloader(SeedProbe(), batch_size=4, num_workers=2)
    batches = list(loader)
    first = {int(b[0][0]): int(b[1][0]) for b in batches[:2]}
    assert first == {0: plan.worker_seed(0, 2), 1: plan.worker_seed(1, 2)}


def test_worker_init_fn_is_picklable_and_chains_a_user_fn() -> None:
    plan = plan_for(0, 1, seed=3)
    clone = pickle.loads(pickle.dumps(plan.worker_init_fn))
    assert repr(clone) == repr(plan.worker_init_fn)
    clone(0)
    assert torch.initial_seed() == ddpseed.worker_seed(3, 0, 1, 0)


def test_user_loader_kwargs_that_would_break_seeding_are_refused() -> None:
    with pytest.raises(TypeError, match="chooses the sampler itself"):
        plan_for(0, 1).dataloader(range(4), sampler=None)


def test_plain_dataloader_building_blocks() -> None:
    plan = plan_for(0, 1, seed=11)
    loader = DataLoader(
        range(8),
        sampler=plan.sampler(range(8)),
        generator=plan.generator(),
        worker_init_fn=plan.worker_init_fn,
        batch_size=2,
    )
    assert sorted(int(x) for b in loader for x in b) == list(range(8))


def test_topology_and_repr() -> None:
    import ddpseed.topology

    # The submodule stays reachable: the package binds no function over its name.
    assert ddpseed.topology.detect is ddpseed.detect
    topo = ddpseed.detect()
    assert topo.launcher == "single" and topo.world_size == 1
    assert repr(topo).startswith("Topology(single rank 0/1")
    assert "base_seed=1234" in repr(plan_for(0, 1))


@pytest.mark.parametrize(
    ("argument", "variable", "named"),
    [
        ("false", None, "deterministic='false' is of type str"),  # bool('false') was True
        (1, None, "deterministic=1 is of type int"),
        (None, "enabled", "DDPSEED_DETERMINISTIC='enabled' is neither on"),  # was quietly off
        (None, "2", "DDPSEED_DETERMINISTIC='2' is neither on"),
    ],
)
def test_a_deterministic_setting_that_is_not_plainly_on_or_off_is_refused(
    monkeypatch: pytest.MonkeyPatch, argument: object, variable: str | None, named: str
) -> None:
    if variable is not None:
        monkeypatch.setenv("DDPSEED_DETERMINISTIC", variable)
    with pytest.raises(ddpseed.ArgumentError, match=re.escape(named)):
        ddpseed.setup(seed=1, deterministic=argument)  # type: ignore[arg-type]
    assert not torch.are_deterministic_algorithms_enabled()


def test_the_deterministic_variable_reads_its_words_whatever_the_case_and_spaces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    try:
        for word, on in ((" True ", True), ("OFF", False), ("", False), ("yes\n", True)):
            monkeypatch.setenv("DDPSEED_DETERMINISTIC", word)
            plan = ddpseed.setup(seed=1)
            assert bool(plan.manifest()["deterministic"]) is on, word
            torch.use_deterministic_algorithms(False)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
