"""``ddpseed verify``: every rank reports its seeds, draws and shard; rank 0 checks them all.

Under a mesh the checks are :mod:`ddpseed.meshcli`'s (shared and distinct streams per the
policy); without one, the rules of :mod:`ddpseed.derivation`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from . import meshcli


def _draws(seed: int | None) -> dict[str, float]:
    import random

    import numpy as np
    import torch

    if seed is None:
        return {
            "random": random.random(),
            "numpy": float(np.random.random()),
            "torch": float(torch.rand(1)[0]),
        }
    gen = torch.Generator().manual_seed(seed)
    return {
        "random": random.Random(seed).random(),
        "numpy": float(np.random.RandomState(seed).random_sample()),
        "torch": float(torch.rand(1, generator=gen)[0]),
    }


class _WorkerSeeds:
    """A dataset whose items are the torch seed of the worker that fetched them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        import torch
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        return (info.id if info else -1, torch.initial_seed())


def run(args: argparse.Namespace) -> tuple[int, list[str]]:
    """One rank's ``ddpseed verify``: (exit status, the lines rank 0 prints; none elsewhere)."""
    import socket

    import torch.distributed as dist

    from .startup import setup

    plan = setup(seed=args.seed, timeout=args.timeout, **meshcli.mesh_settings(args))
    topo = plan.topology
    report: dict[str, Any] = dataclasses.asdict(topo)
    report.update(
        hostname=socket.gethostname(),
        base_seed=plan.base_seed,
        process_seed=plan.process_seed,
        seed_source=plan.seed_source,
        draws=_draws(None),
        expected=_draws(plan.process_seed),
        shard=[int(i) for i in plan.sampler(range(args.dataset_size))],
        **meshcli.report(plan),
    )
    if args.num_workers:
        loader = plan.dataloader(
            _WorkerSeeds(4 * args.num_workers),
            batch_size=1,
            num_workers=args.num_workers,
            shuffle=False,
        )
        seen: dict[int, int] = {}
        for w, s in loader:  # the first batch of each worker is drawn with its worker seed
            seen.setdefault(int(w), int(s))
        report["worker_seeds"] = {str(w): s for w, s in sorted(seen.items())}
        report["expected_worker_seeds"] = {
            str(w): plan.worker_seed(w, args.num_workers) for w in range(args.num_workers)
        }
    reports = [report]
    if plan.world_size > 1:
        gathered: list[Any] = [None] * plan.world_size
        dist.all_gather_object(gathered, report)
        reports = gathered
    problems = (meshcli.verify_problems if plan.mesh else _verify_problems)(
        reports, args.dataset_size
    )
    for r in reports:
        r["agree"] = not problems
    lines: list[str] = []
    if plan.rank == 0:
        lines = (
            ["DDPSEED_VERIFY " + json.dumps(reports)] if args.json else _table(reports, problems)
        )
    if plan.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return (1 if problems else 0), lines


def _verify_problems(reports: list[dict[str, Any]], dataset_size: int) -> list[str]:
    from .derivation import process_seed

    problems = []
    bases = {r["base_seed"] for r in reports}
    if len(bases) != 1:
        problems.append(f"base seeds differ across ranks: {sorted(bases)}")
    for r in reports:
        if r["process_seed"] != process_seed(r["base_seed"], r["rank"]):
            problems.append(f"rank {r['rank']}: process seed {r['process_seed']} breaks the rule")
        if r["draws"] != r["expected"]:
            problems.append(f"rank {r['rank']}: RNG draws {r['draws']} != expected {r['expected']}")
        if r.get("worker_seeds", {}) != r.get("expected_worker_seeds", {}):
            problems.append(
                f"rank {r['rank']}: worker seeds {r['worker_seeds']} != expected "
                f"{r['expected_worker_seeds']}"
            )
    shards = [set(r["shard"]) for r in reports]
    covered = set().union(*shards)
    if covered != set(range(dataset_size)):
        problems.append(f"sampler shards do not cover the dataset ({len(covered)}/{dataset_size})")
    if dataset_size % len(reports) == 0 and sum(map(len, shards)) != dataset_size:
        problems.append("sampler shards overlap")
    return problems


def _table(reports: list[dict[str, Any]], problems: list[str]) -> list[str]:
    lines = [
        f"{'rank':>4} {'node':>4} {'local':>5} {'host':<16} {'base seed':>10} "
        f"{'process':>10} {'draws':>5} {'workers':>7} {'shard':>5}"
    ]
    for r in reports:
        draws = "ok" if r["draws"] == r["expected"] else "BAD"
        workers = (
            "-"
            if "worker_seeds" not in r
            else ("ok" if r["worker_seeds"] == r["expected_worker_seeds"] else "BAD")
        )
        lines.append(
            f"{r['rank']:>4} {r['node_rank']:>4} {r['local_rank']:>5} {r['hostname'][:16]:<16} "
            f"{r['base_seed']:>10} {r['process_seed']:>10} {draws:>5} {workers:>7} "
            f"{len(r['shard']):>5}"
        )
    if problems:
        return [*lines, "DISAGREEMENT:", *(f"  {p}" for p in problems)]
    lines.append(
        f"all {len(reports)} ranks agree on base seed {reports[0]['base_seed']} "
        f"({reports[0]['seed_source']}); seeds, draws and shards as derived"
    )
    return lines
