"""The exactly-once arithmetic of elastic resume (ddpseed.elastic), checked by hypothesis, and
elastic resume in one process (world of one: another batch size and num_workers)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ddpseed
from ddpseed.elastic import global_position, resume_seed, shard_length, shard_positions
from ddpseed.sampler import SeededDistributedSampler
from ddpseed.scalable import ScalableDistributedSampler
from ddpseed.topology import Topology


@st.composite
def resumes(draw: st.DrawFn) -> tuple[int, int, int, int, int, bool]:
    """(N, old world, new world, old origin, old shard position, drop_last)."""
    n = draw(st.integers(0, 300))
    old, new = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    origin = draw(st.integers(0, n))
    drop_last = draw(st.booleans())
    position = draw(st.integers(0, shard_length(n, old, origin, drop_last)))
    return n, old, new, origin, position, drop_last


@settings(max_examples=400, deadline=None)
@given(resumes())
def test_every_unconsumed_item_is_delivered_once_across_the_new_world(
    case: tuple[int, int, int, int, int, bool],
) -> None:
    n, old, new, origin, position, drop_last = case
    length = shard_length(n, old, origin, drop_last)
    consumed = [
        x for r in range(old) for x in shard_positions(n, old, r, origin, drop_last)[:position]
    ]
    # every old rank at `position` consumed one contiguous run of global positions
    assert sorted(consumed) == list(range(origin, origin + position * old))
    g = global_position(n, old, origin, position, drop_last)
    if position == length:
        assert g == n  # a shard consumed to its end leaves nothing owed in this epoch
    delivered = [x for r in range(new) for x in shard_positions(n, new, r, g, drop_last)]
    # the new shards deal the rest in order: positions g, g+1, ... with no gap
    assert sorted(delivered) == list(range(g, g + len(delivered)))
    owed = max(0, n - g)
    real = [x for x in delivered if x < n]
    padding = [x % n for x in delivered if x >= n]
    if drop_last:
        assert not padding and owed - len(real) <= new - 1  # the dropped tail, < new world
    else:
        assert len(real) == owed and len(padding) <= new - 1  # torch's padding, < new world
    before = list(range(origin)) + [x for x in consumed if x < n]  # [0, origin): earlier
    counts = Counter(before + real)
    assert all(c == 1 for c in counts.values()), "an item was delivered twice"
    missing = set(range(n)) - set(counts)
    if not drop_last:
        assert not missing
    else:  # only a tail drop_last dropped: the old world's (its epoch ended) or the new one's
        assert len(missing) <= (old - 1 if position == length else new - 1)
    assert all(p < n for p in padding)  # padding repeats items of the epoch (its head)


@settings(max_examples=100, deadline=None)
@given(resumes(), st.booleans(), st.booleans())
def test_both_samplers_deal_the_shards_the_arithmetic_says(
    case: tuple[int, int, int, int, int, bool], scalable: bool, shuffle: bool
) -> None:
    n, _, new, origin, _, drop_last = case
    cls = ScalableDistributedSampler if scalable else SeededDistributedSampler
    plain = cls(range(n), num_replicas=1, rank=0, seed=5, shuffle=shuffle)
    plain.set_epoch(2)
    order = list(plain)  # the epoch's global order (one rank: every position in turn)
    for rank in range(new):
        s = cls(range(n), num_replicas=new, rank=rank, seed=5, shuffle=shuffle, drop_last=drop_last)
        s.set_epoch(2)
        if n:
            assert list(s) == [order[x % n] for x in shard_positions(n, new, rank, 0, drop_last)]
            s.set_origin(origin)
            expected = [order[x % n] for x in shard_positions(n, new, rank, origin, drop_last)]
            assert len(s) == len(expected) and list(s) == expected
            s.set_epoch(3)  # a new epoch is dealt from 0 again
            assert s.origin == 0 and len(s) == shard_length(n, new, 0, drop_last)


def test_resume_seed_depends_on_every_argument_and_is_validated() -> None:
    seeds = {resume_seed(7, r, e, (p,)) for r in range(4) for e in range(3) for p in (0, 16, 32)}
    assert len(seeds) == 36 and all(0 <= s < 2**32 for s in seeds)
    with pytest.raises(ValueError):
        resume_seed(7, -1, 0, (0,))
    with pytest.raises(TypeError):
        resume_seed(7, 0, 0, (1.5,))  # type: ignore[arg-type]


def make_plan() -> ddpseed.SeedPlan:
    return ddpseed.SeedPlan(5, Topology("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500))


def test_loader_state_carries_the_global_position_batch_and_randomness() -> None:
    loader = make_plan().dataloader(range(50), batch_size=4, randomness="sample")
    batches = iter(loader)
    next(batches), next(batches)
    state = loader.state_dict()
    assert (state["global_position"], state["global_batch"], state["origin"]) == (8, 4, 0)
    assert state["randomness"] == 1 and state["distributed"] == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_elastic_resume_with_another_batch_size_and_workers_delivers_the_rest_once(
    tmp_path: Path, workers: int
) -> None:
    plan = make_plan()
    loader = plan.dataloader(range(50), batch_size=4, name="train")
    batches = iter(loader)
    seen = [i for _ in range(3) for i in next(batches).tolist()]
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    loader = plan.dataloader(range(50), batch_size=8, num_workers=workers, name="train")
    with pytest.raises(ddpseed.StateError, match="elastic=True"):
        ddpseed.load_state(tmp_path / "rng.pt", plan)
    ddpseed.load_state(tmp_path / "rng.pt", plan, elastic=True)
    rest = [i for b in loader for i in b.tolist()]
    assert len(rest) == 38 and sorted(seen + rest) == list(range(50))
    plan.set_epoch(1)
    assert len([i for b in loader for i in b.tolist()]) == 50  # later epochs are ordinary


def test_elastic_true_on_the_same_world_and_loader_is_the_exact_resume(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(range(50), batch_size=4, num_workers=2, name="train")
    batches = iter(loader)
    next(batches)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    expected = ([b.tolist() for b in batches], random.random(), float(torch.rand(1)))
    plan = make_plan()
    loader = plan.dataloader(range(50), batch_size=4, num_workers=2, name="train")
    ddpseed.load_state(tmp_path / "rng.pt", plan, elastic=True)
    assert ([b.tolist() for b in loader], random.random(), float(torch.rand(1))) == expected


@pytest.mark.parametrize("scalable", [False, True])
def test_a_chain_of_elastic_and_exact_resumes_still_delivers_every_item_once(
    tmp_path: Path, scalable: bool
) -> None:
    """Batch 4 -> (elastic) batch 6 -> (exact, from the shifted origin) batch 6 -> (elastic)
    batch 5: the epoch's items are consumed once in all."""
    seen: list[int] = []

    def resume(batch: int, steps: int | None, elastic: bool) -> None:
        plan = make_plan()
        loader = plan.dataloader(range(97), batch_size=batch, scalable=scalable, name="train")
        if (tmp_path / "rng.commit.json").exists():
            ddpseed.load_state(tmp_path / "rng.pt", plan, elastic=elastic)
        batches = iter(loader)
        for _ in range(steps if steps is not None else 10**6):
            try:
                seen.extend(next(batches).tolist())
            except StopIteration:
                return
        ddpseed.save_state(tmp_path / "rng.pt", plan)

    resume(4, 3, elastic=False)
    resume(6, 2, elastic=True)
    resume(6, 1, elastic=False)
    resume(5, None, elastic=True)
    assert sorted(seen) == list(range(97))


def test_elastic_load_before_the_loader_is_made_still_deals_a_changed_batch_again(
    tmp_path: Path,
) -> None:
    """Same world, so the exact resume is taken (RNGs restored); the loader made afterwards
    with another batch size continues from the global position instead of being refused."""
    plan = make_plan()
    loader = plan.dataloader(range(50), batch_size=4, name="train")
    batches = iter(loader)
    seen = [i for _ in range(3) for i in next(batches).tolist()]
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    after_save = random.random()
    plan = make_plan()
    ddpseed.load_state(tmp_path / "rng.pt", plan, elastic=True)
    assert random.random() == after_save  # the exact resume: RNGs restored
    loader = plan.dataloader(range(50), batch_size=7, name="train")
    rest = [i for b in loader for i in b.tolist()]
    assert sorted(seen + rest) == list(range(50))


def test_an_elastic_resume_re_derives_the_main_rngs_from_the_documented_seed(
    tmp_path: Path,
) -> None:
    plan = make_plan()
    plan.set_epoch(2)
    loader = plan.dataloader(range(50), batch_size=4, name="train")
    batches = iter(loader)
    next(batches), next(batches)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    loader = plan.dataloader(range(50), batch_size=5, name="train")
    ddpseed.load_state(tmp_path / "rng.pt", plan, elastic=True)
    drawn = (random.random(), float(torch.rand(1)))
    ddpseed.seeding.seed_cpu(resume_seed(5, rank=0, epoch=2, positions=(8,)))
    assert drawn == (random.random(), float(torch.rand(1)))
    assert plan.epoch == 2 and loader.state_dict()["global_position"] == 8
