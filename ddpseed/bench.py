"""``ddpseed bench``: ddpseed's samplers and ``setup`` measured against bare torch.

Section 1 times rank 0 of 8 iterating its shard (``shuffle=True``) with torch's
``DistributedSampler``, ddpseed's ``SeededDistributedSampler`` (torch's order, so about torch's
cost) and ``ScalableDistributedSampler`` (a lazily evaluated Feistel permutation): time to the
first index, ns per index over the whole shard, and peak RSS above the interpreter's baseline.
Every measurement runs in a fresh interpreter, so ``ru_maxrss`` belongs to that sampler alone.
Then, up to N = 1e7, torch and ``SeededDistributedSampler`` are paired in one warm interpreter
for a time budget (see :mod:`ddpseed.paired`), which resolves a few percent on a noisy machine.

Section 2 compares the throughput of ``plan.dataloader`` with torch's ``DataLoader`` +
``DistributedSampler`` (see :mod:`ddpseed.loaderbench`), paired in one warm process.

Section 3 times ``ddpseed.setup`` on an existing gloo process group against torch's broadcast of
one int64 tensor and torch's own gather + broadcast of the same records, for local worlds of
several sizes, and the agreement checks a distributed loader makes (one small collective when
it is made and at each ``iter()``).

Run ``ddpseed bench`` (or ``python -m ddpseed.bench``); ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import loaderbench, paired
from .topology import LAUNCHER_VARIABLES

SUMMARY = "Measure ddpseed's samplers and ddpseed.setup against bare torch."
REPLICAS = 8
DEFAULT_SIZES = "1e6,1e7,1e8,1e9"
DEFAULT_WORLDS = "2,4,8,16,32"
QUICK_SIZES = "1e4,1e5"
QUICK_WORLDS = "2,4"
# Above this N torch's sampler is skipped: its __iter__ materialises the whole permutation.
TORCH_MAX_N = 10**8
SAMPLERS = {
    "torch": "torch DistributedSampler",
    "seeded": "ddpseed SeededDistributedSampler",
    "scalable": "ddpseed ScalableDistributedSampler",
}
CHILD_TIMEOUT = 600.0
# Measuring processes must not believe they were launched by torchrun/Slurm/MPI, nor read seeds.
_DROPPED_PREFIXES = ("DDPSEED_",)
# The warm paired section stops here: a round at 1e8 takes a minute, too few fit in a budget.
PAIRED_MAX_N = 10**7
PAIRED_SECONDS = 120.0
QUICK_PAIRED_SECONDS = 1.0
SETUP_SEED = 1234
LOADER_SECONDS = 60.0
BATCH_FLOOR = 256  # --quick shrinks the loader passes, to no fewer samples than this
QUICK_LOADER_SECONDS = 1.0
# Setup takes milliseconds, so its medians are taken over more rounds than the samplers'.
SETUP_ROUNDS_PER_REPEAT = 10
Result = dict[str, Any]


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "bench",
        help="measure ddpseed's samplers, loader and setup against torch",
        description=SUMMARY,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=None, help=f"dataset sizes (default {DEFAULT_SIZES})")
    parser.add_argument(
        "--world-sizes", default=None, help=f"setup world sizes (default {DEFAULT_WORLDS})"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="fresh-process runs per sampler and size, interleaved, median shown (default 3, "
        "1 with --quick); setup is timed over 10x as many warm calls",
    )
    parser.add_argument(
        "--torch-max-n",
        default=None,
        help=f"largest N at which torch's samplers run (default {fmt_n(TORCH_MAX_N)})",
    )
    parser.add_argument(
        "--paired-seconds",
        type=float,
        default=None,
        help=f"time budget per N of the warm paired Seeded-vs-torch rounds (default "
        f"{PAIRED_SECONDS:.0f}; 0 skips them)",
    )
    parser.add_argument(
        "--paired-max-n",
        default=None,
        help=f"largest N of the warm paired rounds (default {fmt_n(PAIRED_MAX_N)})",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    parser.add_argument("--skip-setup", action="store_true", help="only the sampler section")
    parser.add_argument("--skip-samplers", action="store_true", help="no sampler section")
    parser.add_argument("--skip-loader", action="store_true", help="no loader section")
    parser.add_argument(
        "--loader-seconds",
        type=float,
        default=None,
        help="time budget per case of the paired loader rounds (default "
        f"{LOADER_SECONDS:.0f}, {QUICK_LOADER_SECONDS:.0f} with --quick)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="also write the results as JSON to PATH (stdout when no PATH is given)",
    )


def parse_sizes(text: str) -> list[int]:
    """``"1e6,2000"`` -> ``[1000000, 2000]``; each a positive integer.

    >>> parse_sizes("1e6, 2000")
    [1000000, 2000]
    """
    sizes = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        value = float(token)
        if value < 1 or value != int(value):
            raise ValueError(f"{token!r} is not a positive integer size")
        sizes.append(int(value))
    return sizes


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Child processes


def _child_env(**extra: str) -> dict[str, str]:
    """This environment without launcher/ddpseed variables, with ddpseed importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_DROPPED_PREFIXES) and k not in LAUNCHER_VARIABLES
    }
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def _child_cmd(*args: object) -> list[str]:
    code = "import ddpseed.bench as b; b.child_main()"
    return [sys.executable, "-c", code, *map(str, args)]


def child_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the measuring processes: ``sampler KIND N``, ``paired N SECONDS``,
    ``loader COST_MS WORKERS N SECONDS`` or ``setup REPEATS``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    result: Result | None
    if argv[0] == "sampler":
        result = sampler_child(argv[1], int(argv[2]))
    elif argv[0] == "paired":
        result = paired_child(int(argv[1]), float(argv[2]))
    elif argv[0] == "loader":
        cost, workers, n, seconds = float(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
        result = loaderbench.loader_child(cost, workers, n, seconds, *argv[5:])
    else:
        result = setup_child(int(argv[1]))
    if result:
        sys.stdout.write(json.dumps(result) + "\n")


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


def _sampler_factory(kind: str, n: int) -> Callable[[], Any]:
    """A constructor of ``kind`` over ``range(n)``, imported here so timing never includes it."""
    cls: Any
    if kind == "torch":
        from torch.utils.data import DistributedSampler as cls
    elif kind == "seeded":
        from .sampler import SeededDistributedSampler as cls
    else:
        from .scalable import ScalableDistributedSampler as cls
    return functools.partial(cls, range(n), num_replicas=REPLICAS, rank=0, shuffle=True, seed=0)


def sampler_child(kind: str, n: int) -> Result:
    """Time one full pass over rank 0's shard; runs in a fresh process."""
    import gc

    make = _sampler_factory(kind, n)  # imports the sampler's modules before the baseline
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
    """torch, Seeded and torch again alternated in this warm process for ``seconds``."""
    kinds = dict(zip(paired.ARMS, ("torch", "seeded", "torch"), strict=True))
    makers = {arm: _sampler_factory(kind, n) for arm, kind in kinds.items()}
    return {"n": n, **paired.run_rounds(makers, seconds)}


def _run_child(cmd: list[str], env: dict[str, str], timeout: float) -> Result:
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{' '.join(cmd[3:])} exited with {proc.returncode}: {tail}")
    result: Result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ---------------------------------------------------------------------------------------------
# Sampler section


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
            result = _run_child(_child_cmd("sampler", kind, n), _child_env(), CHILD_TIMEOUT)
            runs[kind].append(result)
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


def fmt_time(seconds: float) -> str:
    """Seconds for humans.

    >>> fmt_time(0.00042), fmt_time(15.5)
    ('420 us', '15.5 s')
    """
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.1f} s"


def fmt_bytes(size: float) -> str:
    """Bytes for humans (kB = 2**10 bytes, MB = 2**20, GB = 2**30).

    >>> fmt_bytes(3 * 2**20), fmt_bytes(5.5 * 2**30), fmt_bytes(0)
    ('3.0 MB', '5.50 GB', '0 kB')
    """
    if size >= 2**30:
        return f"{size / 2**30:.2f} GB"
    if size < 2**20:
        return f"{size / 2**10:.0f} kB"
    return f"{size / 2**20:.1f} MB"


def fmt_n(n: int) -> str:
    """A dataset size, powers of ten as ``1eK``.

    >>> fmt_n(10**8), fmt_n(12345)
    ('1e8', '12345')
    """
    exp = len(str(n)) - 1
    return f"1e{exp}" if n == 10**exp and exp >= 3 else str(n)


def _row(r: Result) -> str:
    return (
        f"{fmt_n(r['n']):>6}  {SAMPLERS[r['sampler']]:<35}{fmt_time(r['first_s']):>10}"
        f"{r['ns_per_index']:>12.0f}{r['ns_per_index_after_first']:>13.0f}"
        f"{fmt_bytes(r['rss_bytes']):>12}{r['repeats']:>6}"
    )


def compare(ours: Result, torch_r: Result) -> str:
    """One line of ratios of ``ours`` against torch's measurement at the same N."""
    ratio = _ratios(ours, torch_r)
    sooner = 1 / max(ratio["first_s"], 1e-12)
    steady = ours["ns_per_index_after_first"] / max(torch_r["ns_per_index_after_first"], 1e-9)
    return (
        f"{'':8}{SAMPLERS[ours['sampler']].split()[1]} vs torch: first index: {sooner:,.0f}x "
        f"sooner ({ratio['first_s']:.3f}x the time); ns/index: {ratio['ns_per_index']:.3f}x "
        f"torch (after first: {steady:.2f}x); RSS: {ratio['rss_bytes']:.3f}x torch "
        f"({fmt_bytes(ours['rss_bytes'])} vs {fmt_bytes(torch_r['rss_bytes'])})"
    )


def _vs(ours: Result, torch_r: Result) -> Result:
    """:func:`vs_torch` of two rows: the paired rounds when measured, else the summaries."""
    measured: Result | None = ours.get("vs_torch")
    return measured or vs_torch([_as_run(ours)], [_as_run(torch_r)])


def _ratios(ours: Result, torch_r: Result) -> dict[str, float]:
    """``ours / torch`` per figure (medians over rounds)."""
    vs = _vs(ours, torch_r)
    return {
        "first_s": vs["first_s"]["median"],
        "ns_per_index": vs["ns_per_index"]["median"],
        "rss_bytes": vs["rss_bytes"],
    }


def _as_run(summary: Result) -> Result:
    """A summary row seen as one run, for :func:`vs_torch`."""
    total = summary["ns_per_index"] * 1e-9 * summary["count"]
    return {"first_s": summary["first_s"], "total_s": total, "rss_bytes": summary["rss_bytes"]}


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
    """:func:`paired_child` in a fresh process; Seeded's and the A/A control's ratios."""
    cmd = _child_cmd("paired", n, seconds)
    child = _run_child(cmd, _child_env(), 3 * seconds + CHILD_TIMEOUT)
    runs = child["runs"]
    return {
        "n": n,
        "rounds": child["rounds"],
        "torch_first_s": statistics.median(first for first, _ in runs["torch"]),
        "torch_total_s": statistics.median(total for _, total in runs["torch"]),
        "seeded": paired.ratios(runs, "seeded"),
        "torch_again": paired.ratios(runs, "torch_again"),
    }


def _ci(ratio: Result) -> str:
    lo, hi = ratio["ci"]
    return f"{ratio['median']:.3f}x [{lo:.3f}-{hi:.3f}]"


def paired_section(sizes: list[int], seconds: float) -> list[Result]:
    out()
    out("== SeededDistributedSampler vs torch, paired in one warm interpreter ==")
    out("   torch, Seeded and torch again (an A/A control), one pass each per round, the rounds")
    out(f"   cycling through every order, for ~{seconds:.0f} s per N; each figure: median of the")
    out("   per-round ratios to torch [95% CI of the median]; A/A: this run's noise floor")
    out(f"{'N':>6}{'rounds':>8}  {'first index':<24}{'ns/index':<24}{'A/A first':<24}A/A ns/index")
    results = []
    for n in sizes:
        r = measure_paired(n, seconds)
        results.append(r)
        seeded, aa = r["seeded"], r["torch_again"]
        out(
            f"{fmt_n(n):>6}{r['rounds']:>8}  {_ci(seeded['first_s']):<24}"
            f"{_ci(seeded['ns_per_index']):<24}{_ci(aa['first_s']):<24}{_ci(aa['ns_per_index'])}"
        )
    return results


def loader_section(seconds: float, quick: bool) -> list[Result]:
    out()
    out("== plan.dataloader vs torch's DataLoader + DistributedSampler, paired in one process ==")
    out(f"   shuffled, batch {loaderbench.BATCH}, rank 0 of 1; torch, plan.dataloader and torch")
    out("   again, one epoch each per round, cycling through every order, for")
    out(f"   ~{seconds:.0f} s per case; figures: median per-round samples/s ratio to torch")
    out("   [95% CI of the median]; A/A: this run's noise floor")
    out(loaderbench.HEADER)
    return _loader_rows(loaderbench.CASES, seconds, quick)


def _loader_rows(cases: Any, seconds: float, quick: bool, *versus: str) -> list[Result]:
    results = []
    for name, cost, workers, n in cases:
        n = max(BATCH_FLOOR, n // 20) if quick else n
        cmd = _child_cmd("loader", cost, workers, n, seconds, *versus)
        child = _run_child(cmd, _child_env(), 3 * seconds + CHILD_TIMEOUT)
        results.append(loaderbench.summarize(name, cost, workers, n, child))
        out(loaderbench.row(results[-1]))
    return results


def sample_section(seconds: float, quick: bool) -> list[Result]:
    out()
    out("== plan.dataloader(randomness='sample') vs randomness='batch', paired in one process ==")
    out(loaderbench.SAMPLE_HEADER)
    return _loader_rows(loaderbench.SAMPLE_CASES, seconds, quick, "batch")


def target_lines(results: list[Result], warm: Sequence[Result] = ()) -> list[str]:
    """The issue's targets, checked on the largest N where each can be measured.

    The default sampler's time figures are judged on their 95% intervals (the warm paired
    rounds where measured, else the fresh-process rounds): OK inside 1 +- 5%, MISSED wholly
    outside, UNRESOLVED when the interval is wider than the band.
    """
    by = {(r["sampler"], r["n"]): r for r in results}
    warm_by = {r["n"]: r for r in warm}
    lines = []
    for n in sorted(n for (kind, n) in by if kind == "torch" and ("seeded", n) in by):
        vs = _vs(by["seeded", n], by["torch", n])
        source = f"{by['torch', n]['repeats']} fresh runs"
        if n in warm_by:
            vs = {**vs, **warm_by[n]["seeded"]}
            source = f"{warm_by[n]['rounds']} warm rounds"
        rss = vs["rss_bytes"]
        intervals = [vs["first_s"]["ci"], vs["ns_per_index"]["ci"], (rss, rss)]
        lines.append(
            f"SeededDistributedSampler within 5% of torch at N={fmt_n(n)} ({source}): first "
            f"index {_ci(vs['first_s'])}, ns/index {_ci(vs['ns_per_index'])}, RSS {rss:.3f}x "
            f"{paired.verdict(intervals)}"
        )
    both = [n for (kind, n) in by if kind == "torch" and ("scalable", n) in by]
    if both:
        n = max(both)
        ratio = _ratios(by["scalable", n], by["torch", n])
        sooner, per = 1 / max(ratio["first_s"], 1e-12), ratio["ns_per_index"]
        lines.append(
            f"first index >= 1000x sooner than torch at N={fmt_n(n)}: {sooner:,.0f}x "
            f"{'OK' if sooner >= 1000 else 'MISSED'}"
        )
        lines.append(
            f"ns/index over the shard <= torch's at N={fmt_n(n)}: {per:.2f}x "
            f"{'OK' if per <= 1 else 'MISSED'}"
        )
    big = [n for (kind, n) in by if kind == "scalable"]
    if big:
        n = max(big)
        rss = by["scalable", n]["rss_bytes"]
        lines.append(
            f"peak RSS < 64 MB at N={fmt_n(n)}: {fmt_bytes(rss)} "
            f"{'OK' if rss < 64 * 2**20 else 'MISSED'}"
        )
    return lines


# ---------------------------------------------------------------------------------------------
# Setup section


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# What a script calls on torch.distributed to talk to its peers; setup's calls are counted.
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "monitored_barrier",
    "recv",
    "reduce",
    "reduce_scatter",
    "scatter",
    "send",
)


class CollectiveLog:
    """Records the ``torch.distributed`` collectives called while :attr:`active` is True."""

    def __init__(self, dist: Any) -> None:
        self.active = False
        self.calls: list[str] = []
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def logged(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.calls.append(name)
            return fn(*args, **kwargs)

        return logged


def setup_child(repeats: int) -> Result | None:
    """One rank: bare init, then ``repeats + 1`` rounds of three timed steps; rank 0 reports.

    The steps are torch's broadcast of one int64 (the bare seed broadcast), torch's gather of
    one seed record per rank then broadcast of the table (two collective rounds, which is what
    setup issues), and ``ddpseed.setup``; each round starts the rotation one step later.
    """
    import torch
    import torch.distributed as dist

    import ddpseed
    from ddpseed.collective import ROW_WIDTH

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    start = time.perf_counter()
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)
    init = time.perf_counter() - start
    log = CollectiveLog(dist)
    record = torch.zeros(ROW_WIDTH, dtype=torch.int64)

    def bare_broadcast() -> None:
        dist.broadcast(torch.tensor([SETUP_SEED], dtype=torch.int64), src=0)

    def two_rounds() -> None:
        table = torch.empty((world, ROW_WIDTH), dtype=torch.int64)
        dist.gather(record, list(table) if rank == 0 else None, dst=0)
        dist.broadcast(table, src=0)

    def seed_setup() -> None:
        log.calls, log.active = [], True
        ddpseed.setup(seed=SETUP_SEED)
        log.active = False

    steps = [bare_broadcast, two_rounds, seed_setup]
    times = []
    for i in range(repeats + 1):
        took = [0.0, 0.0, 0.0]
        for k in range(3):
            which = (i + k) % 3
            dist.barrier()
            start = time.perf_counter()
            steps[which]()
            took[which] = time.perf_counter() - start
        times.append([init, *took])
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a collective is as slow as its last rank
    checks = torch.tensor(_loader_checks(repeats), dtype=torch.float64)
    dist.all_reduce(checks, op=dist.ReduceOp.MAX)
    dist.destroy_process_group()
    report = {
        "world": world,
        "times": slowest.tolist(),
        "checks": checks.tolist(),
        "collectives": log.calls,
    }
    return report if rank == 0 else None


def _loader_checks(repeats: int) -> list[list[float]]:
    """Per round: making a loader and one ``iter()`` of it, distributed (checked) then local.

    The differences are the agreement checks: one small collective each.
    """
    import torch.distributed as dist

    import ddpseed

    plan = ddpseed.setup(seed=SETUP_SEED)
    data = list(range(1024))
    rounds = []
    for _ in range(repeats + 1):
        row = []
        for distributed in (True, False):
            dist.barrier()
            start = time.perf_counter()
            loader = plan.dataloader(data, batch_size=8, distributed=distributed)
            made = time.perf_counter() - start
            dist.barrier()
            start = time.perf_counter()
            iter(loader)
            row += [made, time.perf_counter() - start]
        rounds.append(row)
    return rounds


def measure_setup(world: int, repeats: int, timeout: float = CHILD_TIMEOUT) -> Result:
    """Launch ``world`` local ranks once; the first round is cold, medians are of the rest."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ddpseed-bench-") as tmp:
        procs = [_launch_rank(Path(tmp), rank, world, port, repeats) for rank in range(world)]
        _wait_all(procs, timeout, tmp)
        lines = (Path(tmp) / "0.out").read_text().strip().splitlines()
    child = json.loads(lines[-1])
    times = child["times"]
    warm = times[1:] or times
    return {
        "world": world,
        "repeats": len(warm),
        "init_s": times[0][0],
        "broadcast_s": statistics.median(t[1] for t in warm),
        "two_rounds_s": statistics.median(t[2] for t in warm),
        "setup_s": statistics.median(t[3] for t in warm),
        "setup_first_s": times[0][3],
        "collectives": child["collectives"],
        # The agreement checks of a distributed loader: checked minus local, medians.
        "loader_check_s": statistics.median(c[0] - c[2] for c in child["checks"][1:]),
        "iter_check_s": statistics.median(c[1] - c[3] for c in child["checks"][1:]),
    }


def _launch_rank(
    tmp: Path, rank: int, world: int, port: int, repeats: int
) -> subprocess.Popen[bytes]:
    env = _child_env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    with open(tmp / f"{rank}.out", "wb") as stdout, open(tmp / f"{rank}.err", "wb") as stderr:
        cmd = _child_cmd("setup", repeats)
        return subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr)


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float, tmp: str) -> None:
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            err = (Path(tmp) / f"{rank}.err").read_text().strip().splitlines()[-5:]
            raise RuntimeError(
                f"setup bench rank {rank}/{len(procs)} exited with {proc.returncode}: "
                + "\n".join(err)
            )


def setup_section(worlds: list[int], repeats: int) -> list[Result]:
    out()
    out("== ddpseed.setup(seed=...) on an existing gloo group vs torch's own collectives ==")
    out(f"   {os.cpu_count()} CPUs; each time is the slowest rank's (MAX all-reduced), the median")
    out(f"   of {repeats} warm rounds; broadcast: torch's broadcast of one int64; 2 rounds:")
    out("   torch's gather of one seed record per rank + broadcast of the table; collectives:")
    out("   the torch.distributed calls one setup makes; first setup: the first (cold) call;")
    out("   bare init: init_process_group, including the wait for the last rank to start up;")
    out("   loader/iter check: plan.dataloader() and iter(loader) distributed minus local (the")
    out("   agreement check a distributed loader makes)")
    out(
        f"{'world':>6}{'bare init':>11}{'broadcast':>11}{'2 rounds':>11}{'setup':>11}"
        f"{'setup/bcast':>13}{'setup/2 rounds':>16}{'first setup':>13}"
        f"{'loader check':>14}{'iter check':>12}  collectives"
    )
    results = []
    for world in worlds:
        r = measure_setup(world, repeats)
        results.append(r)
        times = (fmt_time(r[k]) for k in ("init_s", "broadcast_s", "two_rounds_s", "setup_s"))
        out(
            f"{world:>6}"
            + "".join(f"{t:>11}" for t in times)
            + f"{r['setup_s'] / max(r['broadcast_s'], 1e-9):>12.1f}x"
            + f"{r['setup_s'] / max(r['two_rounds_s'], 1e-9):>15.2f}x"
            + f"{fmt_time(r['setup_first_s']):>13}{fmt_time(r['loader_check_s']):>14}"
            + f"{fmt_time(r['iter_check_s']):>12}  {'+'.join(r['collectives'])}"
        )
    return results


def setup_target_lines(results: list[Result]) -> list[str]:
    """The round-trip target: setup's collectives, and its time against torch's two rounds."""
    if not results:
        return []
    most = max(len(r["collectives"]) for r in results)
    over_rounds = [r["setup_s"] / max(r["two_rounds_s"], 1e-9) for r in results]
    over_bcast = [r["setup_s"] / max(r["broadcast_s"], 1e-9) for r in results]
    worlds = f"worlds {','.join(str(r['world']) for r in results)}"
    return [
        f"setup makes at most one collective round more than the bare broadcast ({worlds}): "
        f"{most} collectives vs 1 {'OK' if most <= 2 else 'MISSED'}",
        f"setup time: {min(over_rounds):.2f}-{max(over_rounds):.2f}x torch's own gather + "
        f"broadcast, {min(over_bcast):.1f}-{max(over_bcast):.1f}x the bare broadcast (the rest "
        "is per-rank Python work, serialised when ranks outnumber cores)",
    ]


# ---------------------------------------------------------------------------------------------
# Entry points


class Options(NamedTuple):
    sizes: list[int]
    worlds: list[int]
    repeats: int
    torch_max: int
    paired_max: int
    paired_seconds: float


def _options(args: argparse.Namespace) -> Options:
    quick = bool(args.quick)
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    worlds = [
        int(w)
        for w in (args.world_sizes or (QUICK_WORLDS if quick else DEFAULT_WORLDS)).split(",")
        if w.strip()
    ]
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    default_max = min(sizes) if quick else TORCH_MAX_N
    torch_max = parse_sizes(args.torch_max_n)[0] if args.torch_max_n else default_max
    default_paired = min(sizes) if quick else PAIRED_MAX_N
    paired_max = parse_sizes(args.paired_max_n)[0] if args.paired_max_n else default_paired
    seconds = args.paired_seconds
    if seconds is None:
        seconds = QUICK_PAIRED_SECONDS if quick else PAIRED_SECONDS
    if repeats < 1 or any(w < 1 for w in worlds):
        raise ValueError("--repeats and --world-sizes must be >= 1")
    if seconds < 0:
        raise ValueError(f"--paired-seconds={seconds} must be >= 0")
    return Options(sizes, worlds, repeats, torch_max, paired_max, seconds)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed ``args`` ask for; 0 on success, 1 if a measurement failed."""
    try:
        opts = _options(args)
    except ValueError as exc:
        sys.stderr.write(f"ddpseed bench: {exc}\n")
        return 2
    report: Result = {
        "replicas": REPLICAS,
        "cpus": os.cpu_count(),
        "samplers": [],
        "paired": [],
        "loader": [],
        "loader_sample": [],
        "setup": [],
    }
    try:
        if not args.skip_samplers and opts.sizes:
            report["samplers"] = sampler_section(opts.sizes, opts.repeats, opts.torch_max)
            warm = [n for n in opts.sizes if n <= min(opts.paired_max, opts.torch_max)]
            if warm and opts.paired_seconds > 0:
                report["paired"] = paired_section(warm, opts.paired_seconds)
            out()
            for line in target_lines(report["samplers"], report["paired"]):
                out(f"target: {line}")
        if not args.skip_loader:
            seconds = args.loader_seconds
            if seconds is None:
                seconds = QUICK_LOADER_SECONDS if args.quick else LOADER_SECONDS
            report["loader"] = loader_section(seconds, bool(args.quick))
            report["loader_sample"] = sample_section(seconds, bool(args.quick))
        if not args.skip_setup and opts.worlds:
            report["setup"] = setup_section(opts.worlds, SETUP_ROUNDS_PER_REPEAT * opts.repeats)
            out()
            for line in setup_target_lines(report["setup"]):
                out(f"target: {line}")
    except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
        sys.stderr.write(f"ddpseed bench: a measurement failed: {exc}\n")
        return 1
    _write_json(report, args.json)
    return 0


def _write_json(report: Result, where: str | None) -> None:
    if where is None:
        return
    text = json.dumps(report, indent=2)
    if where == "-":
        out(text)
    else:
        Path(where).write_text(text + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpseed bench", description=SUMMARY)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
