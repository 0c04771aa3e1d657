"""Ranks agree on everything that must agree; checkpoints are all-or-nothing. Real gloo ranks.

Every case asserts each rank's exit status and message, and that a failing rank ended within
the timeout plus a margin (the rank script prints ELAPSED on failure; see run_case).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

import ddpseed
from helpers.ranks import RankResult, assert_bounded, run_ranks, torchrun

SCRIPT = Path(__file__).parent / "helpers" / "loader_rank.py"
TIMEOUT = 15.0
BOUND_MARGIN = 15.0


def run_case(
    world: int,
    actions: str,
    *,
    env: dict[str, str] | None = None,
    per_rank: dict[int, dict[str, str]] | None = None,
) -> list[RankResult]:
    token = f"ddpseed-integrity-{uuid.uuid4().hex}"
    results = run_ranks(
        SCRIPT,
        world,
        timeout=TIMEOUT + 90,
        env={"ACTIONS": actions, "TIMEOUT": str(TIMEOUT), "DDPSEED_SEED": "11", **(env or {})},
        per_rank_env=per_rank,
        args=[token],
    )
    assert_bounded(results, token, TIMEOUT + BOUND_MARGIN)
    return results


def error_of(r: RankResult) -> str:
    at = r.stderr.find("DDPSEED_ERROR")
    return r.stderr[at:] if at >= 0 else ""


def assert_all_failed(
    results: list[RankResult], *fragments: str, dead: tuple[int, ...] = ()
) -> list[str]:
    messages = []
    for r in results:
        if r.rank in dead:
            continue
        assert r.returncode == 3, f"rank {r.rank} exit {r.returncode}:\n{r.stderr[-3000:]}"
        for fragment in fragments:
            assert fragment in error_of(r), f"rank {r.rank} lacks {fragment!r}:\n{error_of(r)}"
        messages.append(error_of(r))
    return messages


def assert_all_ok(results: list[RankResult]) -> None:
    for r in results:
        assert r.returncode == 0 and "OK" in r.stdout, f"rank {r.rank}:\n{r.stderr[-3000:]}"


def positions(results: list[RankResult]) -> list[tuple[int, int]]:
    out = []
    for r in results:
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("POS ")][-1]
        _, epoch, pos = line.split()
        out.append((int(epoch), int(pos)))
    return out


# -- agreement ------------------------------------------------------------------------------
_SAMPLER_ARGUMENTS = [  # plan.sampler() used to compare only the dataset length: ranks with
    # different shuffle, drop_last or sampler class dealt overlapping shards (9 of 64 items
    # twice, 8 never)
    ("sampler", "SHUFFLE", ("1", "0"), "shuffle: 1 on ranks 0; 0 on ranks 1"),
    ("sampler", "DROP_LAST", ("0", "1"), "drop_last: 0 on ranks 0; 1 on ranks 1"),
    ("sampler", "SCALABLE", ("0", "1"), "sample order: 0 on ranks 0; 2 on ranks 1"),
]


@pytest.mark.parametrize(
    ("action", "setting", "values", "fragment"),
    [
        ("loader", "DATA_LEN", ("100", "90"), "dataset length: 100 on ranks 0; 90 on ranks 1"),
        ("loader", "BATCH", ("4", "8"), "batch size: 4 on ranks 0; 8 on ranks 1"),
        ("loader", "DROP_LAST", ("0", "1"), "drop_last: 0 on ranks 0; 1 on ranks 1"),
        ("loader", "SHUFFLE", ("1", "0"), "shuffle: 1 on ranks 0; 0 on ranks 1"),
        ("loader", "WORKERS", ("4", "2"), "num_workers: 4 on ranks 0; 2 on ranks 1"),
        (
            "loader",
            "RANDOMNESS",
            ("batch", "sample"),
            "randomness (0 'batch', 1 'sample'): 0 on ranks 0; 1 on ranks 1",
        ),
        *_SAMPLER_ARGUMENTS,
    ],
)
def test_loader_and_sampler_arguments_that_differ_between_ranks_stop_every_rank(
    action: str, setting: str, values: tuple[str, str], fragment: str
) -> None:
    per_rank = {r: {setting: v} for r, v in enumerate(values)}
    results = run_case(2, action, per_rank=per_rank)
    call = "plan.dataloader" if action == "loader" else "plan.sampler()"
    assert_all_failed(results, "AgreementError", f"ranks disagree on {call}", fragment)


def test_epochs_that_differ_between_ranks_stop_every_rank_at_iter() -> None:
    results = run_case(2, "loader,steps:1", per_rank={0: {"EPOCH": "0"}, 1: {"EPOCH": "1"}})
    assert_all_failed(
        results, "AgreementError", "iter(loader 'train')", "epoch: 0 on ranks 0; 1 on ranks 1"
    )


@pytest.mark.parametrize(
    ("setting", "values", "fragment"),
    [
        ("SCHEME", ("default", "disjoint"), "scheme settings: 'default' on ranks 0"),
        ("SCHEME", ("default", "disjonit"), "rank 1: scheme='disjonit' is not one of"),
        ("DETERMINISTIC", ("0", "1"), "deterministic settings: False on ranks 0"),
    ],
)
def test_setup_settings_that_differ_between_ranks_stop_every_rank(
    setting: str, values: tuple[str, str], fragment: str
) -> None:
    per_rank = {r: {setting: v, "PYTHONHASHSEED": "0"} for r, v in enumerate(values)}
    results = run_case(2, "", per_rank=per_rank)
    assert_all_failed(results, fragment)


def test_a_loader_of_one_rank_alone_needs_distributed_false_and_says_so() -> None:
    results = run_case(2, "loader", per_rank={1: {"ACTIONS": "barrier"}})
    messages = assert_all_failed(results, "CoordinationError", dead=(1,))
    assert "rank 1 never reached it" in messages[0]
    assert "distributed=False" in messages[0]


def test_loaders_made_under_different_names_show_every_rank_each_call() -> None:
    """Each rank used to say only that the others were "in another collective"."""
    results = run_case(
        2, "loader", per_rank={0: {"LOADER_NAME": "train"}, 1: {"LOADER_NAME": "trn"}}
    )
    messages = assert_all_failed(
        results,
        "CoordinationError",
        "the ranks are in different ddpseed calls",
        "plan.dataloader(name='train') on ranks 0",
        "plan.dataloader(name='trn') on ranks 1",
        "with the same loader names",
    )
    assert messages[0].replace("rank 0:", "rank 1:", 1) == messages[1]


def test_a_plan_state_restored_on_some_ranks_only_stops_every_rank_at_iter(tmp_path: Path) -> None:
    """plan.load_state_dict (the per-rank checkpoint route) under ``if rank == 0``: at an
    epoch boundary the positions agree, so the run went on with rank 1's RNGs not restored."""
    env = {"STATE": str(tmp_path / "plan.pt")}
    assert_all_ok(run_case(2, "loader,rand:3,plan-save", env=env))
    results = run_case(
        2,
        "loader,plan-load,steps:1",
        env=env,
        per_rank={1: {"ACTIONS": "loader,steps:1"}},
    )
    assert_all_failed(
        results,
        "AgreementError",
        "ranks disagree at iter(loader 'train')",
        "states loaded: 1 on ranks 0; 0 on ranks 1",
        "on every rank, not some",
    )


def test_a_rank_that_never_arrives_is_named_when_the_group_times_out_first() -> None:
    """pg_timeout below timeout: gloo's own timeout ends the wait first; that is still a rank
    that never arrived, not "a peer failed"."""
    results = run_case(2, "loader", env={"PG_TIMEOUT": "3"}, per_rank={1: {"ACTIONS": "barrier"}})
    messages = assert_all_failed(results, "CoordinationError", dead=(1,))
    assert "rank 1 never reached it" in messages[0] and "timed out after" in messages[0]


# -- checkpoints ----------------------------------------------------------------------------
def test_save_killed_between_fsync_and_rename_leaves_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    env = {"STATE": str(tmp_path / "rng.pt")}
    killed = run_case(
        2,
        "steps:3,save,steps:2,kill-rename,save",
        env=env,
        per_rank={0: {"ACTIONS": "steps:3,save,steps:2,save"}},
    )
    assert killed[1].returncode == -9
    assert_all_failed(killed[:1], "CoordinationError", "save_state")
    resumed = run_case(2, "loader,load,pos", env=env)
    assert_all_ok(resumed)
    assert positions(resumed) == [(0, 12), (0, 12)]  # save 1: both ranks at 3 batches of 4


def test_a_rank_zero_killed_in_a_save_leaves_one_readable_error_on_the_other(
    tmp_path: Path,
) -> None:
    """Rank 0 hosts the store of an env:// launch: asking it which ranks were absent, after it
    died, added torch's C++ stack traces to the survivor's log, and the message said the call
    "did not complete within 15s" when it had failed at once."""
    killed = run_case(
        2,
        "steps:3,save,steps:2,save",
        env={"STATE": str(tmp_path / "rng.pt")},
        per_rank={0: {"ACTIONS": "steps:3,save,steps:2,kill-rename,save"}},
    )
    assert killed[0].returncode == -9
    (message,) = assert_all_failed(killed[1:], "CoordinationError", "save_state")
    assert "failed after" in message and "a peer failed or disconnected during it" in message
    assert "frame #" not in killed[1].stderr, killed[1].stderr[-3000:]


def test_files_of_different_saves_are_refused_on_every_rank(tmp_path: Path) -> None:
    env = {"STATE": str(tmp_path / "rng.pt")}
    assert_all_ok(run_case(2, "steps:3,save", env=env))
    shutil.copy(tmp_path / "rng.rank1.1.pt", tmp_path / "old-rank1")
    assert_all_ok(run_case(2, "steps:5,save", env=env))
    shutil.copy(tmp_path / "old-rank1", tmp_path / "rng.rank1.2.pt")
    results = run_case(2, "loader,load,pos", env=env)
    assert_all_failed(
        results,
        "StateError",
        "failed on 1 of 2 ranks; nothing was restored",
        "rank 1: state file",
        "belongs to save 1, not save 2",
    )


@pytest.mark.parametrize("load", ["load", "load-elastic"])
def test_a_file_of_another_save_with_the_same_number_is_refused_on_every_rank(
    tmp_path: Path, load: str
) -> None:
    """Two runs (same seed and data, different model initialisation) each save once into
    their own directory; rank 1's file of run b lands in run a's (a restore mix-up). Same save
    number, same positions: only the per-save token tells the files apart (it used to load,
    rank 1 resuming run b's RNGs)."""
    for run, draws in (("a", 3), ("b", 5)):
        assert_all_ok(
            run_case(2, f"rand:{draws},steps:2,save", env={"STATE": f"{tmp_path}/{run}/rng.pt"})
        )
    tokens = {
        run: json.loads((tmp_path / run / "rng.commit.json").read_text())["token"] for run in "ab"
    }
    mixed = tmp_path / "a" / "rng.rank1.1.pt"
    shutil.copy(tmp_path / "b" / "rng.rank1.1.pt", mixed)
    results = run_case(2, f"loader,{load},pos", env={"STATE": str(tmp_path / "a" / "rng.pt")})
    messages = assert_all_failed(
        results,
        "StateError",
        "failed on 1 of 2 ranks; nothing was restored",
        f"rank 1: state file {mixed} was written by another save_state call than the save 1",
        f"(token {tokens['b']} in the file, {tokens['a']} in the record)",
        "files of different saves were mixed",
        "copy back every rank's file of one save",
    )
    assert len(set(messages)) == 1
    assert not any("POS" in r.stdout for r in results)


@pytest.mark.parametrize("mesh", ["", "dp=1,tp=2"])
def test_a_save_with_ranks_at_different_positions_is_refused_and_keeps_the_last_checkpoint(
    tmp_path: Path, mesh: str
) -> None:
    """Rank 1 takes one extra batch before save 2: the save used to be accepted and delete
    save 1, leaving no checkpoint that loads. Under a mesh of one data rank (dp=1, tp=2) both
    ranks iterate the same shard; the check used to skip loaders of one shard."""
    env = {"STATE": str(tmp_path / "rng.pt"), "MESH": mesh}
    results = run_case(
        2,
        "steps:2,save,steps:2,save",
        env=env,
        per_rank={1: {"ACTIONS": "steps:2,save,steps:3,save"}},
    )
    messages = assert_all_failed(
        results,
        "AgreementError",
        "save_state(",
        "the ranks stand at different epochs or loader positions",
        "nothing was written and the previous complete checkpoint (save 1) is intact",
        "rank 0: epoch 0, loader 'train' at 16",
        "rank 1: epoch 0, loader 'train' at 20",
        "call save_state at the same step on every rank",
    )
    assert len(set(messages)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rng.commit.json",
        "rng.rank0.1.pt",
        "rng.rank1.1.pt",
    ]
    resumed = run_case(2, "loader,load,pos", env=env)
    assert_all_ok(resumed)
    assert positions(resumed) == [(0, 8), (0, 8)]


@pytest.mark.parametrize("actions", ["steps:1,save", "loader,load"])
def test_paths_with_the_rank_formatted_in_stop_every_rank_naming_the_template(
    tmp_path: Path, actions: str
) -> None:
    """f"ckpt/rank{rank}/rng.pt" formatted by the script: the ranks used to blame each other
    for being "in another collective"."""
    call = actions.rsplit(",", 1)[1] + "_state"
    per_rank = {r: {"STATE": str(tmp_path / f"rank{r}" / "rng.pt")} for r in (0, 1)}
    messages = assert_all_failed(
        run_case(2, actions, per_rank=per_rank),
        f"ArgumentError: {call}: the ranks were given different paths",
        f"rank 0: '{tmp_path}/rank0/rng.pt'",
        f"rank 1: '{tmp_path}/rank1/rng.pt'",
        f"put {{rank}} in it, which ddpseed fills in (e.g. '{tmp_path}/rank{{rank}}/rng.pt')",
    )
    assert len(set(messages)) == 1 and "another collective" not in messages[0]
    assert list(tmp_path.iterdir()) == []


def test_a_long_error_reaches_every_rank_whole(tmp_path: Path) -> None:
    # Rank 0 alone reads the commit record; its error, with a 300-character path, must reach
    # rank 1 whole, fix text included (per-rank lines used to be cut at 256 bytes).
    deep = tmp_path / ("d" * 150) / ("e" * 150)
    deep.mkdir(parents=True)
    results = run_case(2, "loader,load", env={"STATE": str(deep / "rng.pt")})
    messages = assert_all_failed(results, "StateError", "failed on 1 of 2 ranks")
    for rank in (0, 1):
        assert f"rank 0: no checkpoint at {deep / 'rng.pt'}: its commit record" in messages[rank]
        assert "pass the path given to save_state, or start fresh" in messages[rank]


def test_save_on_only_some_ranks_names_the_call_and_the_absent_rank(tmp_path: Path) -> None:
    env = {"STATE": str(tmp_path / "rng.pt")}
    results = run_case(2, "steps:1,save", env=env, per_rank={1: {"ACTIONS": "steps:1,barrier"}})
    messages = assert_all_failed(results, "CoordinationError", dead=(1,))
    assert "save_state(" in messages[0] and "rank 1 never reached it" in messages[0]
    assert "every rank must call it" in messages[0]


def test_load_after_destroy_process_group_is_refused_on_every_rank(tmp_path: Path) -> None:
    env = {"STATE": str(tmp_path / "rng.pt")}
    results = run_case(2, "steps:1,save,destroy,load", env=env)
    assert_all_failed(
        results, "CoordinationError", "load_state(", "torch.distributed is not initialized"
    )


def test_load_state_before_the_loader_with_a_mismatch_on_one_rank_stops_every_rank(
    tmp_path: Path,
) -> None:
    env = {"STATE": str(tmp_path / "rng.pt")}
    assert_all_ok(run_case(2, "steps:2,save", env=env))
    # Rank 1's dataset is now shorter, so its shard differs: only it sees the mismatch.
    results = run_case(2, "load,loader", env=env, per_rank={1: {"DATA_LEN": "60"}})
    assert_all_failed(
        results,
        "StateError",
        "rank 1: loader 'train' was saved with dataset length 64 but is now dataset length 60",
        "restore was undone on every rank",
    )


@pytest.mark.parametrize("order", ["loader,load", "load,loader"])
def test_an_unnamed_loader_under_another_creation_number_stops_every_rank(
    tmp_path: Path, order: str
) -> None:
    """Saved as "loader1" (a first unnamed loader was made and dropped), resumed as "loader0":
    whether load_state comes before or after the loader, every rank refuses, naming both, and
    says how to continue the checkpoint (it used to start the epoch again at sample 0)."""
    env = {"STATE": str(tmp_path / "rng.pt"), "LOADER_NAME": ""}
    assert_all_ok(run_case(2, "loader,loader,steps:2,save", env=env))
    assert_all_failed(
        run_case(2, order, env=env),
        "StateError",
        "loader 'loader0' has no saved state, but the restored state of loader 'loader1' "
        "(epoch 0, position 8)",
        "pass name='loader1'",
    )


# -- extra=: the model kept in the same unit as the RNGs and positions -------------------------
_EXTRA = """
import sys

import numpy as np
import torch

import ddpseed

plan = ddpseed.setup(seed=1, timeout=60)
path = sys.argv[1]
ddpseed.save_state(path, plan, extra={"rank": plan.rank, "w": torch.full((2,), plan.rank + 0.5)})
back = ddpseed.load_state(path, plan)
print(f"rank {plan.rank} got {back['rank']} {back['w'].tolist()}", flush=True)
# Not a plain value; then one json takes but torch.load(weights_only=True) would refuse.
for bad in ({"device": torch.device("cpu")}, {"best": np.float64(0.5)}):
    try:
        ddpseed.save_state(path, plan, extra=bad if plan.rank == 1 else None)
    except ddpseed.StateError as exc:
        print(f"rank {plan.rank} refused: {'rank 1: save_state(extra=...)' in str(exc)}")
print(f"rank {plan.rank} still {ddpseed.load_state(path, plan)['rank']}", flush=True)
"""


def test_extra_commits_with_the_save_and_comes_back_to_its_own_rank(tmp_path: Path) -> None:
    """A model saved apart from save_state could be of another step after a kill between the
    two (batches silently skipped); extra= makes it one unit."""
    script = tmp_path / "extra.py"
    script.write_text(_EXTRA)
    proc = torchrun([str(script), str(tmp_path / "ckpt.pt")], nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        assert f"rank {rank} got {rank} [{rank + 0.5}, {rank + 0.5}]" in proc.stdout
        # every rank, for rank 1's extra, both times
        assert proc.stdout.count(f"rank {rank} refused: True") == 2, proc.stdout
        assert f"rank {rank} still {rank}" in proc.stdout  # the previous save still loads


def test_a_changed_extra_is_refused_as_corrupted(tmp_path: Path) -> None:
    plan = ddpseed.setup(seed=1)
    ddpseed.save_state(tmp_path / "ckpt.pt", plan, extra={"w": torch.zeros(2)})
    target = tmp_path / "ckpt.rank0.1.pt"
    payload = torch.load(target, weights_only=True)
    payload["extra"]["w"][0] = 9.0
    torch.save(payload, target)
    with pytest.raises(ddpseed.StateError, match=r"digest of its extra= does not match"):
        ddpseed.load_state(tmp_path / "ckpt.pt", plan)


def test_extra_holds_what_real_models_and_optimizers_give(tmp_path: Path) -> None:
    """BatchNorm's num_batches_tracked and Adam's step are 0-dim tensors, which the digest
    could not view as bytes; optimizer states mix int and str keys in places."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 3)).sum().backward()
    opt.step()
    extra = {"model": model.state_dict(), "opt": opt.state_dict(), "mixed": {1: 0, "a": 2}}
    plan = ddpseed.setup(seed=1)
    ddpseed.save_state(tmp_path / "ckpt.pt", plan, extra=extra)
    back = ddpseed.load_state(tmp_path / "ckpt.pt", plan)
    assert torch.equal(back["model"]["1.num_batches_tracked"], torch.tensor(1))
    assert back["opt"]["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert back["mixed"] == {1: 0, "a": 2}


_GROW = """
import sys

import torch

import ddpseed

plan = ddpseed.setup(seed=1, timeout=60)
if sys.argv[2] == "save":
    ddpseed.save_state(sys.argv[1], plan, extra={"w": torch.tensor([2.5])})
else:
    back = ddpseed.load_state(sys.argv[1], plan, elastic=True)
    print(f"rank {plan.rank} of {plan.world_size} got {back['w'].tolist()}", flush=True)
"""


def test_an_elastic_resume_onto_more_ranks_gives_every_new_rank_an_extra(tmp_path: Path) -> None:
    """New ranks beyond the old world got None: the README's recipe failed on them alone
    while the others went on into collectives."""
    script = tmp_path / "grow.py"
    script.write_text(_GROW)
    for world, mode in ((1, "save"), (2, "load")):
        proc = torchrun([str(script), str(tmp_path / "ckpt.pt"), mode], nproc=world, timeout=240)
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert all(f"rank {r} of 2 got [2.5]" in proc.stdout for r in (0, 1))
