"""What every launcher class shares: the :class:`Topology` it returns, the base class, and the
rules they all apply (reading integer variables, deriving a port from a job id)."""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from ..errors import TopologyError

Launcher = Literal[
    "torchrun",
    "kubeflow",
    "lsf",
    "openmpi",
    "mvapich",
    "flux",
    "pals",
    "mpich",
    "pmix",
    "slurm",
    "sagemaker",
    "single",
    "group",  # no launcher variables, but a process group the script made (group.py)
]
DEFAULT_PORT = 29500
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Topology:
    """Rank, sizes and rendezvous address of this process. Immutable."""

    launcher: Launcher
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    # Names the launch across its restarts, if the launcher gives it a name: Slurm's job and
    # step ids ("slurm-<job>.<step>", kept by a requeue); under torchrun "torchrun[-<rdzv
    # id>]" (after the Slurm step, if any), which ddpseed.rundir completes with a key kept in
    # torchrun's agent store (one per launch).
    run_id: str | None = None
    # Names the launch the same way on every one of its ranks, where the launcher gives such a
    # name (Slurm: job and step; Open MPI, LSF, PALS, Flux: their job ids): ranks compare it
    # when ddpseed makes the group, so processes of two launches meeting at one port stop.
    launch_id: str | None = None

    def __post_init__(self) -> None:
        where = f"{self.launcher} environment"
        if self.world_size < 1:
            raise TopologyError(f"{where}: world size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(
                f"{where}: rank {self.rank} is not in [0, world size {self.world_size}); "
                "check that the rank and world size variables come from the same launch"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise TopologyError(
                f"{where}: rank {self.rank} has local rank {self.local_rank}, not in "
                f"[0, local world size {self.local_world_size})"
            )
        if not 0 <= self.node_rank < self.num_nodes:
            raise TopologyError(
                f"{where}: rank {self.rank} is on node {self.node_rank}, "
                f"not in [0, {self.num_nodes} nodes)"
            )
        if not 0 < self.master_port < 65536:
            raise TopologyError(f"{where}: master port {self.master_port} is not a TCP port")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        return (
            f"Topology({self.launcher} rank {self.rank}/{self.world_size} "
            f"local {self.local_rank}/{self.local_world_size} "
            f"node {self.node_rank}/{self.num_nodes} "
            f"master {self.master_addr}:{self.master_port})"
        )


def int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise TopologyError(f"{name} is not set; the launcher must set it (or unset RANK)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise TopologyError(f"{name}={raw!r} is not an integer") from None


def first_set(env: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The first of ``names`` set (non-empty) in ``env``."""
    return next((n for n in names if env.get(n)), None)


def numeric_id(job_id: str) -> bool:
    """Whether ``job_id`` is ASCII digits (``str.isdigit`` also takes ``'²'``, which ``int``
    refuses, and Arabic-Indic digits, which ``int`` reads): the ids launch/lib.sh's
    ``ddpseed_job_port`` takes, so bash and Python derive the same port."""
    return job_id.isascii() and job_id.isdigit()


# Steps of one job are STEP_STRIDE apart in the port rule: step 0 keeps the job's own port, and
# the first 16 steps of a job land at least 693 ports away from the other jobs' step 0.
STEP_STRIDE = 7639


def job_port(job_id: str, step: str | None = None) -> int:
    """The rendezvous port of a launch: step ``step`` (None: the job's only one) of job
    ``job_id``. Numeric ids: ``10000 + (job + 7639 * step) % 20000``, so step 0 gets the job's
    port and concurrent steps of one job (a Slurm sweep of ``srun ... &``) different ones;
    else derived from the CRC-32 of ``job.step``. Every rank of one launch computes the same
    port; launch/lib.sh's ``ddpseed_job_port`` applies the numeric rule.

    >>> job_port("17"), job_port("17", "0"), job_port("17", "1"), job_port("1143930881")
    (10017, 10017, 17656, 20881)
    >>> job_port("fABC") == job_port("fABC") != job_port("fABC", "1")
    True
    """
    if numeric_id(job_id) and (step is None or numeric_id(step)):
        key = int(job_id) + STEP_STRIDE * int(step or 0)
    else:
        key = zlib.crc32((job_id if step is None else f"{job_id}.{step}").encode())
    return 10000 + key % 20000


def block_node(rank: int, local_world: int, num_nodes: int) -> int:
    # Launchers that name no node index: ranks are placed in blocks of local_world (mpirun's
    # and mpiexec's default). Only reports use node_rank; the rendezvous does not.
    return min(rank // max(local_world, 1), num_nodes - 1)


class LauncherEnvironment:
    """Maps one launcher's variables to a :class:`Topology`."""

    name: ClassVar[Launcher]
    variables: ClassVar[tuple[str, ...]] = ()

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.env: Mapping[str, str] = os.environ if environ is None else environ

    def activated(self) -> bool:
        raise NotImplementedError

    def topology(self) -> Topology:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(activated={self.activated()})"

    def why(self) -> str:
        """The variables that made this launcher apply, for ``ddpseed env``."""
        found = [f"{v}={self.env[v]}" for v in self.variables[:3] if v in self.env]
        return ", ".join(found) or "no launcher variables are set"

    def rendezvous(
        self,
        rank: int,
        world: int,
        local_world: int,
        hosts: Sequence[str],
        job: str | None,
        step: str | None = None,
    ) -> tuple[str, int]:
        """``(MASTER_ADDR, MASTER_PORT)``: exported, else loopback when every rank is local,
        else ``hosts[0]``; the port from ``job`` (and its ``step``, :func:`job_port`). Raises
        the same error on every rank."""
        env = self.env
        addr = env.get("MASTER_ADDR") or (
            LOOPBACK if local_world == world else (hosts[0] if hosts else "")
        )
        fix = (
            "export MASTER_ADDR (the host of rank 0) and MASTER_PORT (a free port) to every "
            "rank, e.g. `mpirun -x MASTER_ADDR=node0 -x MASTER_PORT=29500 ...` or "
            "launch/mpirun.sh, which does it"
        )
        if not addr:
            raise TopologyError(
                f"rank {rank}: {self.name} started {world} processes over several nodes "
                f"({local_world} on this one) and names no host for rank 0; {fix}"
            )
        if env.get("MASTER_PORT"):
            return addr, int_var(env, "MASTER_PORT")
        if not job:
            raise TopologyError(
                f"rank {rank}: {self.name} gives this launch no job id to derive a rendezvous "
                f"port from; {fix}"
            )
        return addr, job_port(job, step)


def safe_name(text: str) -> str:
    """``text`` as one path component: only ``[A-Za-z0-9._-]``, at most 100 characters.

    >>> safe_name("torchrun-../x y")
    'torchrun-.._x_y'
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100]


def ancestor_pid(names: Sequence[str], max_depth: int = 8) -> int | None:
    """The pid of this process's nearest ancestor whose command name is in ``names`` (Linux
    /proc), e.g. the ``hydra_pmi_proxy`` every local MPICH rank descends from."""
    pid = os.getppid()
    for _ in range(max_depth):
        if pid <= 1:
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if comm in names:
            return pid
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return None
