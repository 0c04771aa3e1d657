"""One task of an emulated launch (tests/test_concurrent_launches.py): the launcher's variables
(an srun step's SLURM_*, RANK/WORLD_SIZE...) come from the test.

``ddpseed.setup()``, then every rank's ``TAG`` gathered over the group, printed as one line
``STEP_RANK <json>`` (rank, world size, port, CUDA device, the tags of the group). A ddpseed
error prints ``DDPSEED_ERROR <type>: <message>`` to stderr and exits 3.

- ``MOCK_GPUS=n``: torch.cuda says n devices (the test machines have none); ``set_device`` and
  ``manual_seed`` are recorded, not made.
- ``SCRIPT_GROUP=1``: the script makes the (gloo) group itself before ``setup()``.
- ``HOLD=1``: print the line, then keep the group (rank 0: the rendezvous store) until stdin
  closes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import ddpseed

env = os.environ
if "MOCK_GPUS" in env:
    gpus = int(env["MOCK_GPUS"])
    current: list[int] = []
    torch.cuda.is_available = lambda: True  # type: ignore[assignment]
    torch.cuda.device_count = lambda: gpus  # type: ignore[assignment]
    torch.cuda.set_device = current.append  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda seed: None  # type: ignore[assignment]
started = time.monotonic()
try:
    if env.get("SCRIPT_GROUP"):
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
        )
    plan = ddpseed.setup(seed=11, timeout=float(env.get("TIMEOUT", "20")), backend="gloo")
except ddpseed.DDPSeedError as exc:
    print(f"ELAPSED {time.monotonic() - started:.2f}", file=sys.stderr)
    print(f"DDPSEED_ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    os._exit(3)  # peers may be gone: skip the group's teardown
tags: list[Any] = [None] * plan.world_size
if plan.world_size > 1:
    dist.all_gather_object(tags, env.get("TAG", "?"))
report = {
    "rank": plan.rank,
    "world_size": plan.world_size,
    "master_port": plan.topology.master_port,
    "launch_id": getattr(plan.topology, "launch_id", None),  # older ddpseed: none
    "cuda_device": plan.cuda_device,
    "group": tags,
}
print("STEP_RANK " + json.dumps(report), flush=True)
if env.get("HOLD"):
    sys.stdin.read()
if dist.is_initialized():
    dist.destroy_process_group()
