"""Mesh seeding on real processes: init_device_mesh("cpu") on gloo under torchrun.

Each rank runs tests/helpers/mesh_rank.py and writes what it saw; the tests compare ranks by
their mesh coordinate against the policy table (README "Beyond DDP").
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ddpseed import meshcli
from helpers.procs import REPO
from helpers.ranks import parse_verify, run_ranks, torchrun

SCRIPT = REPO / "tests" / "helpers" / "mesh_rank.py"
DATA_LEN = 40


def run_mesh(tmp: Path, mesh: str, nproc: int, **env: str) -> dict[tuple[int, ...], Any]:
    out = tmp / "out"
    proc = torchrun(
        [str(SCRIPT)],
        nproc=nproc,
        timeout=240,
        env={"MESH": mesh, "OUT": str(out), "DATA_LEN": str(DATA_LEN), **env},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {tuple(s["coordinate"]): s for s in seen}


def indices(rank: dict[str, Any], epoch: int) -> list[int]:
    return [i for batch, _ in rank["epochs"][epoch] for i in batch]


def assert_same_data(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Identical index lists and bitwise-identical augmented batches, in both epochs."""
    assert a["epochs"] == b["epochs"]
    assert (a["data_rank"], a["data_world_size"]) == (b["data_rank"], b["data_world_size"])


def assert_disjoint_cover(shards: list[dict[str, Any]]) -> None:
    for epoch in (0, 1):
        parts = [indices(s, epoch) for s in shards]
        assert sum(len(p) for p in parts) == DATA_LEN
        assert sorted(i for p in parts for i in p) == list(range(DATA_LEN))


@pytest.mark.parametrize("workers", [0, 2])
def test_dp2_tp2_tp_peers_share_data_and_streams_dp_peers_split_them(
    tmp_path: Path, workers: int
) -> None:
    ranks = run_mesh(tmp_path, "dp=2,tp=2", 4, WORKERS=str(workers))
    for dp in (0, 1):
        a, b = ranks[(dp, 0)], ranks[(dp, 1)]
        assert a["data_rank"] == dp and a["data_world_size"] == 2
        assert_same_data(a, b)
        assert a["draws"] == b["draws"] and a["process_seed"] == b["process_seed"]
    assert_disjoint_cover([ranks[(0, 0)], ranks[(1, 0)]])
    assert ranks[(0, 0)]["epochs"][0] != ranks[(0, 0)]["epochs"][1]  # epochs reshuffle
    for tp in (0, 1):
        assert ranks[(0, tp)]["draws"] != ranks[(1, tp)]["draws"]
        assert set(ranks[(0, tp)]["draws"]).isdisjoint(ranks[(1, tp)]["draws"])


def test_pp2_dp2_tp2_follows_the_policy_table(tmp_path: Path) -> None:
    ranks = run_mesh(tmp_path, "pp=2,dp=2,tp=2", 8, WORKERS="2")
    for (pp, dp, tp), seen in ranks.items():
        assert seen["data_rank"] == dp
        tp_peer, pp_peer, dp_peer = (
            ranks[(pp, dp, 1 - tp)],
            ranks[(1 - pp, dp, tp)],
            ranks[(pp, 1 - dp, tp)],
        )
        assert_same_data(seen, tp_peer)
        assert_same_data(seen, pp_peer)  # stages of one replica read the same batches
        assert seen["draws"] == tp_peer["draws"]
        assert seen["draws"] != pp_peer["draws"] and seen["draws"] != dp_peer["draws"]
    assert_disjoint_cover([ranks[(0, 0, 0)], ranks[(0, 1, 0)]])
    assert len({s["process_seed"] for s in ranks.values()}) == 4  # one per (pp, dp)


@pytest.mark.parametrize(
    ("rank_env", "message"),
    [
        (
            {"DISTINCT_DIMS": "dp,tp"},
            r"SeedMismatchError: ranks were given different mesh settings.*\n  ranks 0-2: mesh "
            r"\(dp=2, tp=2\), data_dims \(dp\), distinct_dims \(dp\)\n  ranks 3: mesh "
            r"\(dp=2, tp=2\), data_dims \(dp\), distinct_dims \(dp, tp\)\n",
        ),
        (
            {"DATA_DIMS": "dq"},
            r"ArgumentError: invalid mesh settings on 1 of 4 ranks.*\n  rank 3: data_dims="
            r"\('dq',\) names 'dq', not a dimension",
        ),
        (
            {"NO_MESH": "1"},
            r"different mesh settings.*\n  ranks 0-2: mesh .*\n  ranks 3: no mesh\n",
        ),
    ],
    ids=["one-rank-other-distinct-dims", "one-rank-bad-data-dims", "one-rank-no-mesh"],
)
def test_mesh_settings_one_rank_disagrees_with_are_refused_on_every_rank(
    tmp_path: Path, rank_env: dict[str, str], message: str
) -> None:
    results = run_ranks(
        SCRIPT,
        4,
        timeout=180,
        env={"MESH": "dp=2,tp=2", "OUT": str(tmp_path), "TIMEOUT": "60"},
        per_rank_env={3: rank_env},
    )
    for r in results:
        assert r.returncode == 3, f"rank {r.rank}:\n{r.stderr[-3000:]}"
        line = r.stderr[r.stderr.index("DDPSEED_ERROR") :]
        assert re.search(message, line), line
    assert not list(tmp_path.glob("rank*.json"))


def test_fork_splits_tp_peers_inside_and_they_agree_again_after(tmp_path: Path) -> None:
    """dp=2, tp=2: inside ``plan.fork("tp")`` every rank draws its own values; after the block
    tp peers agree again. A DTensor dropout on the CPU mesh draws from the process's torch
    generator (DTensor's offset tracker is CUDA-only): replicated over tp it stays replicated
    (tp peers share the stream), sharded over tp inside the fork each shard gets its own mask."""
    ranks = run_mesh(tmp_path, "dp=2,tp=2", 4, FORK="1")
    inside = [tuple(s["inside_fork"]) for s in ranks.values()]
    again = [tuple(s["fork_again"]) for s in ranks.values()]
    assert len(set(inside)) == 4 and len(set(again)) == 4 and not set(inside) & set(again)
    for dp in (0, 1):
        a, b = ranks[(dp, 0)], ranks[(dp, 1)]
        assert a["before_fork"] == b["before_fork"]
        assert a["after_fork"] == b["after_fork"]
        assert a["replicated_dropout"] == b["replicated_dropout"]
        assert a["fork_dropout"] != b["fork_dropout"]
    assert ranks[(0, 0)]["after_fork"] != ranks[(1, 0)]["after_fork"]
    assert all(s["dtensor_dropout_is_local_dropout"] for s in ranks.values())


TRAIN = REPO / "tests" / "helpers" / "mesh_train.py"


def train(tmp: Path, name: str, restarts: int = 0, **env: str) -> list[dict[str, Any]]:
    out = tmp / name
    proc = torchrun(
        [str(TRAIN)],
        nproc=8,
        timeout=420,
        extra=[f"--max-restarts={restarts}"],
        env={"MESH": "pp=2,dp=2,tp=2", "OUT": str(out), **env},
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(8)]


def test_sigkill_and_torchrun_restart_resume_forked_streams_bitwise(tmp_path: Path) -> None:
    """pp=2, dp=2, tp=2 with 2 workers: rank 1 is killed at step 9 (checkpoint at 8, mid-epoch
    1); the restarted job's batches, shared draws and forked draws equal an unkilled run's."""
    straight = train(tmp_path, "straight")
    ckpt = {"CKPT": str(tmp_path / "ckpt"), "KILL_AT": "9"}
    killed = train(tmp_path, "killed", restarts=1, **ckpt)
    assert [k["attempt"] for k in killed] == [1] * 8
    for s, k in zip(straight, killed, strict=True):
        assert len(s["trace"]) == 12 and k["trace"] == s["trace"]
    by_rank = [s["trace"] for s in straight]
    # Ranks are (pp, dp, tp) in row-major order: rank 2*j and 2*j + 1 are tp peers.
    for j in range(4):
        for a, b in zip(by_rank[2 * j], by_rank[2 * j + 1], strict=True):
            assert a[1:3] == b[1:3] and a[3] != b[3]  # same batch and shared draws; own fork


def test_verify_under_a_mesh_checks_tp_peers_agree_and_dp_peers_differ() -> None:
    cmd = ["-m", "ddpseed", "verify", "--json", "--seed", "5", "--mesh", "dp=2,tp=2"]
    proc = torchrun(cmd, nproc=4, timeout=240)
    assert proc.returncode == 0, proc.stderr[-5000:]
    reports = parse_verify(proc.stdout)
    assert all(r["agree"] for r in reports)
    assert [r["data_rank"] for r in reports] == [0, 0, 1, 1]
    assert reports[0]["draws"] == reports[1]["draws"] != reports[2]["draws"]
    assert reports[0]["shard"] == reports[1]["shard"] != reports[2]["shard"]
    # What verify reports for a job whose tp peer drew like a dp peer and read its shard:
    bad = copy.deepcopy(reports)
    bad[1].update(draws=bad[2]["draws"], expected=bad[2]["draws"], shard=bad[2]["shard"])
    problems = meshcli.verify_problems(bad, 64)
    assert "ranks 0 and 1: expected the same draws (peers along shared dims)" in problems
    assert "ranks 1 and 2: expected different draws" in problems
    assert "ranks 0 and 1: shards break the data dims" in problems
