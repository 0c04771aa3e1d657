"""``randomness="sample"``: a sample's random draws depend only on (base, epoch, index).

One process per case; each rank of a job is simulated by a plan of that rank (the real-process
proof with torchrun on 1, 2 and 4 ranks is in test_elastic.py).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import Dataset, Subset

import ddpseed
from ddpseed.seeding import seed_cpu
from ddpseed.topology import Topology

SEED = 21
N = 45


class Drawn(Dataset[torch.Tensor]):
    """Item i: (i, a torch draw, a NumPy draw, a ``random`` draw) as an augmentation would."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> torch.Tensor:
        drawn = [float(torch.rand(1)), float(np.random.rand()), random.random()]
        return torch.tensor([float(index), *drawn], dtype=torch.float64)


def make_plan(rank: int = 0, world: int = 1) -> ddpseed.SeedPlan:
    topo = Topology("single", rank, rank, world, world, 0, 1, "127.0.0.1", 29500)
    return ddpseed.SeedPlan(SEED, topo, collective=False)


def expected(epoch: int) -> dict[int, tuple[float, ...]]:
    """What the README documents: seed from sample_seed, then fetch."""
    out = {}
    for index in range(N):
        seed_cpu(ddpseed.sample_seed(SEED, epoch, index))
        out[index] = tuple(Drawn()[index][1:].tolist())
    return out


def fetched(loader: Any, into: dict[int, tuple[float, ...]]) -> None:
    for batch in loader:
        for row in batch:
            into[int(row[0])] = tuple(row[1:].tolist())


@pytest.mark.parametrize(
    ("world", "batch", "workers", "persistent"),
    [(1, 4, 0, False), (2, 8, 1, False), (3, 5, 2, True)],
)
def test_a_sample_draws_the_same_whatever_rank_world_batch_and_workers(
    world: int, batch: int, workers: int, persistent: bool
) -> None:
    for epoch in (0, 1):
        got: dict[int, tuple[float, ...]] = {}
        for rank in range(world):
            plan = make_plan(rank, world)
            plan.set_epoch(epoch)
            loader = plan.dataloader(
                Drawn(),
                batch_size=batch,
                num_workers=workers,
                persistent_workers=persistent,
                randomness="sample",
            )
            fetched(loader, got)
        assert got == expected(epoch)
    assert expected(0) != expected(1)  # a new epoch draws afresh


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sample_draws_the_same_after_a_mid_epoch_resume(workers: int) -> None:
    plan = make_plan(1, 2)
    plan.set_epoch(1)
    loader = plan.dataloader(Drawn(), batch_size=4, num_workers=workers, randomness="sample")
    got: dict[int, tuple[float, ...]] = {}
    batches = iter(loader)
    fetched([next(batches), next(batches)], got)
    state = plan.state_dict()
    plan = make_plan(1, 2)
    loader = plan.dataloader(Drawn(), batch_size=4, num_workers=workers, randomness="sample")
    plan.load_state_dict(state)
    rest: dict[int, tuple[float, ...]] = {}
    fetched(loader, rest)
    assert len(got) == 8 and len(rest) == 23 - 8 and not got.keys() & rest.keys()
    reference = expected(1)
    assert {**got, **rest} == {i: reference[i] for i in (*got, *rest)}


def test_the_main_process_streams_are_not_disturbed_with_num_workers_0() -> None:
    def main_draws(with_loader: bool) -> list[float]:
        seed_cpu(99)
        draws = [random.random(), float(np.random.rand()), float(torch.rand(1))]
        if with_loader:
            loader = make_plan().dataloader(Drawn(), batch_size=4, randomness="sample")
            for _ in loader:
                draws += [random.random(), float(np.random.rand()), float(torch.rand(1))]
        else:
            for _ in range(-(-N // 4)):
                draws += [random.random(), float(np.random.rand()), float(torch.rand(1))]
        return draws

    assert main_draws(with_loader=True) == main_draws(with_loader=False)


def test_a_dataset_error_mid_batch_still_puts_the_main_streams_back() -> None:
    class Breaks(Drawn):
        def __getitem__(self, index: int) -> torch.Tensor:
            if index == 2:
                raise KeyError("bad item")
            return super().__getitem__(index)

    seed_cpu(5)
    before = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    loader = make_plan().dataloader(Breaks(), batch_size=4, shuffle=False, randomness="sample")
    with pytest.raises(KeyError):
        next(iter(loader))
    after = (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def test_a_subset_with_getitems_is_seeded_per_sample() -> None:
    subset = Subset(Drawn(), list(range(N)))
    got: dict[int, tuple[float, ...]] = {}
    fetched(make_plan().dataloader(subset, batch_size=6, randomness="sample"), got)
    assert got == expected(0)


def test_the_dataset_still_receives_plain_int_indices() -> None:
    class Types(Dataset[str]):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> str:
            return type(index).__name__

    loader = make_plan().dataloader(Types(), batch_size=4, randomness="sample")
    assert {t for batch in loader for t in batch} == {"int"}


def test_randomness_is_checked_and_a_changed_mode_is_refused_on_resume() -> None:
    plan = make_plan()
    with pytest.raises(ValueError, match="choose one of"):
        plan.dataloader(Drawn(), batch_size=4, randomness="item")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no batch to carry the seeds"):
        plan.dataloader(Drawn(), batch_size=None, randomness="sample")
    loader = plan.dataloader(Drawn(), batch_size=4, randomness="sample", name="train")
    next(iter(loader))
    state = plan.state_dict()
    plan = make_plan()
    kept = plan.dataloader(Drawn(), batch_size=4, name="train")  # noqa: F841
    with pytest.raises(ddpseed.StateError, match="randomness"):
        plan.load_state_dict(state)


@given(
    base=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 2**40),
    index=st.integers(0, 2**63),
)
def test_sample_seed_is_a_32_bit_seed_of_its_three_arguments(
    base: int, epoch: int, index: int
) -> None:
    seed = ddpseed.sample_seed(base, epoch, index)
    assert 0 <= seed < 2**32
    assert seed == ddpseed.sample_seed(base, epoch, index)


def test_sample_seeds_spread_and_arguments_are_validated() -> None:
    seeds = {ddpseed.sample_seed(7, e, i) for e in range(4) for i in range(5000)}
    assert len(seeds) >= 20000 - 1  # a 32-bit hash: ~0.05 colliding pairs expected here
    for bad, error in (
        ((2**32, 0, 0), ValueError),
        ((1, -1, 0), ValueError),
        ((1, 0, -3), ValueError),
        ((1, 0, 1.0), TypeError),
        ((True, 0, 0), TypeError),
    ):
        with pytest.raises(error):
            ddpseed.sample_seed(*bad)  # type: ignore[arg-type]
