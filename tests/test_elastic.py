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

from helpers.ranks import torchrun

SCRIPT = str(Path(__file__).parent / "helpers" / "elastic_rank.py")
GLOBAL_BATCH = 16

Item = tuple[float, ...]
Steps = dict[tuple[int, int], list[Item]]  # (epoch, global step) -> sorted items


def run(tmp: Path, name: str, world: int, **settings: Any) -> Path:
    out = tmp / name
    out.mkdir(exist_ok=True)
    env = {"OUT": str(out), "DDPSEED_SEED": "4321", "OMP_NUM_THREADS": "1"}
    env.update({k: str(v) for k, v in settings.items()})
    proc = torchrun([SCRIPT], nproc=world, timeout=400, env=env)
    if settings.get("KILL_AT"):
        assert proc.returncode != 0, "the killed run was meant to die"
    else:
        assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def steps(out: Path, global_batch: int = GLOBAL_BATCH) -> Steps:
    """Every global step's items (index and draws), sorted, from all ranks' logs."""
    found: dict[tuple[int, int], list[Item]] = defaultdict(list)
    for log in out.glob("rank*.jsonl"):
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            assert rec["start"] % global_batch == 0, rec["start"]
            key = (rec["epoch"], rec["start"] // global_batch + rec["step"])
            found[key] += [tuple(item) for item in rec["items"]]
    return {key: sorted(items) for key, items in sorted(found.items())}


@pytest.mark.parametrize("scalable", [0, 1], ids=["torch-order", "scalable"])
def test_one_two_and_four_ranks_consume_identical_global_steps(
    tmp_path: Path, scalable: int
) -> None:
    """N=100 (divisible by 1, 2 and 4: no padding), global batch 16, two epochs; the worker
    counts differ on purpose (2, 0, 1)."""
    runs = {
        world: steps(
            run(
                tmp_path,
                f"world{world}",
                world,
                DATA_LEN=100,
                BATCH=GLOBAL_BATCH // world,
                WORKERS=workers,
                EPOCHS=2,
                SCALABLE=scalable,
            )
        )
        for world, workers in ((1, 2), (2, 0), (4, 1))
    }
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
