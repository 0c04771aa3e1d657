"""Slurm: an ``srun`` task, and the job and step ids other launchers read inside an allocation."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import TopologyError
from ..hostlist import expand_hostlist, parse_tasks_per_node
from .base import (
    DEFAULT_PORT,
    LOOPBACK,
    LauncherEnvironment,
    Topology,
    int_var,
    job_port,
    numeric_id,
    safe_name,
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


# Where a Slurm task finds its nodes, most specific first.
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def started_by_srun(env: Mapping[str, str], rank: str, size: str | None) -> bool:
    """Whether the PMI/PMIx ``rank`` (and ``size``) are the Slurm step's own: ``srun
    --mpi=pmi2|pmix`` sets both families for the same task, while an ``mpiexec`` run inside
    a step (its proxies being the step's tasks) gives its ranks other numbers."""
    slurm = SlurmEnvironment(env)
    if not slurm.activated() or env.get("SLURM_PROCID") != rank:
        return False
    tasks = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS"))
    return size is None or tasks is None or tasks == size


class SlurmEnvironment(LauncherEnvironment):
    """A task started by ``srun`` (inside ``sbatch``/``salloc`` or not).

    https://slurm.schedmd.com/srun.html#SECTION_OUTPUT-ENVIRONMENT-VARIABLES
    """

    name = "slurm"
    variables = (
        *("SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID", "SLURM_JOB_ID", "SLURM_JOBID"),
        *("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", *NODELIST_VARIABLES, "SLURM_STEP_TASKS_PER_NODE"),
        *("SLURM_TASKS_PER_NODE", "SLURM_NODEID", "SLURM_LOCALID", "SLURM_STEP_NUM_NODES"),
        *("SLURM_NNODES", "MASTER_ADDR", "MASTER_PORT", "SLURM_RESTART_COUNT"),
    )

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

    def why(self) -> str:
        return (
            f"SLURM_PROCID={self.env.get('SLURM_PROCID')} in step "
            f"{self.env.get('SLURM_STEP_ID', self.env.get('SLURM_STEPID'))}: an srun task"
        )

    def topology(self) -> Topology:
        env = self.env
        job_id = slurm_job_id(env)
        world = int_var(env, "SLURM_STEP_NUM_TASKS", int_var(env, "SLURM_NTASKS", 1))
        rank = int_var(env, "SLURM_PROCID")
        nodes_var = next((v for v in NODELIST_VARIABLES if v in env), None)
        try:
            hosts = expand_hostlist(env[nodes_var], var=nodes_var) if nodes_var else [LOOPBACK]
        except TopologyError as exc:
            raise TopologyError(f"rank {rank}: {exc}") from None
        tasks_var = (
            "SLURM_STEP_TASKS_PER_NODE"
            if "SLURM_STEP_TASKS_PER_NODE" in env
            else "SLURM_TASKS_PER_NODE"
        )
        node_rank = int_var(env, "SLURM_NODEID", 0)
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
        # Job and step: two srun steps of one job running at once on one node (a sweep of
        # `srun ... &`) must not meet at one port.
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
        default_port = job_port(job_id, step) if numeric_id(job_id) else DEFAULT_PORT
        return Topology(
            launcher="slurm",
            rank=rank,
            local_rank=int_var(env, "SLURM_LOCALID", 0),
            world_size=world,
            local_world_size=local_world,
            node_rank=node_rank,
            num_nodes=int_var(
                env, "SLURM_STEP_NUM_NODES", int_var(env, "SLURM_NNODES", len(hosts))
            ),
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            master_port=int_var(env, "MASTER_PORT", default_port),
            run_id=slurm_run_id(env),
            launch_id=slurm_run_id(env),
        )
