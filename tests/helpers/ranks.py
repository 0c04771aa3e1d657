"""Run real rank processes (plain env:// ranks or torchrun) with deadlines and cleanup, and read
and check what ``ddpseed verify --json`` reports. Environments, ports and killing come from
tests/helpers/procs.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.procs import clean_env, free_port, kill_tree, processes_carrying

SHARD_ITEMS = 64  # `ddpseed verify` shards a 64-item dataset
VERIFY_MARKER = "DDPSEED_VERIFY "


def parse_verify(output: str, what: str = "the job") -> list[dict[str, Any]]:
    """The per-rank reports of the ``DDPSEED_VERIFY <json>`` line rank 0 of ``ddpseed verify
    --json`` printed, by rank."""
    found = [line for line in output.splitlines() if VERIFY_MARKER in line]
    assert len(found) == 1, (
        f"{what}: expected one {VERIFY_MARKER.strip()} line, got {len(found)}:\n{output[-6000:]}"
    )
    reports = json.loads(found[0].split(VERIFY_MARKER, 1)[1])
    assert isinstance(reports, list), reports
    return sorted(reports, key=lambda r: int(r["rank"]))


def assert_bounded(results: list[RankResult], token: str, limit: float) -> None:
    """No process of the case (carrying ``token``) outlived it, no rank hung, and every rank
    that reported ``ELAPSED <seconds>`` (a rank script's failure path) failed within ``limit``."""
    assert processes_carrying(token) == [], "a rank process outlived its case"
    for r in results:
        assert "test harness" not in r.stderr, f"rank {r.rank} hung:\n{r.stderr[-2000:]}"
        for line in r.stderr.splitlines():
            if line.startswith("ELAPSED "):
                took = float(line.split()[1])
                assert took <= limit, f"rank {r.rank} failed after {took}s:\n{r.stderr[-2000:]}"


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


def run_ranks(
    script: str | Path,
    world_size: int,
    *,
    timeout: float,
    ranks: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    per_rank_env: Mapping[int, Mapping[str, str]] | None = None,
    args: Sequence[str] = (),
) -> list[RankResult]:
    """Start ``ranks`` (default all) of a ``world_size`` env:// job running ``script``.

    Every process gets its own session; all are killed when the deadline passes, so nothing
    outlives the call. Results are ordered like ``ranks``.
    """
    port = free_port()
    chosen = list(range(world_size)) if ranks is None else list(ranks)
    procs: list[tuple[int, subprocess.Popen[str], float]] = []
    for rank in chosen:
        e = clean_env(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            **(env or {}),
        )
        e.update((per_rank_env or {}).get(rank, {}))
        proc = subprocess.Popen(
            [sys.executable, str(script), *args],
            env=e,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append((rank, proc, time.monotonic()))
    deadline = time.monotonic() + timeout
    results = []
    try:
        for rank, proc, started in procs:
            try:
                out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_tree([proc], grace=0)
                out, err = proc.communicate()
                err += f"\n[test harness: rank {rank} killed after {timeout}s deadline]"
            results.append(RankResult(rank, proc.returncode, out, err, time.monotonic() - started))
    finally:
        kill_tree([proc for _, proc, _ in procs], grace=0)
    return results


def torchrun(
    module_args: Sequence[str],
    *,
    nproc: int,
    timeout: float,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    standalone: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun --standalone --nproc_per_node=nproc`` in its own session, bounded.

    ``standalone=False`` leaves the rendezvous to ``extra`` (static: ``--master-port``; c10d:
    ``--rdzv-backend``, ``--rdzv-endpoint``, ``--rdzv-id``)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *(["--standalone"] if standalone else []),
        f"--nproc_per_node={nproc}",
        *extra,
        *module_args,
    ]
    proc = subprocess.Popen(
        cmd,
        env=clean_env(**(env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=cwd,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree([proc], grace=0)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun exceeded {timeout}s:\n{err[-4000:]}") from None
    finally:
        kill_tree([proc], grace=0)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_verify(
    reports: Sequence[Mapping[str, Any]],
    *,
    nodes: int,
    per_node: int,
    launcher: str,
    seed: int | None = None,
    static_nodes: bool = True,
) -> None:
    """Every rank agrees and reports the topology its launcher gave it.

    ``static_nodes`` means node ``k`` holds ranks ``k*per_node ...``; with c10d rendezvous the
    node ranks come from arrival order, so only their consistency is checked.
    """
    world = nodes * per_node
    brief = [
        {k: r.get(k) for k in ("rank", "node_rank", "local_rank", "launcher", "base_seed")}
        for r in reports
    ]
    assert [r["rank"] for r in reports] == list(range(world)), brief
    assert all(r["agree"] is True for r in reports), brief
    assert len({r["base_seed"] for r in reports}) == 1, brief
    if seed is not None:
        assert reports[0]["base_seed"] == seed, brief
    assert len({r["process_seed"] for r in reports}) == world, "process seeds must differ"
    places = set()
    for r in reports:
        assert r["launcher"] == launcher, brief
        assert r["world_size"] == world, r
        assert r["local_world_size"] == per_node, r
        assert r["num_nodes"] == nodes, r
        assert 0 <= r["local_rank"] < per_node, r
        assert 0 <= r["node_rank"] < nodes, r
        assert r["rank"] == r["node_rank"] * per_node + r["local_rank"], r
        if static_nodes:
            assert r["node_rank"] == r["rank"] // per_node, r
        places.add((r["node_rank"], r["local_rank"]))
        assert isinstance(r["draws"], dict), r
    assert len(places) == world, f"two ranks claim one (node, local rank): {brief}"
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1, reports
    shards = [list(r["shard"]) for r in reports]
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)), f"sampler shards overlap: {shards}"
    assert sorted(flat) == list(range(SHARD_ITEMS)), f"shards do not cover the data: {shards}"
