"""What ``ddpseed bench`` measures in, and how it prints what it measured.

Every measurement runs in fresh interpreters started by :func:`run_child`: one process, or
``world`` ranks that meet in a ``torch.distributed`` file store (no port to find). They run
``python -m ddpseed.bench CHILD ARGS`` with this environment minus every launcher variable
ddpseed reads (:data:`ddpseed.topology.LAUNCHER_VARIABLES`) and ddpseed's own ``DDPSEED_*``
settings, so an outer torchrun, Slurm step or exported seed cannot change what is measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpseed.topology import LAUNCHER_VARIABLES

Result = dict[str, Any]
CHILD_TIMEOUT = 600.0
STORE = "DDPSEED_BENCH_STORE"  # the file store of a multi-rank child, set by run_child


def child_env(**extra: str) -> dict[str, str]:
    """This environment without launcher variables or ``DDPSEED_*`` settings, plus ``extra``.

    >>> os.environ["DDPSEED_SEED"] = "1"
    >>> "DDPSEED_SEED" in child_env(), child_env(RANK="0")["RANK"]
    (False, '0')
    >>> del os.environ["DDPSEED_SEED"]
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DDPSEED_") and k not in LAUNCHER_VARIABLES
    }
    env.update(extra)
    return env


def run_child(args: Sequence[object], timeout: float = CHILD_TIMEOUT, world: int = 1) -> Result:
    """Run ``python -m ddpseed.bench ARGS`` as ``world`` ranks; rank 0's last stdout line, parsed.

    Ranks get ``RANK``/``WORLD_SIZE`` and the path of a file store in their environment. Each
    rank runs in its own session, so a timeout kills it with whatever it started.
    """
    cmd = [sys.executable, "-m", "ddpseed.bench", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="ddpseed-bench-") as tmp:
        procs = []
        for rank in range(world):
            ranked = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
            store = {STORE: str(Path(tmp) / "store")}
            env = child_env(**ranked, **store) if world > 1 else child_env()
            stdout, stderr = (Path(tmp) / f"{rank}.{io}" for io in ("out", "err"))
            with stdout.open("wb") as out_file, stderr.open("wb") as err_file:
                procs.append(
                    subprocess.Popen(
                        cmd, env=env, stdout=out_file, stderr=err_file, start_new_session=True
                    )
                )
        _wait(procs, timeout, Path(tmp), " ".join(map(str, args)))
        lines = (Path(tmp) / "0.out").read_text().strip().splitlines()
    result: Result = json.loads(lines[-1])
    return result


def _wait(procs: list[subprocess.Popen[bytes]], timeout: float, tmp: Path, what: str) -> None:
    """Wait for every rank until the deadline, kill what is left, raise on a failed rank."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            tail = (tmp / f"{rank}.err").read_text().strip().splitlines()[-5:]
            raise RuntimeError(
                f"{what}: rank {rank}/{len(procs)} exited with {proc.returncode}: "
                + "\n".join(tail)
            )


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def fmt_time(seconds: float) -> str:
    """Seconds for humans.

    >>> fmt_time(0.00042), fmt_time(15.5)
    ('420 us', '15.5 s')
    """
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.1f} s"


def fmt_bytes(size: float) -> str:
    """Bytes for humans (kB = 2**10 bytes, MB = 2**20, GB = 2**30).

    >>> fmt_bytes(3 * 2**20), fmt_bytes(5.5 * 2**30), fmt_bytes(0)
    ('3.0 MB', '5.50 GB', '0 kB')
    """
    if size >= 2**30:
        return f"{size / 2**30:.2f} GB"
    if size < 2**20:
        return f"{size / 2**10:.0f} kB"
    return f"{size / 2**20:.1f} MB"


def fmt_n(n: int) -> str:
    """A dataset size, powers of ten as ``1eK``.

    >>> fmt_n(10**8), fmt_n(12345)
    ('1e8', '12345')
    """
    exp = len(str(n)) - 1
    return f"1e{exp}" if n == 10**exp and exp >= 3 else str(n)


def fmt_ratio(ratio: Result) -> str:
    """A median ratio and its 95% interval.

    >>> fmt_ratio({"median": 0.99, "ci": (0.98, 1.004)})
    '0.990x [0.980-1.004]'
    """
    lo, hi = ratio["ci"]
    return f"{ratio['median']:.3f}x [{lo:.3f}-{hi:.3f}]"
