"""Loader throughput: ``plan.dataloader`` against torch's ``DataLoader`` + ``DistributedSampler``.

What a user would otherwise write is torch's ``DataLoader(ds, batch_size=64,
sampler=DistributedSampler(ds, ...), num_workers=w)``; ddpseed's loader adds per-batch worker
seeding and an exact position. Both arms iterate one full epoch per pass of the same dataset
(shuffled, batch 64, rank 0 of 1), alternated in one warm process by :mod:`ddpseed.paired`
together with a second torch arm (the A/A control, this run's noise floor). Two datasets: a cheap
one (8 floats drawn from torch, NumPy and ``random``, as an augmentation would) and one that also
spends ~1 ms of CPU per item.

A second table prices ``randomness="sample"`` (three RNGs seeded before every item, the main
process's streams saved and put back per batch with ``num_workers=0``) against the default
``randomness="batch"``: both arms are ``plan.dataloader``, on the ~1 ms dataset.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import measure, paired
from .measure import fmt_ratio, out

BATCH = 64
SEED = 1234
# (dataset, per-item cost in ms, workers, samples per pass): passes of a fraction of a second,
# so a minute holds enough rounds for a tight interval.
CASES = (
    ("cheap", 0.0, 0, 10_000),
    ("cheap", 0.0, 2, 10_000),
    ("1 ms", 1.0, 0, 300),
    ("1 ms", 1.0, 2, 600),
)
QUICK_FLOOR = 256  # quick runs shrink the passes, to no fewer samples than this


# The sample-keyed cases: (dataset, cost, workers, samples per pass), as in CASES.
SAMPLE_CASES = (("1 ms", 1.0, 0, 300), ("1 ms", 1.0, 2, 600))


class Items(Dataset[torch.Tensor]):
    """``n`` items of 8 floats drawn from torch, NumPy and ``random``; ``cost_ms`` of busy CPU."""

    def __init__(self, n: int, cost_ms: float) -> None:
        self.n, self.cost_s = n, cost_ms / 1000

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.cost_s:
            end = time.perf_counter() + self.cost_s
            while time.perf_counter() < end:  # a decode or an augmentation: CPU, not sleep
                pass
        drawn = np.concatenate([torch.rand(3).numpy(), np.random.rand(3), [random.random()] * 2])
        return torch.from_numpy(drawn.astype(np.float32))


def torch_arm(ds: Items, workers: int) -> Any:
    sampler: DistributedSampler[int] = DistributedSampler(
        ds, num_replicas=1, rank=0, shuffle=True, seed=SEED
    )
    loader = DataLoader(ds, batch_size=BATCH, sampler=sampler, num_workers=workers)
    epochs = iter(range(10**9))

    def make() -> Any:
        sampler.set_epoch(next(epochs))
        return loader

    return make


def seeded_arm(ds: Items, workers: int, randomness: str = "batch") -> Any:
    import ddpseed

    plan = ddpseed.setup(seed=SEED)
    loader = plan.dataloader(
        ds,
        batch_size=BATCH,
        num_workers=workers,
        shuffle=True,
        randomness=randomness,  # type: ignore[arg-type]
    )
    epochs = iter(range(10**9))

    def make() -> Any:
        plan.set_epoch(next(epochs))
        return loader

    return make


def loader_child(
    cost_ms: float, workers: int, n: int, seconds: float, versus: str = "torch"
) -> dict[str, Any]:
    """The three arms alternated in this process for ``seconds``; pass times per arm.

    ``versus="batch"``: the baseline arms are ``plan.dataloader(randomness="batch")`` and the
    measured one ``randomness="sample"`` (the "torch" keys then name that baseline)."""
    ds = Items(n, cost_ms)
    base = seeded_arm if versus == "batch" else torch_arm
    measured = seeded_arm(ds, workers, "sample" if versus == "batch" else "batch")
    makers = {"torch": base(ds, workers), "seeded": measured, "torch_again": base(ds, workers)}
    return paired.run_rounds(makers, seconds)


def throughput(runs: dict[str, list[tuple[float, float]]], arm: str) -> dict[str, Any]:
    """Median and 95% CI of ``arm``'s samples/s over torch's, per round (>1: faster).

    >>> throughput({"a": [(0, 2.0)] * 6, "torch": [(0, 1.0)] * 6}, "a")["median"]
    0.5
    """
    per_round = [b[1] / a[1] for a, b in zip(runs[arm], runs["torch"], strict=True)]
    return {"median": statistics.median(per_round), "ci": paired.median_ci(per_round)}


def summarize(name: str, cost_ms: float, workers: int, n: int, child: dict[str, Any]) -> Any:
    runs = child["runs"]
    return {
        "dataset": name,
        "cost_ms": cost_ms,
        "workers": workers,
        "n": n,
        "rounds": child["rounds"],
        "torch_samples_per_s": n / statistics.median(total for _, total in runs["torch"]),
        "seeded": throughput(runs, "seeded"),
        "torch_again": throughput(runs, "torch_again"),
    }


HEADER = (
    f"{'dataset':<9}{'workers':>8}{'N':>8}{'rounds':>8}{'torch samples/s':>17}  "
    f"{'plan.dataloader / torch':<26}A/A torch / torch"
)


SAMPLE_HEADER = (
    f"{'dataset':<9}{'workers':>8}{'N':>8}{'rounds':>8}{'batch samples/s':>17}  "
    f"{'sample / batch':<26}A/A batch / batch"
)


def row(r: dict[str, Any]) -> str:
    return (
        f"{r['dataset']:<9}{r['workers']:>8}{r['n']:>8}{r['rounds']:>8}"
        f"{r['torch_samples_per_s']:>17,.0f}  {fmt_ratio(r['seeded']):<26}"
        f"{fmt_ratio(r['torch_again'])}"
    )


def loader_section(seconds: float, quick: bool) -> list[dict[str, Any]]:
    out()
    out("== plan.dataloader vs torch's DataLoader + DistributedSampler, paired in one process ==")
    out(f"   shuffled, batch {BATCH}, rank 0 of 1; torch, plan.dataloader and torch")
    out("   again, one epoch each per round, cycling through every order, for")
    out(f"   ~{seconds:.0f} s per case; figures: median per-round samples/s ratio to torch")
    out("   [95% CI of the median]; A/A: this run's noise floor")
    out(HEADER)
    return _rows(CASES, seconds, quick)


def sample_section(seconds: float, quick: bool) -> list[dict[str, Any]]:
    out()
    out("== plan.dataloader(randomness='sample') vs randomness='batch', paired in one process ==")
    out(SAMPLE_HEADER)
    return _rows(SAMPLE_CASES, seconds, quick, "batch")


def _rows(cases: Any, seconds: float, quick: bool, *versus: str) -> list[dict[str, Any]]:
    results = []
    for name, cost, workers, n in cases:
        n = max(QUICK_FLOOR, n // 20) if quick else n
        child = measure.run_child(
            ["loader", cost, workers, n, seconds, *versus], 3 * seconds + measure.CHILD_TIMEOUT
        )
        results.append(summarize(name, cost, workers, n, child))
        out(row(results[-1]))
    return results
