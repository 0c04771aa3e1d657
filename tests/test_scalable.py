"""The Feistel bijection and ScalableDistributedSampler: exactness, torch's sharding, statistics."""

from __future__ import annotations

import itertools
import math
import pickle
import time
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from ddpseed.errors import DDPSeedError, SeedValueError, StateError
from ddpseed.permutation import ORDER_VERSION, FeistelPermutation
from ddpseed.plan import SeedPlan
from ddpseed.scalable import ScalableDistributedSampler, shard_sizes
from ddpseed.topology import Topology

KEYS = (0, 1, 7, 12345, 2**32 - 1, 2**32 + 5, 2**63 + 11)
SMALL_NS = list(range(1, 301)) + [2**k + d for k in range(9, 17) for d in (-1, 0, 1)]


def order(sampler: ScalableDistributedSampler) -> list[int]:
    """One iteration, without tripping the replay warning on a second look."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(sampler)


def global_order(n: int, seed: int, epoch: int = 0) -> list[int]:
    s = ScalableDistributedSampler(range(n), num_replicas=1, rank=0, seed=seed)
    s.set_epoch(epoch)
    return order(s)


def ranks(x: np.ndarray) -> np.ndarray:
    out = np.empty(len(x))
    out[np.argsort(x, kind="stable")] = np.arange(len(x))
    return out


def spearman(a: list[int] | np.ndarray, b: list[int] | np.ndarray) -> float:
    return float(np.corrcoef(ranks(np.asarray(a)), ranks(np.asarray(b)))[0, 1])


def chi2_sf(x: float, df: int) -> float:
    """Upper tail of chi-square via Wilson-Hilferty (accurate to ~1e-3 relative for df >= 10)."""
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


# --- the permutation -------------------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_bijection_exhaustive_small_n(key: int) -> None:
    for n in SMALL_NS:
        out = FeistelPermutation(n, key)(np.arange(n))
        assert out.dtype == np.uint64
        assert np.array_equal(np.sort(out), np.arange(n)), n


@pytest.mark.parametrize("rounds", [1, 2, 3, 5, 8, 13])
def test_bijection_any_rounds(rounds: int) -> None:
    for n in (2, 5, 16, 17, 100, 1000, 1025):
        out = FeistelPermutation(n, 99, rounds)(np.arange(n))
        assert np.array_equal(np.sort(out), np.arange(n)), (n, rounds)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 5000), key=st.integers(0, 2**64))
def test_bijection_property(n: int, key: int) -> None:
    out = FeistelPermutation(n, key)(np.arange(n, dtype=np.int64))
    assert np.array_equal(np.sort(out), np.arange(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 2**63), key=st.integers(0, 2**40), data=st.data())
def test_scalar_path_agrees_with_vectorised(n: int, key: int, data: st.DataObject) -> None:
    perm = FeistelPermutation(n, key)
    positions = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=40))
    vectorised = perm(np.array(positions, dtype=np.uint64)).tolist()
    assert vectorised == [perm.index(p) for p in positions]
    assert all(0 <= v < n for v in vectorised)


def test_large_domains_stay_injective() -> None:
    # 32-bit words up to 2**32 - 1, 64-bit from 2**32 on
    for n in (2**32 - 1, 2**32, 2**40, 2**40 + 3, 10**12 + 1, 2**63):
        out = FeistelPermutation(n, 5)(np.arange(100_000, dtype=np.uint64))
        assert int(out.max()) < n
        assert np.unique(out).size == out.size


def test_known_answers_pin_the_permutation() -> None:
    # Golden values: a change here changes every shuffled run's data order, so it must come
    # with a new ORDER_VERSION (a saved position refers to the order it was saved in).
    assert ORDER_VERSION == 2
    assert FeistelPermutation(10, 1234)(np.arange(10)).tolist() == GOLDEN_10
    assert FeistelPermutation(2**40, 7)(np.arange(4)).tolist() == GOLDEN_2_40
    assert FeistelPermutation(10**9, 2**32 + 3).index(123_456_789) == GOLDEN_1E9
    assert FeistelPermutation(10**7, 5)(np.arange(0, 3300, 33))[::25].tolist() == GOLDEN_1E7


GOLDEN_10 = [1, 2, 6, 8, 7, 3, 4, 9, 5, 0]
GOLDEN_2_40 = [357397328369, 483093132634, 733082238828, 771778290296]
GOLDEN_1E9 = 425537407
GOLDEN_1E7 = [7856325, 7206159, 7844330, 9703211]


def test_deterministic_across_instances_and_input_dtypes() -> None:
    a = FeistelPermutation(1000, 42)(np.arange(1000, dtype=np.int64))
    b = FeistelPermutation(1000, 42)(list(range(1000)))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, FeistelPermutation(1000, 43)(np.arange(1000)))


def test_input_is_not_modified() -> None:
    x = np.arange(100, dtype=np.uint64)
    FeistelPermutation(100, 3)(x)
    assert np.array_equal(x, np.arange(100))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((0, 1), ValueError),
        ((2**63 + 1, 1), ValueError),
        ((5, -1), ValueError),
        ((5, 1, 0), ValueError),
    ],
)
def test_bad_arguments(args: tuple[int, ...], error: type[Exception]) -> None:
    with pytest.raises(error):
        FeistelPermutation(*args)


def test_positions_out_of_range() -> None:
    perm = FeistelPermutation(10, 1)
    with pytest.raises(IndexError):
        perm(np.array([3, 10]))
    with pytest.raises(IndexError):
        perm.index(-1)
    assert perm(np.array([], dtype=np.uint64)).size == 0


def test_item_positions_are_uniform_chi_square() -> None:
    # Where item i lands, over 4000 keys: an 8x8 table of counts. For uniform permutations
    # (n-1)/n * Pearson's statistic is chi-square with (n-1)**2 degrees of freedom.
    n, keys = 8, 4000
    table = np.zeros((n, n))
    for key in range(keys):
        table[np.arange(n), FeistelPermutation(n, key)(np.arange(n)).astype(np.intp)] += 1
    expected = keys / n
    stat = (n - 1) / n * float(((table - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, (n - 1) ** 2) > 1e-4, stat


def test_each_item_position_uniform_for_odd_domains() -> None:
    # n = 5 and 11 exercise cycle walking from 16 values; each item's position separately.
    for n in (5, 11):
        keys = 3000
        table = np.zeros((n, n))
        for key in range(10_000, 10_000 + keys):
            table[np.arange(n), FeistelPermutation(n, key)(np.arange(n)).astype(np.intp)] += 1
        expected = keys / n
        for row in table:
            stat = float(((row - expected) ** 2 / expected).sum())
            assert chi2_sf(stat, n - 1) > 1e-4 / n, (n, row)


def test_pairs_of_positions_are_uniform_chi_square() -> None:
    # Which ordered pair of items lands at positions 0 and 1, over 60000 keys, n = 8 and 16:
    # small domains, where a Feistel network's halves hold 2 bits and mix least per round.
    # (6 rounds of this network fail this at n = 16 with p ~ 1e-9; the default 8 pass.)
    for n in (8, 16):
        keys = 60_000
        table = np.zeros((n, n))
        for key in range(keys):
            perm = FeistelPermutation(n, key)
            table[perm.index(0), perm.index(1)] += 1
        expected = keys / (n * (n - 1))
        cells = table[~np.eye(n, dtype=bool)]
        stat = float(((cells - expected) ** 2 / expected).sum())
        assert chi2_sf(stat, n * (n - 1) - 1) > 1e-4, (n, stat)


# --- the sampler: torch's sharding contract ------------------------------------------------------


SHARD_CASES = [
    (n, r, drop)
    for n in [*range(0, 26), 31, 64, 97, 100, 1000, 1001]
    for r in (1, 2, 3, 4, 7, 8, 16)
    for drop in (False, True)
]


def test_sizes_match_torch() -> None:
    for n, r, drop in SHARD_CASES:
        ours = ScalableDistributedSampler(range(n), r, r - 1, drop_last=drop)
        theirs = DistributedSampler(range(n), r, r - 1, drop_last=drop)  # type: ignore[arg-type]
        assert (len(ours), ours.num_samples, ours.total_size) == (
            len(theirs),
            theirs.num_samples,
            theirs.total_size,
        ), (n, r, drop)
        assert shard_sizes(n, r, drop) == (theirs.num_samples, theirs.total_size)


def test_unshuffled_shards_equal_torch() -> None:
    for n, r, drop in SHARD_CASES:
        for rank in range(r):
            ours = ScalableDistributedSampler(range(n), r, rank, shuffle=False, drop_last=drop)
            theirs = DistributedSampler(range(n), r, rank, shuffle=False, drop_last=drop)  # type: ignore[arg-type]
            assert list(ours) == list(theirs), (n, r, rank, drop)


def test_shuffled_shards_are_torchs_rules_applied_to_our_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Feed our global order to torch's sampler through randperm: its padding, drop_last and
    # striding must then produce exactly our shards.
    for n, r, drop in SHARD_CASES:
        if n == 0:
            continue
        seed, epoch = 11, 3
        glob = global_order(n, seed, epoch)
        monkeypatch.setattr(torch, "randperm", lambda *a, _g=glob, **k: torch.tensor(_g))
        for rank in range(r):
            ours = ScalableDistributedSampler(range(n), r, rank, seed=seed, drop_last=drop)
            ours.set_epoch(epoch)
            theirs = DistributedSampler(range(n), r, rank, seed=seed, drop_last=drop)  # type: ignore[arg-type]
            assert list(ours) == list(theirs), (n, r, rank, drop)


def test_shards_are_disjoint_and_cover_like_torch() -> None:
    for n, r, drop in SHARD_CASES:
        ours = Counter(
            itertools.chain.from_iterable(
                ScalableDistributedSampler(range(n), r, k, seed=5, drop_last=drop) for k in range(r)
            )
        )
        theirs = Counter(
            itertools.chain.from_iterable(
                DistributedSampler(range(n), r, k, seed=5, drop_last=drop)
                for k in range(r)  # type: ignore[arg-type]
            )
        )
        assert sorted(ours.values()) == sorted(theirs.values()), (n, r, drop)
        assert len(ours) == len(theirs)
        if not drop:
            assert set(ours) == set(range(n))
        else:
            assert max(ours.values(), default=1) == 1  # drop_last never repeats an item


def test_empty_dataset() -> None:
    s = ScalableDistributedSampler([], 4, 2)
    assert len(s) == 0 and list(s) == [] and s.total_size == 0
    with pytest.raises(IndexError):
        s.index_at(0)


# --- resume, random access, determinism ------------------------------------------------------


@pytest.mark.parametrize(("n", "r"), [(10, 3), (1000, 8), (70_000, 1), (300_001, 4)])
def test_seek_then_iterate_is_the_tail(n: int, r: int) -> None:
    full = order(ScalableDistributedSampler(range(n), r, r - 1, seed=9))
    length = len(full)
    for p in sorted({0, 1, length // 3, length - 1, length, 255, 256, 1281, 66_000}):
        if p > length:
            continue
        s = ScalableDistributedSampler(range(n), r, r - 1, seed=9)
        s.seek(p)
        assert list(s) == full[p:], p
        assert order(s) == full  # the seek is one-shot


def test_seek_is_constant_time_at_a_billion() -> None:
    s = ScalableDistributedSampler(range(10**9), 8, 3, seed=1)
    s.seek(len(s) - 5)
    start = time.perf_counter()
    tail = list(s)
    assert time.perf_counter() - start < 1.0
    assert tail == [s.index_at(p) for p in range(len(s) - 5, len(s))]


def test_index_at_agrees_with_iteration() -> None:
    for n, r, drop in [(100, 3, False), (100, 3, True), (5, 8, False), (4097, 2, False)]:
        for shuffle in (True, False):
            s = ScalableDistributedSampler(range(n), r, r - 1, shuffle, seed=4, drop_last=drop)
            s.set_epoch(2)
            assert order(s) == [s.index_at(p) for p in range(len(s))]
    with pytest.raises(IndexError):
        s.index_at(len(s))
    with pytest.raises(IndexError):
        s.index_at(-1)


def test_same_seed_and_epoch_same_order_across_instances() -> None:
    a = ScalableDistributedSampler(range(5000), 4, 1, seed=77)
    b = ScalableDistributedSampler(range(5000), 4, 1, seed=77)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert order(pickle.loads(pickle.dumps(a))) == order(a)


def test_epoch_and_seed_select_the_order() -> None:
    s = ScalableDistributedSampler(range(5000), 4, 1, seed=77)
    epoch0 = list(s)
    s.set_epoch(1)
    epoch1 = list(s)
    s.set_epoch(0)
    assert epoch0 != epoch1 and order(s) == epoch0
    assert list(ScalableDistributedSampler(range(5000), 4, 1, seed=78)) != epoch0


def test_epoch_is_fixed_when_iteration_starts() -> None:
    s = ScalableDistributedSampler(range(300_000), 2, 0, seed=3)
    it = iter(s)
    first = next(it)
    s.set_epoch(1)
    rest = list(it)
    s.set_epoch(0)
    assert [first, *rest] == order(s)


def test_the_sampler_replays_an_epoch_silently_like_torchs() -> None:
    # The replay warning belongs to the loader, which knows whether a second pass is a replay
    # (shuffled training) or ordinary (evaluation, probes): tests/test_loader.py checks it there.
    s = ScalableDistributedSampler(range(10), 2, 0)
    first = list(s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(s) == first


def test_orders_of_distinct_epochs_and_seeds_are_unrelated() -> None:
    n = 10_000
    base = global_order(n, seed=0, epoch=0)
    others = [global_order(n, 0, 1), global_order(n, 1, 0), global_order(n, 2**32 - 1, 7)]
    assert sorted(base) == list(range(n))
    # Spearman's rho of unrelated orders has sd 1/sqrt(n - 1) = 0.01: 5 sd is 0.05.
    for other in others:
        assert abs(spearman(base, other)) < 0.05
    assert abs(spearman(base, list(range(n)))) < 0.05  # and no trace of the identity


def test_a_saved_position_is_refused_in_another_order() -> None:
    # A loader's state records its sample order: a position saved in torch's order (or by a
    # release whose Scalable order differed) would point at other samples in this one.
    topo = Topology("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500)
    plan = SeedPlan(5, topo, collective=False)
    scalable = plan.dataloader(range(100), batch_size=10, scalable=True, name="a")
    seeded = plan.dataloader(range(100), batch_size=10, name="b")
    saved = {**scalable.state_dict(), "position": 30}
    assert saved["sample_order"] == ORDER_VERSION and seeded.state_dict()["sample_order"] == 0
    # (each state renamed for the other loader: a loader refuses another loader's state)
    assert "with sample order 2 but is now sample order 0" in seeded.mismatch(
        {**saved, "name": "b"}
    )
    older = {**saved, "sample_order": 1}
    with pytest.raises(StateError, match="sample order 1 but is now sample order 2"):
        scalable.load_state_dict(older)
    # states from before the field existed are torch's order: fine for the default sampler,
    # refused by the Scalable one
    legacy = {k: v for k, v in seeded.state_dict().items() if k != "sample_order"}
    assert seeded.mismatch(legacy) == ""
    assert "sample order 0 but is now sample order 2" in scalable.mismatch({**legacy, "name": "a"})
    scalable.load_state_dict(saved)
    assert scalable.state_dict()["position"] == 30


# --- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_replicas", "rank"), [(4, 4), (4, -1), (0, 0), (1, 1)])
def test_bad_rank(num_replicas: int, rank: int) -> None:
    with pytest.raises(ValueError, match=r"rank|num_replicas"):
        ScalableDistributedSampler(range(10), num_replicas, rank)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "x", True])
def test_bad_seed(seed: object) -> None:
    with pytest.raises(SeedValueError):
        ScalableDistributedSampler(range(10), 2, 0, seed=seed)  # type: ignore[arg-type]


def test_world_from_missing_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    with pytest.raises(DDPSeedError, match="init"):
        ScalableDistributedSampler(range(10))
    with pytest.raises(DDPSeedError):
        ScalableDistributedSampler(range(10), num_replicas=2)


def test_world_from_process_group(tmp_path: Path) -> None:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        s = ScalableDistributedSampler(range(10), seed=2)
        assert (s.num_replicas, s.rank) == (1, 0)
        assert sorted(s) == list(range(10))
    finally:
        dist.destroy_process_group()


def test_attributes_like_torch() -> None:
    s = ScalableDistributedSampler(range(10), 4, 3, shuffle=False, seed=5, drop_last=True)
    t = DistributedSampler(range(10), 4, 3, shuffle=False, seed=5, drop_last=True)  # type: ignore[arg-type]
    for name in (
        "num_replicas",
        "rank",
        "shuffle",
        "seed",
        "drop_last",
        "epoch",
        "num_samples",
        "total_size",
    ):
        assert getattr(s, name) == getattr(t, name), name
    assert s.state_dict() == {"epoch": 0}


# --- scale -------------------------------------------------------------------------------------


def test_a_billion_samples_start_fast_and_small() -> None:
    tracemalloc.start()
    try:
        start = time.perf_counter()
        s = ScalableDistributedSampler(range(10**9), num_replicas=8, rank=5, seed=123)
        first = list(itertools.islice(iter(s), 1000))
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 1000 and len(set(first)) == 1000
    assert all(0 <= i < 10**9 for i in first)
    assert elapsed < 2.0, elapsed  # ~1 ms unloaded; generous for a busy 2-core machine
    assert peak < 4 * 2**20, peak
    assert len(s) == 125_000_000
