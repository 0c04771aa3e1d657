"""``ddpseed bench``: ddpseed's samplers, loader and ``setup`` measured against torch's own.

Sections (each measured in fresh interpreters, see :mod:`ddpseed.measure`):

- samplers (:mod:`ddpseed.samplerbench`): torch's ``DistributedSampler`` against
  ``SeededDistributedSampler`` and ``ScalableDistributedSampler``, fresh runs then warm rounds
  paired in one interpreter;
- loader (:mod:`ddpseed.loaderbench`): ``plan.dataloader`` against torch's ``DataLoader`` +
  ``DistributedSampler``, paired in one interpreter;
- setup (:mod:`ddpseed.setupbench`): ``ddpseed.setup`` against torch's own collectives.

It prints measurements and ratios to torch with 95% intervals; it judges nothing (the project's
targets are checked by ``python -m benchmarks.targets`` in the source tree). Run ``ddpseed
bench``; ``--quick`` is a smoke test. ``python -m ddpseed.bench CHILD ARGS`` is how the bench
starts its measuring processes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from . import loaderbench, samplerbench, setupbench
from .measure import Result, fmt_n, out

SUMMARY = "Measure ddpseed's samplers, loader and ddpseed.setup against torch's own classes."
DEFAULT_SIZES = "1e6,1e7,1e8,1e9"
DEFAULT_WORLDS = "2,4,8,16,32"
QUICK_SIZES = "1e4,1e5"
QUICK_WORLDS = "2,4"
# Above this N torch's sampler is skipped: its __iter__ materialises the whole permutation.
TORCH_MAX_N = 10**8
# The warm paired section stops here: a round at 1e8 takes a minute, too few fit in a budget.
PAIRED_MAX_N = 10**7
PAIRED_SECONDS = 120.0
QUICK_PAIRED_SECONDS = 1.0
LOADER_SECONDS = 60.0
QUICK_LOADER_SECONDS = 1.0
# Setup takes milliseconds, so its medians are taken over more rounds than the samplers'.
SETUP_ROUNDS_PER_REPEAT = 10


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
    add = parser.add_argument
    add("--sizes", default=None, help=f"dataset sizes (default {DEFAULT_SIZES})")
    add("--world-sizes", default=None, help=f"setup world sizes (default {DEFAULT_WORLDS})")
    add(
        "--repeats",
        type=int,
        default=None,
        help="fresh-process runs per sampler and size, interleaved, median shown (default 3, "
        "1 with --quick); setup is timed over 10x as many warm calls",
    )
    add(
        "--torch-max-n",
        default=None,
        help=f"largest N at which torch's samplers run (default {fmt_n(TORCH_MAX_N)})",
    )
    add(
        "--paired-seconds",
        type=float,
        default=None,
        help=f"time budget per N of the warm paired sampler rounds (default "
        f"{PAIRED_SECONDS:.0f}; 0 skips them)",
    )
    add(
        "--paired-max-n",
        default=None,
        help=f"largest N of the warm paired rounds (default {fmt_n(PAIRED_MAX_N)})",
    )
    add("--quick", action="store_true", help="tiny sizes, one run: a smoke test")
    add("--skip-setup", action="store_true", help="no setup section")
    add("--skip-samplers", action="store_true", help="no sampler section")
    add("--skip-loader", action="store_true", help="no loader section")
    add(
        "--loader-seconds",
        type=float,
        default=None,
        help="time budget per case of the paired loader rounds (default "
        f"{LOADER_SECONDS:.0f}, {QUICK_LOADER_SECONDS:.0f} with --quick)",
    )
    add(
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


class Options(NamedTuple):
    sizes: list[int]
    worlds: list[int]
    repeats: int
    torch_max: int
    paired_max: int
    paired_seconds: float
    loader_seconds: float


def options(args: argparse.Namespace) -> Options:
    """The parsed flags with ``--quick``'s or the full run's defaults filled in."""
    quick = bool(args.quick)
    sizes = parse_sizes(args.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))
    worlds = parse_sizes(args.world_sizes or (QUICK_WORLDS if quick else DEFAULT_WORLDS))
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    default_max = min(sizes) if quick else TORCH_MAX_N
    torch_max = parse_sizes(args.torch_max_n)[0] if args.torch_max_n else default_max
    default_paired = min(sizes) if quick else PAIRED_MAX_N
    paired_max = parse_sizes(args.paired_max_n)[0] if args.paired_max_n else default_paired
    seconds = args.paired_seconds
    if seconds is None:
        seconds = QUICK_PAIRED_SECONDS if quick else PAIRED_SECONDS
    loader = args.loader_seconds
    if loader is None:
        loader = QUICK_LOADER_SECONDS if quick else LOADER_SECONDS
    if repeats < 1:
        raise ValueError(f"--repeats={repeats} must be >= 1")
    if seconds < 0 or loader < 0:
        raise ValueError("--paired-seconds and --loader-seconds must be >= 0")
    return Options(sizes, worlds, repeats, torch_max, paired_max, seconds, loader)


def run(args: argparse.Namespace) -> int:
    """Run the sections ``args`` ask for; 0 on success, 2 on a bad flag, 1 if a run failed."""
    try:
        opts = options(args)
    except ValueError as exc:
        sys.stderr.write(f"ddpseed bench: {exc}\n")
        return 2
    report: Result = {"replicas": samplerbench.REPLICAS, "cpus": os.cpu_count()}
    report.update(samplers=[], paired=[], loader=[], loader_sample=[], setup=[])
    try:
        if not args.skip_samplers and opts.sizes:
            report["samplers"] = samplerbench.sampler_section(
                opts.sizes, opts.repeats, opts.torch_max
            )
            warm = [n for n in opts.sizes if n <= min(opts.paired_max, opts.torch_max)]
            if warm and opts.paired_seconds > 0:
                report["paired"] = samplerbench.paired_section(warm, opts.paired_seconds)
        if not args.skip_loader:
            report["loader"] = loaderbench.loader_section(opts.loader_seconds, bool(args.quick))
            report["loader_sample"] = loaderbench.sample_section(
                opts.loader_seconds, bool(args.quick)
            )
        if not args.skip_setup and opts.worlds:
            rounds = SETUP_ROUNDS_PER_REPEAT * opts.repeats
            report["setup"] = setupbench.setup_section(opts.worlds, rounds)
    except (RuntimeError, OSError) as exc:
        sys.stderr.write(f"ddpseed bench: a measurement failed: {exc}\n")
        return 1
    if args.json == "-":
        out(json.dumps(report, indent=2))
    elif args.json is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddpseed bench", description=SUMMARY)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def child_main(argv: Sequence[str]) -> None:
    """A measuring process: ``sampler KIND N``, ``paired N SECONDS``, ``loader COST_MS WORKERS
    N SECONDS [batch]`` or ``setup ROUNDS``; its result goes to stdout as one JSON line."""
    what, *a = argv
    result: Result | None
    if what == "sampler":
        result = samplerbench.sampler_child(a[0], int(a[1]))
    elif what == "paired":
        result = samplerbench.paired_child(int(a[0]), float(a[1]))
    elif what == "loader":
        result = loaderbench.loader_child(float(a[0]), int(a[1]), int(a[2]), float(a[3]), *a[4:])
    else:
        result = setupbench.setup_child(int(a[0]))
    if result:
        out(json.dumps(result))


CHILDREN = ("sampler", "paired", "loader", "setup")

if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in CHILDREN:
        child_main(sys.argv[1:])
    else:
        sys.exit(main())
