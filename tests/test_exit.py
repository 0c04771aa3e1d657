"""Exit without destroy_process_group: every rank exits 0, and only ddpseed's group is destroyed.

A rank that exits while gloo's worker thread still holds a finished collective's tensors can die
with "terminate called without an active exception" (SIGABRT) once the interpreter finalizes;
ddpseed destroys the group it made at exit, which joins those threads first. The abort itself
is a race (a few percent of exits on a loaded 2-core machine), so these tests check the
mechanism on real gloo ranks, and every run must still exit 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers.ranks import RankResult, run_ranks

SCRIPT = Path(__file__).parent / "helpers" / "exit_rank.py"


def marked(result: RankResult, marker: str) -> dict[str, Any]:
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith(marker + " ")]
    assert len(lines) == 1, f"rank {result.rank}:\n{result.stdout}\n{result.stderr[-3000:]}"
    found: dict[str, Any] = json.loads(lines[0].split(" ", 1)[1])
    return found


def run(group: str, **env: str) -> list[RankResult]:
    results = run_ranks(SCRIPT, 2, timeout=180, env={"EXIT_GROUP": group, **env})
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exit {r.returncode}:\n{r.stderr[-3000:]}"
        assert "terminate called" not in r.stderr, r.stderr[-3000:]
    return results


@pytest.mark.parametrize("cpu", ["", "1"], ids=["all-cpus", "one-cpu"])
def test_group_ddpseed_made_is_destroyed_at_exit(cpu: str) -> None:
    """Collectives right before exit: ddpseed's atexit hook destroys its group and gloo's worker
    threads are gone before the interpreter finalizes."""
    for r in run("ddpseed", EXIT_REPEAT="20", EXIT_CPU=cpu):
        assert marked(r, "BEFORE")["workers"] > 0, "gloo made no worker threads?"
        assert marked(r, "EXIT_CHECK") == {"initialized": False, "workers": 0}


def test_exchange_returns_after_gloo_dropped_its_tensors() -> None:
    """ddpseed's exchange as the last collectives before exit: when each returns, gloo's worker
    holds none of its tensors (it often still does when the waits return)."""
    results = run("ddpseed", EXIT_REPEAT="0", EXIT_EXCHANGES="100", EXIT_CPU="1")
    for r in results:
        assert marked(r, "EXCHANGES")["at_return"] == 0, marked(r, "EXCHANGES")
        assert marked(r, "EXIT_CHECK") == {"initialized": False, "workers": 0}


def test_group_the_script_made_is_left_alone() -> None:
    for r in run("own"):
        assert marked(r, "EXIT_CHECK")["initialized"] is True, "ddpseed destroyed the user's group"
