"""Paired timing: torch's class against ddpseed's, alternated in one warm interpreter.

On a shared VM identical code runs 10-30% apart from one run to the next, so a handful of runs
cannot tell a 5% difference. The paired sections alternate their arms (torch, ddpseed's, torch
again) in rounds, every order in turn, inside one process, for as many rounds as a time budget
allows, and report the median of the per-round ratios with a distribution-free 95% confidence
interval. The second torch arm is an A/A control: its interval shows the noise floor of the
same run and should contain 1.
"""

from __future__ import annotations

import gc
import itertools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

MIN_ROUNDS = 6  # one full cycle of the orders of three arms
MAX_ROUNDS = 600
Interval = tuple[float, float]


def median_ci(values: Sequence[float]) -> Interval:
    """A distribution-free ~95% confidence interval of the median (order statistics).

    With fewer than 6 values no order statistic gives 95%, so the whole range is returned.

    >>> median_ci([3.0, 1.0, 2.0])
    (1.0, 3.0)
    >>> median_ci(range(100))
    (39, 60)
    """
    xs = sorted(values)
    k = len(xs)
    half = 0.98 * math.sqrt(k)  # 1.96 / 2: the normal approximation to Binomial(k, 1/2)
    lo = max(0, math.floor(k / 2 - half) - 1)
    hi = min(k - 1, math.ceil(k / 2 + half))
    return xs[lo], xs[hi]


def one_pass(make: Callable[[], Any]) -> tuple[float, float]:
    """(time to the first index, time to exhaust) of one fresh sampler's iterator."""
    start = time.perf_counter()
    it = iter(make())
    next(it)
    first = time.perf_counter() - start
    for _ in it:
        pass
    return first, time.perf_counter() - start


def run_rounds(makers: Mapping[str, Callable[[], Any]], seconds: float) -> dict[str, Any]:
    """Rounds of one pass per arm, cycling through every order of the arms.

    Every arm takes every place and follows every other arm equally often, so neither position
    nor what the previous pass left in the allocator favours one. One warm-up round (discarded)
    times a round; the number of rounds is then fixed from the budget before any measured
    round, so the stopping point cannot depend on the results.
    """
    arms = list(makers)
    orders = list(itertools.permutations(arms))
    gc.collect()
    started = time.perf_counter()
    for arm in arms:
        one_pass(makers[arm])
    per_round = time.perf_counter() - started
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(seconds / max(per_round, 1e-6))))
    runs: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    for round_ in range(rounds):
        for arm in orders[round_ % len(orders)]:
            runs[arm].append(one_pass(makers[arm]))
    return {"rounds": rounds, "runs": runs}


# A pass's figures from its (time to first index, time to exhaust).
FIGURES: dict[str, Callable[[Sequence[float]], float]] = {
    "first_s": lambda run: run[0],
    "ns_per_index": lambda run: run[1],
    "after_first": lambda run: run[1] - run[0],
}


def ratios(runs: dict[str, Any], arm: str, base: str = "torch") -> dict[str, dict[str, Any]]:
    """Median and 95% CI of ``arm / base`` per round: time to the first index, the whole pass,
    and the pass after the first index.

    >>> r = ratios({"a": [(2, 4)] * 6, "torch": [(1, 4)] * 6}, "a")
    >>> r["first_s"]["median"], r["ns_per_index"]["ci"], r["after_first"]["median"]
    (2.0, (1.0, 1.0), 0.6666666666666666)
    """
    result = {}
    for figure, of in FIGURES.items():
        per_round = [of(a) / max(of(b), 1e-12) for a, b in zip(runs[arm], runs[base], strict=True)]
        result[figure] = {"median": statistics.median(per_round), "ci": median_ci(per_round)}
    return result
