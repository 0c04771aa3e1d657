"""A small, real DDP training on CPU: the ``ddpseed demo`` workload and the resume tests'.

Run one rank of it under torchrun::

    torchrun --standalone --nproc_per_node=2 -m ddpseed.demo --out result.json

Randomness comes from everywhere a real job has it: model init, dropout, and augmentation
inside DataLoader workers drawing from ``random``, NumPy and torch.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

import ddpseed


class AugmentedBlobs(Dataset[tuple[torch.Tensor, int]]):
    """Two Gaussian blobs with random noise, flips and scaling applied per fetch."""

    def __init__(self, n: int = 256, dim: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (n,), generator=gen)
        self.x = torch.randn(n, dim, generator=gen) + self.y[:, None].float() * 1.5

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i] + 0.1 * torch.randn(self.x.shape[1])
        if random.random() < 0.5:
            x = x.flip(0)
        return x * float(np.random.uniform(0.9, 1.1)), int(self.y[i])


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ddpseed.demo")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="rank 0 writes the result JSON here")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--persistent-workers", action="store_true")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="checkpoint/resume directory")
    p.add_argument("--run-dir", type=Path, default=None)
    p.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    p.add_argument("--kill-at-step", type=int, default=0, help="SIGKILL a rank at this step")
    p.add_argument("--kill-rank", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument(
        "--val-every", type=int, default=0, help="evaluate a validation set every N steps"
    )
    p.add_argument(
        "--probe", action="store_true", help="probe the batch size with next(iter(loader)) first"
    )
    return p.parse_args(argv)


def evaluate(model: nn.Module, loader: Any) -> float:
    """Mean loss over the whole validation shard (dropout off, no gradients)."""
    model.eval()
    with torch.no_grad():
        losses = [float(nn.functional.cross_entropy(model(x), y)) for x, y in loader]
    model.train()
    return sum(losses) / max(1, len(losses))


def train(args: argparse.Namespace) -> dict[str, Any]:
    plan = ddpseed.setup(seed=args.seed, run_dir=args.run_dir, timeout=args.timeout)
    model: nn.Module = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2)
    )
    if plan.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    workers = args.num_workers
    loader = plan.dataloader(
        AugmentedBlobs(args.samples),
        batch_size=args.batch_size,
        num_workers=workers,
        persistent_workers=args.persistent_workers and workers > 0,
        name="train",
    )
    val = plan.dataloader(
        AugmentedBlobs(args.samples // 4), batch_size=args.batch_size, shuffle=False, name="val"
    )
    step, start_epoch, resumed_from = 0, 0, None
    ckpt = args.ckpt_dir / "ckpt.pt" if args.ckpt_dir else None
    if ckpt is not None and (args.ckpt_dir / "ckpt.commit.json").exists():
        # Model, optimizer and step were saved in the same unit as RNGs and data positions.
        saved = ddpseed.load_state(ckpt, plan)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        step = resumed_from = int(saved["step"])
        start_epoch = plan.epoch
    if args.probe:  # the DDP tutorial's batch-size probe: must not move the resume position
        assert len(next(iter(loader))[0]) == args.batch_size
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    trace: list[tuple[int, float, float]] = []  # (step, batch sum, loss) on rank 0
    for epoch in range(start_epoch, args.epochs):
        plan.set_epoch(epoch)
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            trace.append((step, float(x.double().sum()), float(loss)))
            if args.val_every and step % args.val_every == 0:
                trace.append((step, -1.0, evaluate(model, val)))
            if ckpt is not None and step % args.every == 0:
                # Every rank keeps the (DDP-identical) model: one atomic unit per save.
                extra = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step}
                ddpseed.save_state(ckpt, plan, extra=extra)
            if step == args.kill_at_step and restart == 0 and plan.rank == args.kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
    result = {
        "base_seed": plan.base_seed,
        "seed_source": plan.seed_source,
        "world_size": plan.world_size,
        "steps": step,
        "resumed_from_step": resumed_from,
        "restarts": restart,
        "weights_sha256": weights_digest(model),
        "trace": trace,
        "process_seeds": [ddpseed.process_seed(plan.base_seed, r) for r in range(plan.world_size)],
        "worker_seeds": [
            [ddpseed.worker_seed(plan.base_seed, r, workers, w) for w in range(workers)]
            for r in range(plan.world_size)
        ]
        if workers
        else [],
    }
    if plan.rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if plan.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    train(parse(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
