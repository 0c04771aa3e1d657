"""Elastic exactness on real torchrun ranks (gloo, CPU): the same data stream on any number of
ranks with ``randomness="sample"``, and resume on another world size.

Each run appends one JSON line per step per rank (tests/helpers/elastic_rank.py); a *global
step* is the union of what every rank consumed at that step.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from test_integrity import assert_all_failed, assert_all_ok, run_case

import ddpseed
from helpers.ranks import torchrun

SCRIPT = str(Path(__file__).parent / "helpers" / "elastic_rank.py")
GLOBAL_BATCH = 16

SEED = 4321
Item = tuple[float, ...]
Steps = dict[tuple[int, int], list[Item]]  # (epoch, global position of the step) -> sorted items


def run(tmp: Path, name: str, world: int, **settings: Any) -> Path:
    out = tmp / name
    out.mkdir(exist_ok=True)
    env = {"OUT": str(out), "DDPSEED_SEED": str(SEED), "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in settings.items()})
    proc = torchrun([SCRIPT], nproc=world, timeout=400, env=env)
    if settings.get("KILL_AT"):
        assert proc.returncode != 0, "the killed run was meant to die"
    else:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def steps(out: Path, global_batch: int = GLOBAL_BATCH) -> Steps:
    """Every global step's items (index and draws), sorted, from all ranks' logs, keyed by
    the epoch and the global position the step starts at."""
    found: dict[tuple[int, int], list[Item]] = defaultdict(list)
    for log in out.glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            key = (rec["epoch"], rec["start"] + rec["step"] * global_batch)
            found[key] += [tuple(item) for item in rec["items"]]
    return {key: sorted(items) for key, items in sorted(found.items())}


def per_world(
    tmp: Path, workers_of: dict[int, int], global_batch: int, **settings: Any
) -> dict[int, Steps]:
    """Each world's global steps over the same data, global batch and settings (two epochs);
    ``workers_of`` maps a world size to its DataLoader workers per rank."""
    return {
        world: steps(
            run(
                tmp,
                f"world{world}",
                world,
                BATCH=global_batch // world,
                WORKERS=workers,
                EPOCHS=2,
                **settings,
            ),
            global_batch,
        )
        for world, workers in workers_of.items()
    }


@pytest.mark.parametrize("scalable", [0, 1], ids=["torch-order", "scalable"])
def test_one_two_and_four_ranks_consume_identical_global_steps(
    tmp_path: Path, scalable: int
) -> None:
    """N=100 (divisible by 1, 2 and 4: no padding), global batch 16, two epochs; the worker
    counts differ on purpose (2, 0, 1)."""
    runs = per_world(tmp_path, {1: 2, 2: 0, 4: 1}, GLOBAL_BATCH, DATA_LEN=100, SCALABLE=scalable)
    assert len(runs[1]) == 2 * 7  # ceil(100 / 16) steps per epoch
    assert sorted(i[0] for k, items in runs[1].items() if k[0] == 0 for i in items) == [
        float(i) for i in range(100)
    ]
    assert runs[2] == runs[1]
    assert runs[4] == runs[1]
    weights = {
        world: json.loads((tmp_path / f"world{world}" / "weights.json").read_text())
        for world in runs
    }
    for world in (2, 4):  # the all-reduce sums in another order: equal to float tolerance
        assert weights[world] == pytest.approx(weights[1], rel=1e-12, abs=1e-12)


def test_three_ranks_consume_the_global_steps_of_one_with_global_batch_12(tmp_path: Path) -> None:
    """3 ranks need a global batch 3 divides: 12 over N=96 (no padding), two epochs, workers
    2 on the single rank and 1 on each of the three."""
    runs = per_world(tmp_path, {1: 2, 3: 1}, 12, DATA_LEN=96)
    assert len(runs[1]) == 2 * 8
    assert runs[3] == runs[1]


def epoch_order(n: int, epoch: int) -> list[int]:
    """The epoch's global order (torch's permutation; one rank takes every position)."""
    sampler = ddpseed.SeededDistributedSampler(range(n), num_replicas=1, rank=0, seed=SEED)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_killed_on_four_ranks_and_resumed_on_two_three_and_eight_is_exactly_once(
    tmp_path: Path,
) -> None:
    """N=1003, global batch 16: 4 ranks (batch 4, 2 workers) save after global step 20 of
    epoch 0 and rank 0 is SIGKILLed after step 22; the save resumes with elastic=True on 2
    ranks (batch 8, 1 worker), 3 ranks (batch 5: another global batch) and 8 ranks (batch 2;
    ranks 4-7 have no file of their own)."""
    n = 1003
    common = {"DATA_LEN": n, "EPOCHS": 2, "STATE": tmp_path / "ckpt" / "rng.pt"}
    straight = steps(run(tmp_path, "straight", 4, BATCH=4, WORKERS=2, **common))
    killed = run(
        tmp_path, "killed", 4, BATCH=4, WORKERS=2, SAVE_AT="0:20", KILL_AT="0:22", **common
    )
    g = 21 * GLOBAL_BATCH  # the save was taken after global step 20
    before = [i for (e, x), items in steps(killed).items() if e == 0 and x < g for i in items]
    assert sorted(before) == sorted(
        i for (e, x), its in straight.items() if e == 0 and x < g for i in its
    )
    values = {i[0]: i for (e, _), items in straight.items() if e == 0 for i in items}
    order = epoch_order(n, 0)
    last = max(x for e, x in straight if e == 0)
    for world, batch, workers in ((2, 8, 1), (3, 5, 0), (8, 2, 0)):
        out = run(
            tmp_path,
            f"resumed{world}",
            world,
            BATCH=batch,
            WORKERS=workers,
            LOAD="elastic",
            **common,
        )
        resumed = steps(out, batch * world)
        after = [i for (e, _), items in resumed.items() if e == 0 for i in items]
        padding = -(n - g) % world  # torch's rule on the rest of the epoch: < world
        indices = [i[0] for i in before + after]
        assert sorted(set(indices)) == [float(i) for i in range(n)], f"world {world}: items lost"
        assert len(indices) == n + padding, f"world {world}: items repeated"
        # the rest of the epoch in the old order: global step at x holds positions x, x+1, ...
        for (e, x), items in resumed.items():
            if e == 0:
                assert x >= g and (x - g) % (batch * world) == 0
                want = [order[p % n] for p in range(x, min(x + batch * world, n + padding))]
                assert sorted(i[0] for i in items) == sorted(map(float, want)), (world, x)
        # every item drew exactly what it drew in the uninterrupted run: randomness="sample"
        assert all(values[i[0]] == i for i in after), f"world {world}: values differ"
        if batch * world == GLOBAL_BATCH:
            # so every global step after the resume is bitwise the same, but the last one,
            # which differs by its padding only (4 ranks pad 1 item; 8 ranks pad 5)
            assert {x for e, x in resumed if e == 0} == {
                x for e, x in straight if e == 0 and x >= g
            }
            for x in range(g, last, GLOBAL_BATCH):
                assert resumed[(0, x)] == straight[(0, x)], f"world {world}, position {x}"
            real = set(map(float, order[last:]))
            assert [i for i in resumed[(0, last)] if i[0] in real] == [
                i for i in straight[(0, last)] if i[0] in real
            ]
            # epoch 1 is the new world's ordinary epoch: the same global steps but the last
            assert all(resumed[(1, x)] == straight[(1, x)] for x in range(0, last, GLOBAL_BATCH))


def test_another_world_size_without_elastic_is_refused_naming_elastic_true(
    tmp_path: Path,
) -> None:
    env = {"STATE": str(tmp_path / "rng.pt")}
    assert_all_ok(run_case(2, "steps:3,save", env=env))
    assert_all_failed(
        run_case(3, "loader,load", env=env),
        "StateError",
        "save 1 was written by 2 ranks but this job has 3",
        "pass elastic=True to ddpseed.load_state",
    )


@pytest.mark.parametrize(
    ("saved", "resumed", "groups"),
    [(4, 3, ("0,2-3", 32, 48)), (2, 2, ("0", 16, 24))],
    ids=["another-world", "same-world"],
)
def test_old_ranks_at_different_global_positions_are_refused_naming_them(
    tmp_path: Path, saved: int, resumed: int, groups: tuple[str, int, int]
) -> None:
    """Ranks of one job saved at different positions (not synchronous DDP): no global
    position continues all of them, and every new rank says so at load_state, before anything
    is restored. On the same world size load_state(elastic=True) takes the exact path; it used
    to restore there and fail only at the first iter().

    save_state now refuses ranks at different positions, so the checkpoint is made as an older
    ddpseed could leave it: old rank 1's file from a save one batch further, under a commit
    record without a token (whose files are not checked for one)."""
    env = {"STATE": str(tmp_path / "rng.pt")}
    assert_all_ok(run_case(saved, "steps:2,save", env=env))
    assert_all_ok(run_case(saved, "steps:3,save", env={"STATE": str(tmp_path / "b" / "rng.pt")}))
    (tmp_path / "b" / "rng.rank1.1.pt").replace(tmp_path / "rng.rank1.1.pt")
    record = tmp_path / "rng.commit.json"
    data = json.loads(record.read_text())
    del data["token"]
    record.write_text(json.dumps(data))
    others, behind, before = groups
    assert_all_failed(
        run_case(resumed, "loader,load-elastic", env=env),
        "AgreementError",
        f"the {saved} old ranks' files of save 1 stand at different places",
        f"old ranks {others}: epoch 0, loader 'train' at global position {behind} of epoch 0",
        f"old ranks 1: epoch 0, loader 'train' at global position {before} of epoch 0",
    )


def test_a_torn_old_file_stops_every_new_rank_of_an_elastic_resume(tmp_path: Path) -> None:
    """Old rank 3's file is cut in half: new rank 0 (which verifies old files 0 and 3 of the
    4) reports it, and every new rank stops with nothing restored."""
    env = {"STATE": str(tmp_path / "rng.pt")}
    assert_all_ok(run_case(4, "steps:2,save", env=env))
    victim = tmp_path / "rng.rank3.1.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    assert_all_failed(
        run_case(3, "loader,load-elastic", env=env),
        "StateError",
        "rank3.1.pt",
        "nothing was restored",
    )


def test_batch_randomness_after_an_elastic_resume_draws_afresh_not_what_earlier_items_drew(
    tmp_path: Path,
) -> None:
    """2 ranks (batch 4, 2 workers, randomness="batch") save after global step 1; 1 rank
    (batch 8, 2 workers) resumes elastically. Before: the new shards numbered their batches
    from 0 again and the new world's worker slots were old ones (epoch 1 on 1 rank = old rank
    1's epoch 0), so items replayed the exact draws of items consumed before the save."""
    common = {"DATA_LEN": 48, "EPOCHS": 2, "WORKERS": 2, "RANDOMNESS": "batch"}
    state = {"STATE": tmp_path / "ckpt" / "rng.pt"}
    first = steps(run(tmp_path, "first", 2, BATCH=4, SAVE_AT="0:1", **common, **state), 8)
    g = 2 * 8  # the save was taken after global step 1
    before = [i for (e, x), items in first.items() if e == 0 and x < g for i in items]
    resumed = steps(run(tmp_path, "resumed", 1, BATCH=8, LOAD="elastic", **common, **state))
    after = [i for items in resumed.values() for i in items]
    assert len(after) == 48 - g + 48  # the rest of epoch 0, then epoch 1
    drawn_before = {i[1:] for i in before}
    drawn_after = [i[1:] for i in after]
    assert len(set(drawn_after)) == len(drawn_after), "items after the resume drew alike"
    assert not drawn_before & set(drawn_after), "items replayed draws made before the save"
