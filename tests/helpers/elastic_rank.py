"""One rank of a training run that records what every global step consumed (under torchrun).

Settings from the environment: DATA_LEN, BATCH (per rank), WORKERS, EPOCHS, SCALABLE,
RANDOMNESS, OUT (a directory: rank r appends one JSON line per step to ``OUT/rank<r>.jsonl``),
STATE (checkpoint path), SAVE_AT / KILL_AT ("epoch:step": save_state after that step / SIGKILL
this rank after that step, rank 0 only), LOAD ("", "exact" or "elastic": load_state(STATE)
before training). A tiny linear model is trained with gradients averaged over the ranks, as
DDP does; its final weights are written to ``OUT/weights.json`` by rank 0.

A step's line: {"epoch", "start", "step", "items": [[index, draw, draw, draw], ...]}: "start" is
the loader's global position when the pass began (0, or where a resume continued), "step" counts
from there, and the draws are
what the dataset drew from torch, NumPy and ``random`` for that item. On a ddpseed error the rank
prints "DDPSEED_ERROR <type>: <msg>" to stderr and exits 3.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

import ddpseed

env = os.environ


class Drawn(Dataset[torch.Tensor]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        drawn = [float(torch.rand(1)), float(np.random.rand()), random.random()]
        return torch.tensor([float(index), *drawn], dtype=torch.float64)


def at(name: str) -> tuple[int, int] | None:
    text = env.get(name, "")
    return (int(text.split(":")[0]), int(text.split(":")[1])) if text else None


def main() -> None:
    plan = ddpseed.setup(timeout=float(env.get("TIMEOUT", "60")))
    loader = plan.dataloader(
        Drawn(int(env.get("DATA_LEN", "100"))),
        batch_size=int(env["BATCH"]),
        num_workers=int(env.get("WORKERS", "0")),
        scalable=env.get("SCALABLE", "0") == "1",
        randomness=env.get("RANDOMNESS", "sample"),  # type: ignore[arg-type]
        name="train",
    )
    if env.get("LOAD"):
        ddpseed.load_state(env["STATE"], plan, elastic=env["LOAD"] == "elastic")
    out = Path(env["OUT"])
    weights = torch.zeros(3, dtype=torch.float64)
    save_at, kill_at = at("SAVE_AT"), at("KILL_AT")
    with (out / f"rank{plan.rank}.jsonl").open("a") as log:
        for epoch in range(plan.epoch, int(env.get("EPOCHS", "2"))):
            plan.set_epoch(epoch)
            start = loader.state_dict().get("global_position", 0)
            for step, batch in enumerate(loader):
                line = {"epoch": epoch, "start": start, "step": step, "items": batch.tolist()}
                log.write(json.dumps(line) + "\n")
                log.flush()
                x, y = batch[:, 1:], batch[:, :1].squeeze(1) / 1000
                grad = 2 * x.T @ (x @ weights - y) / len(batch)
                if dist.is_initialized():
                    dist.all_reduce(grad)
                weights -= 0.1 * grad / plan.world_size
                if (epoch, step) == save_at:
                    ddpseed.save_state(env["STATE"], plan)
                if (epoch, step) == kill_at and plan.rank == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
    if plan.rank == 0:
        (out / "weights.json").write_text(json.dumps(weights.tolist()))
    print("OK", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


try:
    main()
except ddpseed.DDPSeedError as exc:
    print(f"DDPSEED_ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    os._exit(3)
