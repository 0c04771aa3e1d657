"""One rank of a mesh job under torchrun: init_device_mesh on CPU/gloo, then ddpseed.setup(mesh=).

Settings from the environment: MESH ("dp=2,tp=2"), DATA_DIMS / DISTINCT_DIMS (comma lists;
unset = ddpseed's defaults), WORKERS, DATA_LEN, BATCH, OUT (directory), NO_MESH=1 (this rank
calls setup without mesh=). Writes OUT/rank<r>.json with what this rank saw: its coordinate
and data rank, the indices and a digest of every augmented batch of two epochs, draws from
random/NumPy/torch after setup, and (with FORK=1) draws inside and after ``plan.fork("tp")``
and a DTensor dropout.

On a ddpseed error prints "DDPSEED_ERROR <type>: <msg>" to stderr and exits 3.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import ddpseed
from ddpseed.demo import AugmentedBlobs
from ddpseed.mesh import parse_mesh

env = os.environ


class IndexedBlobs(AugmentedBlobs):
    """AugmentedBlobs that also returns the index, so a batch names the samples it holds."""

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:  # type: ignore[override]
        x, y = super().__getitem__(i)
        return i, x, y


def draws() -> list[float]:
    return [random.random(), float(np.random.random()), float(torch.rand(1))]


def names(key: str) -> tuple[str, ...] | None:
    value = env.get(key)
    return None if value is None else tuple(filter(None, value.split(",")))


def main() -> dict[str, Any]:
    dims, shape = parse_mesh(env["MESH"])
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=dims)
    plan = ddpseed.setup(
        seed=int(env.get("SEED", "11")),
        mesh=None if env.get("NO_MESH") == "1" else mesh,  # a rank that forgot it
        data_dims=names("DATA_DIMS"),
        distinct_dims=names("DISTINCT_DIMS"),
        timeout=float(env.get("TIMEOUT", "60")),
    )
    seen: dict[str, Any] = {
        "rank": plan.rank,
        "coordinate": list(mesh.get_coordinate() or ()),
        "data_rank": plan.data_rank,
        "data_world_size": plan.data_world_size,
        "process_seed": plan.process_seed,
        "draws": draws(),
    }
    loader = plan.dataloader(
        IndexedBlobs(int(env.get("DATA_LEN", "40"))),
        batch_size=int(env.get("BATCH", "4")),
        num_workers=int(env.get("WORKERS", "0")),
    )
    assert loader.sampler.num_replicas == plan.data_world_size  # type: ignore[attr-defined]
    assert loader.sampler.rank == plan.data_rank  # type: ignore[attr-defined]
    epochs = []
    for epoch in range(2):
        plan.set_epoch(epoch)
        epochs.append(
            [
                [idx.tolist(), hashlib.sha256(x.numpy().tobytes()).hexdigest()]
                for idx, x, _ in loader
            ]
        )
    seen["epochs"] = epochs
    if env.get("FORK") == "1":
        seen.update(forked(plan, mesh))
    return seen


def forked(plan: ddpseed.SeedPlan, mesh: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    before = draws()
    with plan.fork("tp"):
        inside = draws()
        # DTensor random op on a CPU mesh: dropout runs on the local shard with this process's
        # torch generator (DTensor's offset tracker is CUDA-only).
        sharded = distribute_tensor(torch.ones(8, 8), mesh["tp"], [Shard(0)])
        fork_mask = torch.nn.functional.dropout(sharded, 0.5).to_local()
    with plan.fork("tp"):
        again = draws()  # the forked stream continues where it stopped
    replicated = distribute_tensor(torch.ones(8, 8), mesh["tp"], [Replicate()])
    state = torch.get_rng_state()
    mask = torch.nn.functional.dropout(replicated, 0.5).to_local()
    torch.set_rng_state(state)
    local = torch.nn.functional.dropout(torch.ones(8, 8), 0.5)
    return {
        "dtensor_dropout_is_local_dropout": bool(torch.equal(mask, local)),
        "before_fork": before,
        "inside_fork": inside,
        "fork_again": again,
        "after_fork": draws(),
        "fork_dropout": fork_mask.flatten().tolist(),
        "replicated_dropout": mask.flatten().tolist(),
    }


if __name__ == "__main__":
    try:
        result = main()
    except ddpseed.DDPSeedError as exc:
        print(f"DDPSEED_ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(3)
    out = Path(env["OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    dist.destroy_process_group()
