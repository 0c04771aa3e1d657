"""Run real rank processes (plain env:// ranks or torchrun) with deadlines and cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ddpseed.topology import LAUNCHER_VARIABLES

REPO = Path(__file__).resolve().parents[2]
# A test's child processes see only the launcher variables the test itself passes (the suite
# may itself run inside torchrun, Slurm, mpirun or a job): every variable ddpseed reads
# (ddpseed.topology.LAUNCHER_VARIABLES), ddpseed's own DDPSEED_* settings, and the settings of
# the launch/ scripts.
LAUNCHER_PREFIXES = ("DDPSEED_",)
LAUNCH_SCRIPT_VARS = frozenset(
    {
        *("NODE_RANK", "NNODES", "NPROC_PER_NODE", "RDZV", "RUN_ID", "LOCAL_ADDR", "NP"),
        *("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RDZV_IS_HOST", "TORCHRUN_EXTRA_ARGS"),
        *("TORCHRUN_SH", "DRY_RUN", "PYTHONHASHSEED", "PYTHON", "MPIRUN", "HOSTS", "HOSTFILE"),
        *("MPIRUN_EXTRA_ARGS",),
    }
)
LAUNCHER_VARS = LAUNCHER_VARIABLES | LAUNCH_SCRIPT_VARS


def without_launcher(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the variables named by LAUNCHER_VARS and LAUNCHER_PREFIXES."""
    return {
        k: v
        for k, v in environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)
    }


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


def processes_carrying(token: str) -> list[int]:
    """Pids whose command line or environment holds ``token`` (what one test case started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(token.encode() in (proc / f).read_bytes() for f in ("cmdline", "environ")):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    env = without_launcher(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


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
                _kill_group(proc)
                out, err = proc.communicate()
                err += f"\n[test harness: rank {rank} killed after {timeout}s deadline]"
            results.append(RankResult(rank, proc.returncode, out, err, time.monotonic() - started))
    finally:
        for _, proc, _ in procs:
            _kill_group(proc)
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
        _kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"torchrun exceeded {timeout}s:\n{err[-4000:]}") from None
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
