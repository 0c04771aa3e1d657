"""One rank of a mesh "training" under torchrun that checkpoints, may be killed, and resumes.

Settings from the environment: MESH, OUT (directory), CKPT (directory; empty = no checkpoints),
KILL_AT (SIGKILL rank KILL_RANK at this step of attempt 0; 0 = never), WORKERS. Every step
draws an augmented batch, a value from each shared stream and from each stream of
``plan.fork("tp")``; each rank writes its trace to OUT/rank<r>.json at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import ddpseed
from ddpseed.demo import AugmentedBlobs
from ddpseed.mesh import parse_mesh

env = os.environ
EVERY = 4


def draws() -> list[float]:
    return [random.random(), float(np.random.random()), float(torch.rand(1))]


def main() -> None:
    dims, shape = parse_mesh(env["MESH"])
    # The mapping form: ddpseed makes the DeviceMesh over its own process group, which (unlike
    # init_device_mesh's env:// group) survives a torchrun restart.
    plan = ddpseed.setup(seed=21, mesh=dict(zip(dims, shape, strict=True)), timeout=120)
    assert plan.device_mesh.mesh_dim_names == dims
    loader = plan.dataloader(
        AugmentedBlobs(48), batch_size=4, num_workers=int(env.get("WORKERS", "2")), name="train"
    )
    ckpt = Path(env["CKPT"]) if env.get("CKPT") else None
    mine = ckpt / f"trace.rank{plan.rank}.json" if ckpt else None
    trace: list[list[object]] = []
    step, start = 0, 0
    if ckpt is not None and mine is not None and mine.exists():
        ddpseed.load_state(ckpt / "rng.pt", plan)
        trace = json.loads(mine.read_text())
        step, start = len(trace), plan.epoch
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    for epoch in range(start, 2):
        plan.set_epoch(epoch)
        for x, _ in loader:
            step += 1
            with plan.fork("tp"):
                forked = draws()
            digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]
            trace.append([step, digest, draws(), forked])
            if ckpt is not None and mine is not None and step % EVERY == 0:
                ddpseed.save_state(ckpt / "rng.pt", plan)
                tmp = mine.with_suffix(".tmp")
                tmp.write_text(json.dumps(trace))
                os.replace(tmp, mine)
                dist.barrier()
            kill = step == int(env.get("KILL_AT", "0")) and attempt == 0
            if kill and plan.rank == int(env.get("KILL_RANK", "1")):
                os.kill(os.getpid(), signal.SIGKILL)
    out = Path(env["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    result = {"rank": plan.rank, "attempt": attempt, "trace": trace}
    (out / f"rank{plan.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
