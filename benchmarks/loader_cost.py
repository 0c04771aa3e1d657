"""Where ``plan.dataloader``'s cost against torch's goes, with workers.

From the repository root::

    python -m benchmarks.loader_cost [--seconds S] [--cost-ms MS] [--workers W]

Four arms alternated in one process (:func:`ddpseed.paired.run_rounds`), one epoch of the
bench's dataset each per round: torch's ``DataLoader`` + ``DistributedSampler``;
``plan.dataloader`` as users get it; the same loader with its batches sent as plain lists
(no per-batch seed carried, no worker reseeded: *not exact after a resume*, a diagnostic only);
and torch again (the A/A control). The first line is what ``ddpseed bench`` measures; the
second is everything but the per-batch reseeding; their ratio is what that reseeding costs
(carrying the seed with the indices, and seeding three generators in the worker).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from ddpseed import loaderbench, paired
from ddpseed.measure import fmt_ratio


def plain_batches(ds: loaderbench.Items, workers: int) -> Any:
    """``plan.dataloader`` whose batch sampler makes plain lists, as it does without workers."""
    make = loaderbench.seeded_arm(ds, workers)
    make().batch_sampler.workers = 0
    return make


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--cost-ms", type=float, default=0.0, help="busy CPU per item")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=10_000, help="samples per epoch")
    args = parser.parse_args(argv)
    ds = loaderbench.Items(args.n, args.cost_ms)
    makers = {
        "torch": loaderbench.torch_arm(ds, args.workers),
        "plan.dataloader": loaderbench.seeded_arm(ds, args.workers),
        "without reseeding": plain_batches(ds, args.workers),
        "torch again": loaderbench.torch_arm(ds, args.workers),
    }
    runs = paired.run_rounds(makers, args.seconds)["runs"]
    print(f"samples/s over torch's, median [95% CI], {len(runs['torch'])} rounds")
    for arm in list(makers)[1:]:
        print(f"  {arm:<20}{fmt_ratio(loaderbench.throughput(runs, arm))}")
    pairs = zip(runs["without reseeding"], runs["plan.dataloader"], strict=True)
    per_round = [without[1] / seeded[1] for without, seeded in pairs]
    reseeding = {"median": statistics.median(per_round), "ci": paired.median_ci(per_round)}
    print(f"  {'per-batch reseeding':<20}{fmt_ratio(reseeding)} (plan.dataloader over without)")


if __name__ == "__main__":
    main()
