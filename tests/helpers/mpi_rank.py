"""One rank started by a real MPI launcher (tests/test_mpi.py): setup, a loader, exact resume.

MODE (environment) says what it does over epochs 0 and 1 of a shuffled loader:

  full    every batch
  save    STOP_AT batches, then ddpseed.save_state(STATE)
  resume  ddpseed.load_state(STATE), then the remaining batches

After each batch it draws ``torch.rand(1)``, so a resume must restore the RNGs as well as the
loader's position. Each rank prints one line ``MPI_RANK <json>``: its topology as detected,
the base seed and where it came from, and ``[epoch, batch, draw]`` per batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

import ddpseed

env = os.environ
plan = ddpseed.setup(timeout=float(env.get("TIMEOUT", "60")))
loader = plan.dataloader(range(40), batch_size=3, shuffle=True, name="train")
mode = env.get("MODE", "full")
if mode == "resume":
    ddpseed.load_state(env["STATE"], plan)
stop = int(env.get("STOP_AT", "-1"))
seen: list[list[Any]] = []
for epoch in range(plan.epoch, 2):
    plan.set_epoch(epoch)
    for batch in loader:
        seen.append([epoch, batch.tolist(), float(torch.rand(1))])
        if mode == "save" and len(seen) == stop:
            ddpseed.save_state(env["STATE"], plan)
            break
    else:
        continue
    break
report = {
    **dataclasses.asdict(plan.topology),
    "base_seed": plan.base_seed,
    "seed_source": plan.seed_source,
    "process_seed": plan.process_seed,
    "seen": seen,
}
print("MPI_RANK " + json.dumps(report), flush=True)
