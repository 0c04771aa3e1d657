"""The setup section of ``ddpseed bench``: ``ddpseed.setup`` against torch's own collectives.

Local worlds of several sizes meet in a gloo group; each round times torch's broadcast of one
int64 (the bare seed broadcast), torch's gather of one record per rank and broadcast of the
table (the records ``setup`` itself sent, their size read from its own calls), and
``ddpseed.setup`` on the existing group; then the agreement checks a distributed loader makes
(one small collective when it is made and at each ``iter()``).
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from typing import Any

from . import measure
from .measure import Result, fmt_time, out

SEED = 1234
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
    """Records the ``torch.distributed`` collectives called while :attr:`active` is True, and
    the number of elements of each one's first tensor argument."""

    def __init__(self, dist: Any) -> None:
        self.active = False
        self.calls: list[str] = []
        self.sizes: list[int] = []
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def logged(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.calls.append(name)
                self.sizes.append(int(args[0].numel()) if args and hasattr(args[0], "numel") else 0)
            return fn(*args, **kwargs)

        return logged


def setup_child(repeats: int) -> Result | None:
    """One rank: bare init, then ``repeats + 1`` rounds of three timed steps; rank 0 reports.

    Each round starts the rotation of the steps one step later; the first round starts with
    ``setup``, whose gathered record then sets the size of torch's own gather.
    """
    import torch
    import torch.distributed as dist

    import ddpseed

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = f"file://{os.environ[measure.STORE]}"
    start = time.perf_counter()
    dist.init_process_group(
        "gloo",
        init_method=store,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=measure.CHILD_TIMEOUT),  # every collective bounded
    )
    init = time.perf_counter() - start
    log = CollectiveLog(dist)
    record = torch.zeros(0, dtype=torch.int64)

    def bare_broadcast() -> None:
        dist.broadcast(torch.tensor([SEED], dtype=torch.int64), src=0)

    def two_rounds() -> None:
        table = torch.empty((world, record.numel()), dtype=torch.int64)
        dist.gather(record, list(table) if rank == 0 else None, dst=0)
        dist.broadcast(table, src=0)

    def seed_setup() -> None:
        nonlocal record
        log.calls, log.sizes, log.active = [], [], True
        ddpseed.setup(seed=SEED)
        log.active = False
        if "gather" in log.calls:  # torch's own gather sends a record as large as setup's
            record = torch.zeros(log.sizes[log.calls.index("gather")], dtype=torch.int64)

    steps = [seed_setup, bare_broadcast, two_rounds]
    times = []
    for i in range(repeats + 1):
        took = [0.0, 0.0, 0.0]
        for k in range(3):
            which = (i + k) % 3
            dist.barrier()
            start = time.perf_counter()
            steps[which]()
            took[which] = time.perf_counter() - start
        times.append([init, took[1], took[2], took[0]])
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

    plan = ddpseed.setup(seed=SEED)
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


def measure_setup(world: int, repeats: int) -> Result:
    """``world`` local ranks, once; the first round is cold, medians are of the rest."""
    child = measure.run_child(["setup", repeats], world=world)
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


def setup_section(worlds: list[int], repeats: int) -> list[Result]:
    out()
    out("== ddpseed.setup(seed=...) on an existing gloo group vs torch's own collectives ==")
    out(f"   {os.cpu_count()} CPUs; each time is the slowest rank's (MAX all-reduced), the median")
    out(f"   of {repeats} warm rounds; broadcast: torch's broadcast of one int64; 2 rounds:")
    out("   torch's gather of setup's record from every rank + broadcast of the table;")
    out("   collectives: the torch.distributed calls one setup makes; first setup: the first")
    out("   (cold) call; bare init: init_process_group on a file store, including the wait for")
    out("   the last rank to start up; loader/iter check: plan.dataloader() and iter(loader)")
    out("   distributed minus local (the agreement check a distributed loader makes)")
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
