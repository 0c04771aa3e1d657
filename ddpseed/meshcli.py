"""``ddpseed plan --mesh`` and ``ddpseed verify --mesh``: the mesh parts of the command.

``plan --mesh pp=2,dp=2,tp=2`` prints one row per mesh coordinate (its data rank, process seed,
fork seeds and worker seeds) and every seed that two streams the policy keeps apart share.
``verify --mesh`` checks on a running job that ranks sharing streams by the policy drew the same
values and read the same shard, and that ranks kept apart did not.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from typing import Any

from .derivation import worker_seed
from .errors import DDPSeedError
from .mesh import MeshSpec, parse_mesh


def _dims(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (n.strip() for n in text.split(","))))


def add_arguments(p: argparse.ArgumentParser, *, plan: bool) -> None:
    p.add_argument("--mesh", default=None, help="mesh dims and sizes in order, e.g. dp=2,tp=2")
    p.add_argument("--data-dims", type=_dims, default=None, help="comma list (default: dp*)")
    p.add_argument("--distinct-dims", type=_dims, default=None, help="comma list (policy)")
    if plan:
        p.add_argument(
            "--fork", action="append", type=_dims, default=None, help="dims of a plan.fork()"
        )


def mesh_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``setup()`` keyword arguments from ``--mesh``/``--data-dims``/``--distinct-dims``."""
    if args.mesh is None:
        return {}
    names, shape = parse_mesh(args.mesh)
    return {
        "mesh": dict(zip(names, shape, strict=True)),
        "data_dims": args.data_dims,
        "distinct_dims": args.distinct_dims,
    }


def _specs(args: argparse.Namespace) -> list[MeshSpec]:
    names, shape = parse_mesh(args.mesh)
    return [
        MeshSpec.build(names, shape, coord, args.data_dims, args.distinct_dims)
        for coord in itertools.product(*(range(s) for s in shape))
    ]


def plan_table(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    """``ddpseed plan --mesh``: the per-coordinate table and the collisions."""
    if args.mesh is None:
        raise DDPSeedError("plan needs --world-size N or --mesh dp=2,tp=2,...")
    specs = _specs(args)
    first = specs[0]
    forks = [first.fork_dims(extra) for extra in (args.fork or [])]
    if args.world_size is not None and args.world_size != first.world_size:
        raise DDPSeedError(
            f"--world-size {args.world_size} but --mesh {args.mesh} has {first.world_size} ranks"
        )
    rows: list[tuple[Any, ...]] = []
    users: dict[int, set[tuple[Any, ...]]] = {}  # seed -> the streams that use it
    for rank, spec in enumerate(specs):
        coord = list(spec.coordinate)
        process = spec.seed(args.seed)
        forked = [spec.seed(args.seed, dims, fork=True) for dims in forks]
        workers = [
            worker_seed(args.seed, spec.data_rank, args.num_workers, w, 0, spec.data_world_size)
            for w in range(args.num_workers)
        ]
        rows.append((rank, coord, spec.data_rank, process, forked, workers))
        for stream, seed in (
            (("process", *_along(spec, spec.distinct_dims)), process),
            *(
                (("fork " + ",".join(d), *_along(spec, d)), s)
                for d, s in zip(forks, forked, strict=True)
            ),
            *((("worker", spec.data_rank, w), s) for w, s in enumerate(workers)),
        ):
            users.setdefault(seed, set()).add(stream)
    collisions = sorted((s, sorted(map(str, u))) for s, u in users.items() if len(u) > 1)
    if args.json:
        record = {k: v for k, v in first.record().items() if k != "coordinate"}
        keys = ("rank", "coordinate", "data_rank", "process_seed")
        named = [
            {
                **dict(zip(keys, row[:4], strict=True)),
                "fork_seeds": {",".join(d): s for d, s in zip(forks, row[4], strict=True)},
                "worker_seeds": row[5],
            }
            for row in rows
        ]
        found = [{"seed": s, "users": who} for s, who in collisions]
        out(json.dumps({"base_seed": args.seed, **record, "rows": named, "collisions": found}))
        return 0
    out(
        f"base seed {args.seed}, {first.describe()}; process streams shared along "
        f"{', '.join(n for n in first.names if n not in first.distinct_dims) or 'no dim'}"
    )
    fork_heads = "".join(f"  {'fork ' + ','.join(d):>12}" for d in forks)
    out(f"{'rank':>5} {'coordinate':>12} {'data':>4} {'process':>12}{fork_heads}  workers")
    for rank, coord, data, process, forked, workers in rows:
        cells = "".join(f"  {s:>12}" for s in forked)
        where = ",".join(map(str, coord))
        out(f"{rank:>5} {where:>12} {data:>4} {process:>12}{cells}  {' '.join(map(str, workers))}")
    if not collisions:
        out("collisions: none (no seed is used by two streams the policy keeps apart)")
    for seed, who in collisions[: args.show]:
        out(f"collision: {seed} used by {'; '.join(who)}")
    return 0


def _along(spec: MeshSpec, dims: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(spec.coordinate[p] for p in spec.positions(dims))


def report(plan: Any) -> dict[str, Any]:
    """The mesh fields of one rank's ``verify`` report."""
    spec = plan.mesh
    return {"mesh": spec.record(), "data_rank": plan.data_rank} if spec is not None else {}


def verify_problems(reports: list[dict[str, Any]], dataset_size: int) -> list[str]:
    """What breaks the mesh policy in the gathered ``verify`` reports (empty when all holds)."""
    problems = []
    specs = [MeshSpec.build(**r["mesh"]) for r in reports]
    for r, spec in zip(reports, specs, strict=True):
        if r["process_seed"] != spec.seed(r["base_seed"]):
            problems.append(f"rank {r['rank']}: process seed {r['process_seed']} breaks the rule")
        if r["draws"] != r["expected"]:
            problems.append(f"rank {r['rank']}: RNG draws {r['draws']} != expected {r['expected']}")
        if r.get("worker_seeds", {}) != r.get("expected_worker_seeds", {}):
            problems.append(f"rank {r['rank']}: worker seeds differ from the rule")
    for (a, sa), (b, sb) in itertools.combinations(zip(reports, specs, strict=True), 2):
        shared = _along(sa, sa.distinct_dims) == _along(sb, sb.distinct_dims)
        if shared != (a["draws"] == b["draws"]):
            want = "the same draws (peers along shared dims)" if shared else "different draws"
            problems.append(f"ranks {a['rank']} and {b['rank']}: expected {want}")
        if (a["data_rank"] == b["data_rank"]) != (a["shard"] == b["shard"]):
            problems.append(f"ranks {a['rank']} and {b['rank']}: shards break the data dims")
    shards = {r["data_rank"]: set(r["shard"]) for r in reports}
    if set().union(*shards.values()) != set(range(dataset_size)):
        problems.append("sampler shards do not cover the dataset")
    if dataset_size % len(shards) == 0 and sum(map(len, shards.values())) != dataset_size:
        problems.append("sampler shards of different data ranks overlap")
    return problems
