"""One rank that sets up, runs collectives, and exits without destroy_process_group.

EXIT_GROUP=ddpseed lets ddpseed.setup create the process group; EXIT_GROUP=own makes it first
with init_process_group. EXIT_REPEAT collectives (all_reduce on tensors Python owns) and then
EXIT_EXCHANGES ddpseed exchanges run last, right before the interpreter exits; each exchange
counts whether gloo still held its tensors when its waits returned and when it returned
(``EXCHANGES <json>``). EXIT_CPU pins the process to one CPU, so gloo's worker
thread competes with the exiting main thread.

An atexit hook registered before setup runs after ddpseed's own (atexit is last in, first out)
and prints ``EXIT_CHECK <json>``: whether the group was still initialised and how many gloo
worker threads were left. With its own group the script destroys it there itself.
"""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

import ddpseed
from ddpseed import collective

own = os.environ.get("EXIT_GROUP", "ddpseed") == "own"


def gloo_workers() -> int:
    names = []
    for task in Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue
    return sum(name == "pt_gloo_runloop" for name in names)


def check() -> None:
    initialized = dist.is_initialized()
    print("EXIT_CHECK " + json.dumps({"initialized": initialized, "workers": gloo_workers()}))
    if own and initialized:
        dist.destroy_process_group()  # the script's own group is the script's to destroy


atexit.register(check)
if os.environ.get("EXIT_CPU"):
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
if own:
    dist.init_process_group("gloo")
plan = ddpseed.setup(seed=1, timeout=60)
print("BEFORE " + json.dumps({"workers": gloo_workers()}), flush=True)
for _ in range(int(os.environ.get("EXIT_REPEAT", "1"))):
    dist.all_reduce(torch.ones(64))
held = {"at_wait": 0, "at_return": 0}
release = collective._await_release


def counting(tensors: list[torch.Tensor], before: list[int]) -> None:
    def holding() -> bool:
        return any(n > b for n, b in zip(collective._refcounts(tensors), before, strict=True))

    held["at_wait"] += holding()
    release(tensors, before)
    held["at_return"] += holding()


collective._await_release = counting  # type: ignore[assignment]
for i in range(int(os.environ.get("EXIT_EXCHANGES", "0"))):
    collective.exchange("exit test", (i,), None, plan.topology, 60)
print("EXCHANGES " + json.dumps(held), flush=True)
