"""Where this process sits in the job, read from the launcher's environment.

One small class per launcher maps its variables to a :class:`Topology`; :func:`detect` asks
them in order of precedence (torchrun beats Slurm, since torchrun inside an sbatch allocation
sets both, and its variables describe the processes that actually run)::

    >>> detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    Topology(torchrun rank 1/2 local 1/2 node 0/1 master 127.0.0.1:29500)
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

from .errors import TopologyError
from .hostlist import expand_hostlist, parse_tasks_per_node

log = logging.getLogger(__name__)

Launcher = Literal["torchrun", "slurm", "single"]
DEFAULT_PORT = 29500


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
    # step ids ("slurm-<job>.<step>", kept by a requeue), else "torchrun[-<rdzv id>]", which
    # ddpseed.rundir completes with a key kept in torchrun's agent store (one per launch).
    run_id: str | None = None

    def __post_init__(self) -> None:
        where = f"{self.launcher} environment"
        if self.world_size < 1:
            raise TopologyError(f"{where}: world size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise TopologyError(
                f"{where}: rank {self.rank} is not in [0, world size {self.world_size}); "
                "check RANK/SLURM_PROCID and WORLD_SIZE/SLURM_NTASKS come from the same launch"
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


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is None:
            raise TopologyError(f"{name} is not set; the launcher must set it (or unset RANK)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise TopologyError(f"{name}={raw!r} is not an integer") from None


class LauncherEnvironment:
    """Maps one launcher's variables to a :class:`Topology`."""

    name: ClassVar[Launcher]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.env: Mapping[str, str] = os.environ if environ is None else environ

    def activated(self) -> bool:
        raise NotImplementedError

    def topology(self) -> Topology:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(activated={self.activated()})"


class TorchrunEnvironment(LauncherEnvironment):
    """``torchrun`` / ``torch.distributed.run``, or any env:// launch that sets ``RANK``."""

    name = "torchrun"

    def activated(self) -> bool:
        return "RANK" in self.env or "TORCHELASTIC_RUN_ID" in self.env

    def topology(self) -> Topology:
        env = self.env
        if "WORLD_SIZE" not in env:
            raise TopologyError(
                f"RANK={env.get('RANK')!r} is set but WORLD_SIZE is not; launch with torchrun "
                "or set WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) on every rank"
            )
        rank = _int(env, "RANK")
        world = _int(env, "WORLD_SIZE")
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        num_nodes = _int(env, "GROUP_WORLD_SIZE", -(-world // max(local_world, 1)))
        rdzv_id = env.get("TORCHELASTIC_RUN_ID")
        return Topology(
            launcher="torchrun",
            rank=rank,
            local_rank=_int(env, "LOCAL_RANK", rank),
            world_size=world,
            local_world_size=local_world,
            node_rank=_int(env, "GROUP_RANK", 0),
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            run_id=slurm_run_id(env) or torchrun_run_id(rdzv_id),
        )


def slurm_job_id(env: Mapping[str, str]) -> str:
    """The Slurm job id (``SLURM_JOB_ID``, or the older ``SLURM_JOBID``), ``""`` outside one.

    >>> slurm_job_id({"SLURM_JOBID": "17"}), slurm_job_id({})
    ('17', '')
    """
    return env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or ""


def slurm_run_id(env: Mapping[str, str]) -> str | None:
    """The Slurm job step this process belongs to, as a run id: ``slurm-<job>.<step>``.

    A requeued job keeps its job id and numbers its steps from 0 again, so each ``srun`` step
    is one run and a requeue continues it; the batch script itself is step ``batch``.

    >>> slurm_run_id({"SLURM_JOB_ID": "17", "SLURM_STEP_ID": "2"}), slurm_run_id({})
    ('slurm-17.2', None)
    >>> slurm_run_id({"SLURM_JOB_ID": "17"})
    'slurm-17.batch'
    """
    job = slurm_job_id(env)
    if not job:
        return None
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")) or "batch"
    return safe_name(f"slurm-{job}.{step}")


def torchrun_run_id(rdzv_id: str | None) -> str | None:
    """``torchrun[-<rdzv id>]`` for a torchrun worker (None outside torchrun).

    The rendezvous id alone names no launch: torchrun's default is the literal ``none``, and
    a script may pass the same ``--rdzv-id`` to every job. ``ddpseed.rundir`` appends a key
    that torchrun's agent store keeps for the launch's lifetime.

    >>> torchrun_run_id("none"), torchrun_run_id("exp/42"), torchrun_run_id(None)
    ('torchrun', 'torchrun-exp_42', None)
    """
    if rdzv_id is None:
        return None
    return "torchrun" if rdzv_id in ("", "none") else safe_name(f"torchrun-{rdzv_id}")


def safe_name(text: str) -> str:
    """``text`` as one path component: only ``[A-Za-z0-9._-]``, at most 100 characters.

    >>> safe_name("torchrun-../x y")
    'torchrun-.._x_y'
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:100]


# Where a Slurm task finds its nodes, most specific first.
_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


class SlurmEnvironment(LauncherEnvironment):
    """A task started by ``srun`` (inside ``sbatch``/``salloc`` or not)."""

    name = "slurm"

    def in_allocation(self) -> bool:
        return bool(slurm_job_id(self.env))

    def in_step(self) -> bool:
        # The batch script (and salloc's shell) sees SLURM_PROCID=0 and the allocation's
        # SLURM_NTASKS but is one process; it has no SLURM_STEP_ID at all, srun tasks have a
        # numeric one (checked against Slurm 22.05 in tests/test_slurm.py).
        step = self.env.get("SLURM_STEP_ID", self.env.get("SLURM_STEPID"))
        return step is not None and step not in ("batch", "4294967294")

    def activated(self) -> bool:
        return "SLURM_PROCID" in self.env and self.in_step()

    def topology(self) -> Topology:
        env = self.env
        job_id = slurm_job_id(env)
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        rank = _int(env, "SLURM_PROCID")
        nodes_var = next((v for v in _NODELIST_VARS if v in env), None)
        try:
            hosts = expand_hostlist(env[nodes_var], var=nodes_var) if nodes_var else ["127.0.0.1"]
        except TopologyError as exc:
            raise TopologyError(f"rank {rank}: {exc}") from None
        tasks_var = (
            "SLURM_STEP_TASKS_PER_NODE"
            if "SLURM_STEP_TASKS_PER_NODE" in env
            else "SLURM_TASKS_PER_NODE"
        )
        node_rank = _int(env, "SLURM_NODEID", 0)
        tasks_spec = env.get(tasks_var)
        if tasks_spec:
            per_node = parse_tasks_per_node(tasks_spec)
            if node_rank >= len(per_node):
                raise TopologyError(
                    f"SLURM_NODEID={node_rank} but {tasks_var}={tasks_spec!r} lists "
                    f"{len(per_node)} nodes"
                )
            local_world = per_node[node_rank]
        else:
            local_world = world
        default_port = 10000 + int(job_id) % 20000 if job_id.isdigit() else DEFAULT_PORT
        return Topology(
            launcher="slurm",
            rank=rank,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            world_size=world,
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=_int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", len(hosts))),
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            master_port=_int(env, "MASTER_PORT", default_port),
            run_id=slurm_run_id(env),
        )


class SingleEnvironment(LauncherEnvironment):
    """A plain ``python train.py``: a world of one."""

    name = "single"

    def activated(self) -> bool:
        return True

    def topology(self) -> Topology:
        env = self.env
        return Topology(
            launcher="single",
            rank=0,
            local_rank=0,
            world_size=1,
            local_world_size=1,
            node_rank=0,
            num_nodes=1,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            run_id=slurm_run_id(env),
        )


ENVIRONMENTS: tuple[type[LauncherEnvironment], ...] = (
    TorchrunEnvironment,
    SlurmEnvironment,
    SingleEnvironment,
)


def detect(environ: Mapping[str, str] | None = None) -> Topology:
    """The topology of this process, from the first launcher whose variables are present."""
    env = os.environ if environ is None else environ
    slurm = SlurmEnvironment(env)
    if slurm.in_allocation() and not slurm.in_step() and not TorchrunEnvironment(env).activated():
        log.info(
            "inside Slurm job %s but outside srun (the batch script itself): running as a "
            "single process; start one task per GPU with srun to get a distributed world",
            slurm_job_id(env),
        )
    for cls in ENVIRONMENTS:
        launcher = cls(env)
        if launcher.activated():
            return launcher.topology()
    raise AssertionError("SingleEnvironment is always activated")
