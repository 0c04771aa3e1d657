"""The loader owns its epoch and position: torch's contract kept, no silent wrong resume.

One process, a world of one (the multi-rank cases are in test_integrity.py). Each test names
the training-script pattern that used to resume silently wrong.
"""

from __future__ import annotations

import gc
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, IterableDataset, get_worker_info

import ddpseed
from ddpseed.demo import AugmentedBlobs
from ddpseed.topology import Topology


def make_plan(seed: int = 5, rank: int = 0, world: int = 1) -> ddpseed.SeedPlan:
    topo = Topology("single", rank, rank, world, world, 0, 1, "127.0.0.1", 29500)
    plan = ddpseed.SeedPlan(seed, topo, collective=False)
    ddpseed.seeding.seed_process(plan.process_seed, cuda_device=None)
    return plan


def sums(batches: Any) -> list[float]:
    return [float(x.double().sum()) for x, _ in batches]


def test_validation_loader_evaluated_before_a_mid_epoch_save_is_whole_after_resume(
    tmp_path: Path,
) -> None:
    def fresh() -> tuple[ddpseed.SeedPlan, Any, Any]:
        plan = make_plan()
        train = plan.dataloader(AugmentedBlobs(64), batch_size=8, name="train")
        val = plan.dataloader(AugmentedBlobs(24), batch_size=8, shuffle=False, name="val")
        return plan, train, val

    plan, train, val = fresh()
    batches = iter(train)
    for _ in range(3):
        next(batches)
    assert len(sums(val)) == 3  # evaluated in full
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan, train, val = fresh()
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert len(sums(val)) == 3  # was 0: its saved position was "end of shard"
    assert len(sums(train)) == 5  # the training loader still continues after batch 3


def test_worker_info_seed_differs_per_epoch_and_rank_and_is_documented() -> None:
    class InfoSeed(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> int:
            info = get_worker_info()
            assert info is not None
            return int(info.seed)

    seen: dict[tuple[int, int], set[int]] = {}
    for rank in (0, 1):
        plan = make_plan(seed=9, rank=rank, world=2)
        loader = plan.dataloader(InfoSeed(), batch_size=1, num_workers=2, shuffle=False)
        for epoch in (0, 1):
            plan.set_epoch(epoch)
            got = {int(s) for s in loader}
            expected = {ddpseed.worker_info_seed(9, rank, epoch, w) for w in (0, 1)}
            assert got == expected
            seen[(rank, epoch)] = got
    assert len(set().union(*seen.values())) == 8  # every (rank, epoch, worker) its own


@pytest.mark.parametrize("workers", [0, 2])
def test_torch_attributes_are_the_real_ones_whatever_num_workers(workers: int) -> None:
    plan = make_plan()
    data = range(32)
    loader = plan.dataloader(data, batch_size=4, num_workers=workers)
    assert loader.dataset is data
    assert loader.batch_size == 4 and loader.drop_last is False
    assert isinstance(loader.sampler, ddpseed.SeededDistributedSampler)
    assert isinstance(loader.batch_sampler, BatchSampler)
    epoch0 = [b.tolist() for b in loader]
    loader.sampler.set_epoch(1)  # the DDP tutorial's call
    epoch1 = [b.tolist() for b in loader]
    assert loader.state_dict()["epoch"] == 1 and epoch1 != epoch0
    assert [i for b in epoch1 for i in b] == list(loader.sampler)


def test_probe_iter_after_load_state_keeps_the_restored_position(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(64), batch_size=8, num_workers=2)
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    expected = sums(batches)
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(64), batch_size=8, num_workers=2)
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert len(next(iter(loader))[0]) == 8  # the tutorial's batch-size probe
    assert sums(loader) == expected
    with pytest.warns(UserWarning, match="second full pass"):
        assert len(sums(loader)) == 8  # the finished pass: the next iter() starts at 0


def test_changed_num_workers_is_refused_naming_both_values(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(64), batch_size=8, num_workers=2)
    next(iter(loader))
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    kept = plan.dataloader(AugmentedBlobs(64), batch_size=8, num_workers=1)  # noqa: F841
    with pytest.raises(
        ddpseed.StateError, match="saved with num_workers 2 but is now num_workers 1"
    ):
        ddpseed.load_state(tmp_path / "rng.pt", plan)


def test_states_are_matched_by_name_not_by_place_among_live_loaders(tmp_path: Path) -> None:
    plan = make_plan()
    first = plan.dataloader(range(40), batch_size=4)  # loader0
    second = plan.dataloader(range(40), batch_size=4)  # loader1
    batches = iter(second)
    for _ in range(3):
        next(batches)
    del first
    gc.collect()
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    first = plan.dataloader(range(40), batch_size=4)
    second = plan.dataloader(range(40), batch_size=4)
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert (first.state_dict()["position"], second.state_dict()["position"]) == (0, 12)
    assert len(list(first)) == 10 and len(list(second)) == 7


def test_a_throwaway_loader_made_first_does_not_shift_the_training_loader(tmp_path: Path) -> None:
    def run(until: int | None) -> tuple[ddpseed.SeedPlan, Any, list[Any]]:
        plan = make_plan()
        stats = plan.dataloader(range(40), batch_size=8)  # built, used, dropped
        list(stats)
        del stats
        gc.collect()
        train = plan.dataloader(range(40), batch_size=5)
        return plan, train, [b.tolist() for b in (train if until is None else _take(train, until))]

    # The training loader stays alive until the save, as in a training script.
    plan, _train, _ = run(until=5)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    stats = plan.dataloader(range(40), batch_size=8)
    list(stats)
    del stats
    gc.collect()
    train = plan.dataloader(range(40), batch_size=5)
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    _, _, straight = run(until=None)
    assert [b.tolist() for b in train] == straight[5:]  # 3 batches remained, not 8


def _take(loader: Any, n: int) -> list[Any]:
    batches = iter(loader)
    return [next(batches) for _ in range(n)]


def test_replay_warning_only_for_a_second_full_shuffled_pass_at_the_caller() -> None:
    plan = make_plan()
    val = plan.dataloader(range(16), batch_size=4, shuffle=False)
    train = plan.dataloader(range(16), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            list(val)  # evaluating again is not a replay
        next(iter(train))  # nor is a probe
        list(train)
    with pytest.warns(UserWarning, match="second full pass in epoch 0") as caught:
        for _ in train:
            pass
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(train)  # once
        plan.set_epoch(1)
        list(train)
        list(train)  # a new epoch counts afresh... its second pass was already warned about


def test_load_state_before_the_loader_is_made_is_all_or_nothing(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(range(32), batch_size=4)
    plan.set_epoch(3)
    next(iter(loader))
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    random.random()
    before = (torch.get_rng_state().clone(), random.getstate(), np.random.get_state()[1].copy())
    ddpseed.load_state(tmp_path / "rng.pt", plan)  # no loader yet: its state waits for it
    assert plan.epoch == 3
    with pytest.raises(ddpseed.StateError) as err:
        plan.dataloader(range(32), batch_size=8)
    message = str(err.value)
    assert "loader 'loader0' was saved with batch size 4 but is now batch size 8" in message
    assert "restore was undone" in message and "Nothing was restored" not in message
    assert plan.epoch == 0
    assert torch.equal(before[0], torch.get_rng_state()) and before[1] == random.getstate()
    assert (before[2] == np.random.get_state()[1]).all()
    fresh = plan.dataloader(range(32), batch_size=8)  # the run goes on as a fresh one
    assert fresh.state_dict()["position"] == 0


def test_load_state_before_the_loader_is_made_resumes_when_it_fits(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(range(32), batch_size=4)
    batches = iter(loader)
    for _ in range(2):
        next(batches)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    rest = [b.tolist() for b in batches]
    plan = make_plan()
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    loader = plan.dataloader(range(32), batch_size=4)
    assert [b.tolist() for b in loader] == rest


def test_iterable_dataset_gets_a_clear_error() -> None:
    class Stream(IterableDataset[int]):
        def __iter__(self) -> Any:
            return iter(range(4))

    with pytest.raises(TypeError, match=r"needs a map-style dataset.*plan\.worker_init_fn"):
        make_plan().dataloader(Stream(), batch_size=2)


def test_state_saved_after_the_last_batch_resumes_with_an_empty_rest(tmp_path: Path) -> None:
    """Inside the loop after the last batch: nothing left; after StopIteration: a new pass."""
    plan = make_plan()
    loader = plan.dataloader(range(16), batch_size=4)
    batches = iter(loader)
    for _ in range(4):
        next(batches)
    inside = loader.state_dict()
    list(batches)
    after = loader.state_dict()
    assert (inside["position"], inside["finished"]) == (16, False)
    assert (after["position"], after["finished"]) == (16, True)
    again = make_plan().dataloader(range(16), batch_size=4)
    again.load_state_dict(inside)
    assert list(again) == []
    again.load_state_dict(after)
    with pytest.warns(UserWarning, match="second full pass"):  # resuming the same epoch again
        assert len(list(again)) == 4


# -- found in review: paths that resumed silently wrong or partly -----------------------------


def _epochs_of_remade_loaders(plan: ddpseed.SeedPlan, steps_in_last: int) -> Any:
    """A loader made again every epoch without a name; stops mid-epoch 2."""
    for epoch in range(3):
        plan.set_epoch(epoch)
        loader = plan.dataloader(range(40), batch_size=4)
        batches = iter(loader)
        for _ in range(10 if epoch < 2 else steps_in_last):
            next(batches)
    return loader, batches


def test_a_loader_made_again_every_epoch_without_a_name_is_refused_not_restarted(
    tmp_path: Path,
) -> None:
    # It was "loader2" when saved but is "loader0" in the resumed run: it used to start epoch 2
    # at sample 0 while the saved position waited for a loader that never came.
    plan = make_plan()
    _loader, batches = _epochs_of_remade_loaders(plan, 3)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    rest = [b.tolist() for b in batches]
    plan = make_plan()
    torch.rand(1)
    before = torch.get_rng_state().clone()
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    with pytest.raises(ddpseed.StateError) as err:
        plan.dataloader(range(40), batch_size=4)
    message = str(err.value)
    assert "loader 'loader0' has no saved state" in message
    assert "loader 'loader2' (epoch 2, position 12)" in message and "name='loader2'" in message
    assert "restore was undone" in message and plan.epoch == 0
    assert torch.equal(before, torch.get_rng_state())  # the RNGs went back too
    # The message's fix continues the checkpoint exactly.
    plan = make_plan()
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert [b.tolist() for b in plan.dataloader(range(40), batch_size=4, name="loader2")] == rest


def test_a_loader_made_before_load_state_under_another_creation_number_is_refused(
    tmp_path: Path,
) -> None:
    plan = make_plan()
    kept = _epochs_of_remade_loaders(plan, 3)  # alive at the save, as in a training script
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    del kept
    plan = make_plan()
    plan.set_epoch(2)
    loader = plan.dataloader(range(40), batch_size=4)
    with pytest.raises(ddpseed.StateError, match="loader 'loader0' has no saved state"):
        ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert loader.state_dict()["position"] == 0 and plan.epoch == 2


def test_load_state_first_keeps_the_position_of_a_loader_whose_sampler_holds_the_epoch(
    tmp_path: Path,
) -> None:
    # The torch tutorial's loader.sampler.set_epoch(e): the plan's epoch stays 0 while the
    # loader's is e. The saved state used to be dropped when the loader was made after
    # load_state, because its epoch was not the plan's.
    plan = make_plan()
    loader = plan.dataloader(range(40), batch_size=4)
    loader.sampler.set_epoch(3)  # type: ignore[attr-defined]
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    rest = [b.tolist() for b in batches]
    for first in ("load_state", "dataloader"):
        plan = make_plan()
        if first == "dataloader":
            loader = plan.dataloader(range(40), batch_size=4)
        ddpseed.load_state(tmp_path / "rng.pt", plan)
        if first == "load_state":
            loader = plan.dataloader(range(40), batch_size=4)
        loader.sampler.set_epoch(3)  # type: ignore[attr-defined]  # the script's loop
        assert [b.tolist() for b in loader] == rest, first


def test_two_live_loaders_of_one_name_are_refused_at_save_and_load(tmp_path: Path) -> None:
    plan = make_plan()
    first = plan.dataloader(range(40), batch_size=4, name="x")
    next(iter(first))
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    second = plan.dataloader(range(40), batch_size=4, name="x")
    with pytest.raises(ddpseed.StateError, match="2 live loaders are named 'x'"):
        ddpseed.save_state(tmp_path / "rng.pt", plan)
    with pytest.raises(ddpseed.StateError, match="2 live loaders are named 'x'"):
        ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert second.state_dict()["position"] == 0
    del first  # the loader remade every epoch under one name: the old one is dropped
    ddpseed.save_state(tmp_path / "rng.pt", plan)


def test_an_undone_restore_also_resets_loaders_that_took_a_waiting_state(tmp_path: Path) -> None:
    plan = make_plan()
    a = plan.dataloader(range(40), batch_size=4, name="a")
    b = plan.dataloader(range(40), batch_size=4, name="b")
    for loader in (a, b):
        batches = iter(loader)
        for _ in range(3):
            next(batches)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    del a, b, batches
    plan = make_plan()
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    a = plan.dataloader(range(40), batch_size=4, name="a")
    assert a.state_dict()["position"] == 12
    with pytest.raises(ddpseed.StateError, match="restore was undone"):
        plan.dataloader(range(40), batch_size=8, name="b")
    # "as they were before it": a did not exist then, so it starts fresh.
    assert a.state_dict()["position"] == 0 and len(list(a)) == 10


@pytest.mark.parametrize("epoch", [-1, "x", 2.7, True, "3"])
def test_a_state_with_a_bad_epoch_is_refused_before_anything_changes(epoch: Any) -> None:
    plan = make_plan()
    state = plan.state_dict()
    rng = torch.get_rng_state().clone()
    torch.rand(3)
    with pytest.raises(ddpseed.StateError, match="is not an epoch"):
        plan.load_state_dict({**state, "epoch": epoch})
    assert not torch.equal(rng, torch.get_rng_state())  # the RNGs were not restored


def test_a_state_whose_rng_cannot_be_restored_changes_no_stream() -> None:
    plan = make_plan()
    state = plan.state_dict()
    torch.rand(3)
    random.random()
    now = (torch.get_rng_state().clone(), random.getstate())
    with pytest.raises(ddpseed.StateError, match="lack"):
        plan.load_state_dict({**state, "rng": {"python": state["rng"]["python"]}})
    broken = {**state["rng"], "numpy": {"kind": "MT19937"}}  # python restores, numpy fails
    with pytest.raises(ddpseed.StateError, match="RNG states cannot be restored"):
        plan.load_state_dict({**state, "rng": broken})
    assert torch.equal(now[0], torch.get_rng_state()) and now[1] == random.getstate()


# -- found in the second review: loops that trained on some samples twice --------------------


def test_in_order_false_is_refused_since_a_count_of_batches_would_not_say_which() -> None:
    with pytest.raises(ValueError, match=r"in_order=False.*repeat some samples and skip others"):
        make_plan().dataloader(range(16), batch_size=4, num_workers=2, in_order=False)


def test_a_pass_running_when_its_loader_is_restored_stops_instead_of_going_uncounted(
    tmp_path: Path,
) -> None:
    """A roll-back inside the loop (load_state on a NaN loss) used to leave the running pass
    going while the restored position stayed put: a save then repeated its batches."""
    plan = make_plan()
    loader = plan.dataloader(range(32), batch_size=4)
    batches = iter(loader)
    seen = [next(batches) for _ in range(2)]
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    seen += [next(batches) for _ in range(4)]
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    with pytest.raises(ddpseed.StateError, match=r"restored .* while this pass over it"):
        next(batches)
    whole = [b.tolist() for b in make_plan().dataloader(range(32), batch_size=4)]
    assert [b.tolist() for b in seen] == whole[:6]
    assert [b.tolist() for b in loader] == whole[2:]  # from the restored position


def _end_of_epoch_run(
    tmp_path: Path, epochs: range, *, next_epoch_first: bool, resume: bool
) -> list[tuple[int, list[int]]]:
    plan = make_plan()
    loader = plan.dataloader(range(16), batch_size=8, name="train")
    if resume:
        ddpseed.load_state(tmp_path / "rng.pt", plan)
        epochs = range(plan.epoch, epochs.stop)
    seen = []
    for epoch in epochs:
        plan.set_epoch(epoch)
        seen += [(epoch, batch.tolist()) for batch in loader]
        if next_epoch_first:
            plan.set_epoch(epoch + 1)  # README: an end-of-epoch checkpoint names the next epoch
        ddpseed.save_state(tmp_path / "rng.pt", plan)
    return seen


def test_an_end_of_epoch_checkpoint_taken_as_the_readme_says_resumes_with_the_next_epoch(
    tmp_path: Path,
) -> None:
    whole = _end_of_epoch_run(tmp_path / "a", range(3), next_epoch_first=True, resume=False)
    first = _end_of_epoch_run(tmp_path / "b", range(1), next_epoch_first=True, resume=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rest = _end_of_epoch_run(tmp_path / "b", range(3), next_epoch_first=True, resume=True)
    assert first + rest == whole


def test_resuming_a_finished_shuffled_pass_in_its_own_epoch_warns_before_it_replays(
    tmp_path: Path,
) -> None:
    """Saved after the pass ended without moving to the next epoch: the resumed loop would
    train the epoch again; the warning comes as that pass starts, at the caller's line."""
    _end_of_epoch_run(tmp_path, range(1), next_epoch_first=False, resume=False)
    plan = make_plan()
    loader = plan.dataloader(range(16), batch_size=8, name="train")
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert plan.epoch == 0
    with pytest.warns(UserWarning, match=r"second full pass of epoch 0.*set_epoch\(epoch \+ 1\)"):
        batches = iter(loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert len(list(batches)) == 2  # the replay itself: warned once, before it
    assert caught == []


class _Draws(torch.utils.data.Dataset[float]):
    """Each item: one draw from the global NumPy stream."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> float:
        return float(np.random.random())


@pytest.mark.parametrize(("randomness", "workers"), [("sample", 0), ("batch", 2)])
def test_two_loaders_share_the_seeds_unless_given_streams_of_their_own(
    randomness: Any, workers: int
) -> None:
    def draws(plan: ddpseed.SeedPlan, stream: int) -> list[float]:
        loader = plan.dataloader(
            _Draws(), 4, randomness=randomness, num_workers=workers, stream=stream
        )
        return torch.cat(list(loader)).tolist()

    plan = make_plan()
    one, same, own = draws(plan, 0), draws(plan, 0), draws(plan, 1)
    assert one == same  # as README says: zipped, item k of each draws alike
    assert not set(one) & set(own)
    assert own == draws(make_plan(), 1)  # reproducible


def test_a_state_saved_with_another_stream_is_refused_naming_both() -> None:
    saved = make_plan().dataloader(range(8), 4, stream=1).state_dict()
    with pytest.raises(ddpseed.StateError, match=r"saved with stream 1 but is now stream 0"):
        make_plan().dataloader(range(8), 4).load_state_dict(saved)
    with pytest.raises(ValueError, match=r"stream=-1"):
        make_plan().dataloader(range(8), 4, stream=-1)


def test_a_loader_dealt_again_by_an_elastic_resume_keeps_its_seed_key_in_its_state() -> None:
    def loader(batch: int) -> Any:
        return make_plan().dataloader(AugmentedBlobs(64), batch_size=batch, num_workers=2, name="t")

    old = loader(4)
    _take(old, 2)
    dealt = loader(8)
    dealt.load_state_dict({**old.state_dict(), "elastic": True})  # another batch size
    key = dealt.state_dict()["seed_key"]
    assert key != 0 and "key=" in repr(dealt._seeds)
    batches = iter(dealt)
    next(batches)
    saved = dealt.state_dict()
    rest = sums(batches)
    again = loader(8)
    again.load_state_dict(saved)  # an exact resume of the dealt loader keeps its key
    assert again.state_dict()["seed_key"] == key
    assert sums(again) == rest


def test_a_loader_state_saved_under_another_base_seed_is_refused_naming_both() -> None:
    """``loader.state_dict()`` is a torchdata checkpoint of its own: restored under another
    base seed (a new launch that drew a fresh seed) its position would index another
    permutation, repeating some samples and skipping others."""
    saved_by = make_plan(seed=7).dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    batches = iter(saved_by)
    next(batches), next(batches)
    state = saved_by.state_dict()
    loader = make_plan(seed=8).dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    with pytest.raises(ddpseed.StateError, match="base seed 7 but this run has 8") as err:
        loader.load_state_dict(state)
    assert "seed=<saved seed>" in str(err.value) and loader.state_dict()["position"] == 0
    same = make_plan(seed=7).dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    same.load_state_dict(state)
    assert same.state_dict()["position"] == 8


def test_a_state_of_another_loader_is_refused_unless_renamed_on_purpose() -> None:
    plan = make_plan()
    train = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    val = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="val")
    next(iter(train))
    state = train.state_dict()
    with pytest.raises(ddpseed.StateError, match="loader 'val': the state is loader 'train'"):
        val.load_state_dict(state)
    assert val.state_dict()["position"] == 0
    val.load_state_dict({**state, "name": "val"})  # the fix the message gives
    assert val.state_dict()["position"] == 4


def test_torchs_own_timeout_argument_reaches_the_dataloader() -> None:
    loader = make_plan().dataloader(AugmentedBlobs(8), batch_size=4, num_workers=1, timeout=30)
    assert loader.timeout == 30 and len(sums(loader)) == 2


def test_a_batch_sampler_iterated_by_anything_but_its_loader_is_refused() -> None:
    """accelerate's prepare() and skip_first_batches iterate loader.batch_sampler inside their
    own loaders: the ddpseed loader counted none of those batches (a save resumed at batch 0)
    and prepare() dealt its shard again (each rank saw a quarter of the data)."""
    loader = make_plan().dataloader(AugmentedBlobs(40), batch_size=4, num_workers=2, name="t")
    with pytest.raises(ddpseed.StateError, match="batch sampler of ddpseed loader 't' was "):
        iter(loader.batch_sampler)
    rebuilt = torch.utils.data.DataLoader(loader.dataset, batch_sampler=loader.batch_sampler)
    with pytest.raises(ddpseed.StateError, match="Iterate the ddpseed loader itself"):
        next(iter(rebuilt))
    assert len(sums(loader)) == 10 and len(loader.batch_sampler) == 10  # its own loader: fine


@pytest.mark.parametrize(
    ("saved_at", "moved_to", "fragment"),
    [
        ("mid", 1, "at position 8 of epoch 2 and its epoch is now moved back to epoch 1"),
        ("mid", 3, "moved on to epoch 3 first: the rest of epoch 2 would be skipped"),
        ("end", 0, "after its pass of epoch 2 had ended and its epoch is now moved back"),
    ],
)
def test_moving_a_restored_loader_to_an_epoch_that_loses_the_checkpoint_is_refused(
    tmp_path: Path, saved_at: str, moved_to: int, fragment: str
) -> None:
    """Epochs moved with loader.sampler.set_epoch (the DDP tutorial) leave plan.epoch at 0, and
    Lightning Fabric counts its own: a resumed loop then set the epoch back (replaying the
    epochs before) or on (skipping the rest of the restored one), silently."""
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    loader.sampler.set_epoch(2)  # type: ignore[attr-defined]
    if saved_at == "mid":
        _take(loader, 2)
    else:
        sums(loader)  # the whole pass, to StopIteration
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    assert plan.epoch == 0 and loader.epoch == 2
    loader.sampler.set_epoch(moved_to)  # type: ignore[attr-defined]
    with pytest.raises(ddpseed.StateError, match=fragment) as err:
        iter(loader)
    assert "start from loader.epoch" in str(err.value)
    loader.sampler.set_epoch(2)  # type: ignore[attr-defined]  # the fix: the restored epoch
    if saved_at == "mid":
        assert len(sums(loader)) == 8  # its rest
    loader.sampler.set_epoch(3)  # type: ignore[attr-defined]  # after its pass: on as usual
    assert len(sums(loader)) == 10


def test_plan_set_epoch_refuses_to_drop_a_waiting_mid_epoch_state(tmp_path: Path) -> None:
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    loader.sampler.set_epoch(2)  # type: ignore[attr-defined]
    _take(loader, 2)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan = make_plan()
    ddpseed.load_state(tmp_path / "rng.pt", plan)  # no loader yet: the state waits
    with pytest.raises(ddpseed.StateError, match="rank 0: loader 'train' was restored at pos"):
        plan.set_epoch(0)
    assert plan.epoch == 0
    loader = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    assert loader.epoch == 2 and len(sums(loader)) == 8


def test_a_resumed_loop_restarted_at_a_stale_plan_epoch_is_refused_not_replayed(
    tmp_path: Path,
) -> None:
    """The DDP tutorial moves epochs with loader.sampler.set_epoch, so plan.epoch stays 0; a
    checkpoint taken as epoch 3 begins, resumed by a loop that starts at plan.epoch, dealt
    epochs 0-2 again without a word."""
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    loader.sampler.set_epoch(3)  # type: ignore[attr-defined]
    ddpseed.save_state(tmp_path / "rng.pt", plan)  # at the top of epoch 3
    plan = make_plan()
    loader = plan.dataloader(AugmentedBlobs(40), batch_size=4, name="train")
    ddpseed.load_state(tmp_path / "rng.pt", plan)
    loader.sampler.set_epoch(plan.epoch)  # type: ignore[attr-defined]  # 0: stale
    with pytest.raises(
        ddpseed.StateError, match="epoch 3 and its epoch is now moved back to epoch 0"
    ):
        iter(loader)
    loader.sampler.set_epoch(3)  # type: ignore[attr-defined]  # the fix: loader.epoch was 3
    assert len(sums(loader)) == 10


def _epochs(resume: dict[str, Any] | None = None, stop: tuple[int, int] | None = None) -> Any:
    """Three epochs of at most 3 steps of 10 (a loop that leaves each pass early); returns the
    batches seen and, at ``stop`` (epoch, step), the plan's state."""
    plan, seen, start = make_plan(), [], 0
    loader = plan.dataloader(range(40), batch_size=4, name="train")
    if resume is not None:
        plan.load_state_dict(resume)
        start = plan.epoch
    for epoch in range(start, 3):
        plan.set_epoch(epoch)
        done = loader.state_dict()["position"] // 4  # steps of this epoch already taken
        for step, batch in enumerate(loader, done):
            seen.append(batch.tolist())
            if (epoch, step) == stop:
                return seen, plan.state_dict()
            if step == 2:
                break
    return seen, None


def test_a_resumed_pass_left_early_lets_the_loop_move_on_to_the_next_epoch() -> None:
    """A fixed number of steps per epoch (break, limit_train_batches) never ends the restored
    pass; the restored-epoch check must not then refuse the next epoch."""
    full, _ = _epochs()
    part, state = _epochs(stop=(1, 0))
    rest, _ = _epochs(resume=state)
    assert part + rest == full


def test_an_undone_restore_leaves_every_loader_as_it_was_ready_to_train() -> None:
    old = make_plan()
    loader = old.dataloader(range(40), batch_size=4, name="train")
    kept = old.dataloader(range(16), batch_size=4, name="val")
    old.set_epoch(2)
    _take(loader, 1)
    saved = old.state_dict()
    assert set(saved["loaders"]) == {"train", "val"} and kept.epoch == 2
    plan = make_plan()
    live = plan.dataloader(range(40), batch_size=4, name="train")  # restored, then undone
    plan.load_state_dict(saved)
    late = plan.dataloader(range(40), batch_size=4, name="late")  # made, then val refused
    with pytest.raises(ddpseed.StateError, match="undone"):
        plan.dataloader(range(16), batch_size=8, name="val")
    assert plan.epoch == 0 and live.epoch == 0 and live.state_dict()["position"] == 0
    for epoch in (0, 1):  # the script trains on from scratch, as the message says it may
        plan.set_epoch(epoch)
        assert len(sums_of(live)) == 10 and len(sums_of(late)) == 10


def sums_of(loader: Any) -> list[Any]:
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("style", ["plan.set_epoch", "loader.sampler.set_epoch"])
def test_a_second_load_rolls_back_without_leaving_the_plan_half_restored(style: str) -> None:
    plan = make_plan()
    loader = plan.dataloader(range(40), batch_size=4, name="train")
    saved = {}
    for epoch in range(3):
        if style == "plan.set_epoch":
            plan.set_epoch(epoch)
        else:
            loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        _take(loader, 1)
        saved[epoch] = plan.state_dict()
    plan = make_plan()
    loader = plan.dataloader(range(40), batch_size=4, name="train")
    plan.load_state_dict(saved[2])
    _take(loader, 2)
    plan.load_state_dict(saved[1])  # a roll-back to an older checkpoint
    assert (loader.epoch, loader.state_dict()["position"]) == (1, 4)
    plan.load_state_dict(saved[1])  # and the same one again
    assert len(sums_of(loader)) == 9


def test_unnamed_loaders_take_their_own_state_through_load_state_dict() -> None:
    """A loader made again every epoch without name= is 'loader<k>': its own torchdata-style
    state, saved as 'loader1', must load into the resumed run's 'loader0'."""
    saved_by = make_plan()
    saved_by.dataloader(range(40), batch_size=4)
    first = saved_by.dataloader(range(40), batch_size=4)
    _take(first, 3)
    state = first.state_dict()
    assert state["name"] == "loader1"
    again = make_plan().dataloader(range(40), batch_size=4)
    again.load_state_dict(state)
    assert again.name == "loader0" and len(sums_of(again)) == 7
