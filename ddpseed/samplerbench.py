"""The sampler sections of ``ddpseed bench``: torch's ``DistributedSampler`` against ddpseed's.

Rank 0 of 8 iterates its shard (``shuffle=True``) with torch's ``DistributedSampler``,
``ddpseed.SeededDistributedSampler`` (torch's order, so about torch's cost) and
``ddpseed.ScalableDistributedSampler`` (a lazily evaluated Feistel permutation): time to the
first index, ns per index over the whole shard and after the first index, and peak RSS above
the interpreter's baseline. Every such run is a fresh interpreter, so its RSS is that sampler's
alone. Then, up to N = 1e7, the three and torch again (an A/A control) are paired in one warm
interpreter for a time budget (:mod:`ddpseed.paired`), which resolves a few percent on a noisy
machine.
"""

from __future__ import annotations

import functools
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import measure, paired
from .measure import Result, fmt_bytes, fmt_n, fmt_ratio, fmt_time, out

REPLICAS = 8
SAMPLERS = {
    "torch": "torch DistributedSampler",
    "seeded": "ddpseed SeededDistributedSampler",
    "scalable": "ddpseed ScalableDistributedSampler",
}
# The warm paired rounds: the baseline, ddpseed's two samplers, the baseline again (A/A).
ARMS = {"torch": "torch", "seeded": "seeded", "scalable": "scalable", "torch_again": "torch"}


def max_rss_bytes() -> int:
    """Peak resident set of this process (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class PeakRSS:
    """Peak RSS growth from :meth:`start` on.

    ``ru_maxrss`` alone misleads here: on Linux a spawned child's ``ru_maxrss`` starts at its
    parent's RSS at spawn time (the mm that exec replaced), and an import-time peak hides any
    later growth below it. Where ``/proc/self/clear_refs`` exists the kernel's peak (VmHWM) is
    reset to the current RSS at :meth:`start`; elsewhere ``ru_maxrss`` minus its value at
    :meth:`start` is used.
    """

    def start(self) -> None:
        rss = _proc_status_kib("VmRSS") if _reset_peak() else None
        self.method = "ru_maxrss" if rss is None else "VmHWM"
        self.baseline = max_rss_bytes() if rss is None else rss * 1024

    def growth(self) -> int:
        hwm = _proc_status_kib("VmHWM") if self.method == "VmHWM" else None
        peak = hwm * 1024 if hwm is not None else max_rss_bytes()
        return max(0, peak - self.baseline)


def sampler_factory(kind: str, n: int) -> Callable[[], Any]:
    """A constructor of ``kind`` over ``range(n)``, imported here so timing never includes it."""
    import torch.utils.data

    import ddpseed

    cls: Any = {
        "torch": torch.utils.data.DistributedSampler,
        "seeded": ddpseed.SeededDistributedSampler,
        "scalable": ddpseed.ScalableDistributedSampler,
    }[kind]
    return functools.partial(cls, range(n), num_replicas=REPLICAS, rank=0, shuffle=True, seed=0)


def sampler_child(kind: str, n: int) -> Result:
    """Time one full pass over rank 0's shard; runs in a fresh process."""
    import gc

    make = sampler_factory(kind, n)  # imports the sampler's modules before the baseline
    gc.collect()
    rss = PeakRSS()
    rss.start()
    start = time.perf_counter()
    it = iter(make())
    next(it)
    first = time.perf_counter() - start
    count = 1
    for count, _ in enumerate(it, 2):  # noqa: B007  (count is the result)
        pass
    total = time.perf_counter() - start
    return {
        "sampler": kind,
        "n": n,
        "count": count,
        "first_s": first,
        "total_s": total,
        "rss_bytes": rss.growth(),
        "baseline_rss_bytes": rss.baseline,
        "rss_method": rss.method,
    }


def paired_child(n: int, seconds: float) -> Result:
    """The :data:`ARMS` alternated in this warm process for ``seconds``."""
    makers = {arm: sampler_factory(kind, n) for arm, kind in ARMS.items()}
    return {"n": n, **paired.run_rounds(makers, seconds)}


def measure_samplers(kinds: Sequence[str], n: int, repeats: int) -> list[Result]:
    """Each of ``kinds`` measured ``repeats`` times in fresh processes, interleaved.

    Round ``r`` runs the kinds rotated by ``r``, so each takes each place in turn. Times on a
    shared machine drift by tens of percent within seconds, so the ratios against torch are
    medians of per-round ratios (runs seconds apart), not ratios of medians.
    """
    runs: dict[str, list[Result]] = {kind: [] for kind in kinds}
    for round_ in range(repeats):
        shift = round_ % len(kinds)
        for kind in [*kinds[shift:], *kinds[:shift]]:
            runs[kind].append(measure.run_child(["sampler", kind, n]))
    results = [summarize(kind, n, runs[kind]) for kind in kinds]
    if "torch" in runs:
        for r in results:
            r["vs_torch"] = vs_torch(runs[r["sampler"]], runs["torch"])
    return results


def vs_torch(ours: list[Result], theirs: list[Result]) -> Result:
    """Run ``i`` against run ``i``: per-figure median ratio and its 95% CI, and the RSS ratio.

    >>> r = vs_torch([{"first_s": 2, "total_s": 4, "rss_bytes": 9}],
    ...              [{"first_s": 1, "total_s": 4, "rss_bytes": 9}])
    >>> r["first_s"], r["ns_per_index"], r["rss_bytes"]
    ({'median': 2.0, 'ci': (2.0, 2.0)}, {'median': 1.0, 'ci': (1.0, 1.0)}, 1.0)
    """
    runs = {
        "ours": [(r["first_s"], r["total_s"]) for r in ours],
        "torch": [(r["first_s"], r["total_s"]) for r in theirs],
    }
    peak = max(r["rss_bytes"] for r in ours) / max(1, max(r["rss_bytes"] for r in theirs))
    return {**paired.ratios(runs, "ours"), "rss_bytes": peak}


def summarize(kind: str, n: int, runs: list[Result]) -> Result:
    """Median time to first index and ns/index, max RSS, of one sampler's runs."""
    count = runs[0]["count"]
    after = [(r["total_s"] - r["first_s"]) / max(1, count - 1) for r in runs]
    return {
        "sampler": kind,
        "n": n,
        "count": count,
        "repeats": len(runs),
        "first_s": statistics.median(r["first_s"] for r in runs),
        "ns_per_index": statistics.median(r["total_s"] / count for r in runs) * 1e9,
        "ns_per_index_after_first": statistics.median(after) * 1e9,
        "rss_bytes": max(r["rss_bytes"] for r in runs),
    }


def _row(r: Result) -> str:
    return (
        f"{fmt_n(r['n']):>6}  {SAMPLERS[r['sampler']]:<35}{fmt_time(r['first_s']):>10}"
        f"{r['ns_per_index']:>12.0f}{r['ns_per_index_after_first']:>13.0f}"
        f"{fmt_bytes(r['rss_bytes']):>12}{r['repeats']:>6}"
    )


def compare(ours: Result, torch_r: Result) -> str:
    """One line of ratios of ``ours`` against torch's measurement at the same N."""
    vs = ours["vs_torch"]
    first, whole, after = (vs[k]["median"] for k in ("first_s", "ns_per_index", "after_first"))
    return (
        f"{'':8}{SAMPLERS[ours['sampler']].split()[1]} vs torch: first index: "
        f"{1 / max(first, 1e-12):,.0f}x sooner ({first:.3f}x the time); ns/index: {whole:.3f}x "
        f"torch (after first: {after:.2f}x); RSS: {vs['rss_bytes']:.3f}x torch "
        f"({fmt_bytes(ours['rss_bytes'])} vs {fmt_bytes(torch_r['rss_bytes'])})"
    )


def total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def skip_reason(n: int, torch_max: int) -> str:
    """Why torch's samplers are not run at ``n`` (they materialise the whole permutation)."""
    ram, need = total_ram_bytes(), 48 * n  # int64 tensor + list of N ints (8 B + 32 B each)
    why = (
        f"that does not fit in this machine's {fmt_bytes(ram)} of RAM"
        if need > ram
        else f"skipped only because N > --torch-max-n={fmt_n(torch_max)}"
    )
    return (
        f"{'':8}torch and SeededDistributedSampler skipped at N={fmt_n(n)}: torch's __iter__ "
        f"builds randperm(N) ({fmt_bytes(8 * n)} of int64), then a Python list of all N ints "
        f"(~{fmt_bytes(40 * n)} more), before slicing out rank 0's {n // REPLICAS:,}; {why}"
    )


def sampler_section(sizes: list[int], repeats: int, torch_max: int) -> list[Result]:
    out(f"== Samplers: rank 0 of {REPLICAS}, shuffle=True, one full pass over the shard ==")
    out("   first index: from constructing the sampler to the first index it yields")
    out("   ns/index: (time to exhaust the shard) / (shard length); after first: the rest only")
    out("   RSS: peak RSS growth of a fresh interpreter after its imports (Linux: VmHWM, reset")
    out("        via /proc/self/clear_refs: a spawned child's ru_maxrss starts at its parent's)")
    out(
        f"{'N':>6}  {'sampler':<35}{'first index':>10}{'ns/index':>12}{'after first':>13}"
        f"{'peak RSS':>12}{'runs':>6}"
    )
    results: list[Result] = []
    for n in sizes:
        kinds = ["torch", "seeded", "scalable"] if n <= torch_max else ["scalable"]
        rows = {r["sampler"]: r for r in measure_samplers(kinds, n, repeats)}
        for kind in kinds:
            results.append(rows[kind])
            out(_row(rows[kind]))
        if "torch" in rows:
            out(compare(rows["seeded"], rows["torch"]))
            out(compare(rows["scalable"], rows["torch"]))
        else:
            out(skip_reason(n, torch_max))
    return results


def measure_paired(n: int, seconds: float) -> Result:
    """:func:`paired_child` in a fresh process; each arm's ratios to the first torch arm."""
    child = measure.run_child(["paired", n, seconds], 3 * seconds + measure.CHILD_TIMEOUT)
    runs = child["runs"]
    return {
        "n": n,
        "rounds": child["rounds"],
        "torch_first_s": statistics.median(first for first, _ in runs["torch"]),
        "torch_total_s": statistics.median(total for _, total in runs["torch"]),
        **{arm: paired.ratios(runs, arm) for arm in ARMS if arm != "torch"},
    }


PAIRED_COLUMNS = (
    ("Seeded first index", "seeded", "first_s"),
    ("Seeded ns/index", "seeded", "ns_per_index"),
    ("Scalable after first", "scalable", "after_first"),
    ("A/A first index", "torch_again", "first_s"),
    ("A/A ns/index", "torch_again", "ns_per_index"),
)


def paired_section(sizes: list[int], seconds: float) -> list[Result]:
    out()
    out("== ddpseed's samplers vs torch's, paired in one warm interpreter ==")
    out("   torch, Seeded, Scalable and torch again (an A/A control), one pass each per round,")
    out(f"   the rounds cycling through every order, for ~{seconds:.0f} s per N; each figure:")
    out("   median of the per-round time ratios to torch [95% CI of the median]; after first:")
    out("   the pass after the first index; A/A: this run's noise floor")
    titles = "".join(f"{title:<24}" for title, _, _ in PAIRED_COLUMNS)
    out(f"{'N':>6}{'rounds':>8}  {titles}".rstrip())
    results = []
    for n in sizes:
        r = measure_paired(n, seconds)
        results.append(r)
        cells = (fmt_ratio(r[arm][figure]) for _, arm, figure in PAIRED_COLUMNS)
        out(f"{fmt_n(n):>6}{r['rounds']:>8}  " + "".join(f"{c:<24}" for c in cells).rstrip())
    return results
