"""MPI launchers: Open MPI, MVAPICH2, MPICH/Intel MPI Hydra (PMI), PMIx; and the host lists of
the batch allocation they run in (the first host of an MPI launch runs rank 0)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..errors import TopologyError
from ..hostlist import expand_hostlist
from .base import (
    LauncherEnvironment,
    Topology,
    ancestor_pid,
    block_node,
    first_set,
    int_var,
)
from .slurm import slurm_job_id, slurm_run_id, started_by_srun


def hostfile_hosts(env: Mapping[str, str], var: str) -> list[str]:
    """Distinct hosts, in order, of the file ``env[var]`` names (one host per line or per slot,
    optionally followed by a count)."""
    path = env.get(var)
    if not path:
        return []
    try:
        lines = Path(path).read_text().split("\n")
    except OSError as exc:
        raise TopologyError(f"{var}={path!r} cannot be read: {exc.strerror}") from None
    words = (line.split()[0] for line in lines if line.split())
    return list(dict.fromkeys(words))


def lsf_hosts(env: Mapping[str, str]) -> list[str]:
    """The hosts of an LSF job, in order: ``LSB_MCPU_HOSTS`` ("host slots host slots ...",
    https://www.ibm.com/docs/en/spectrum-lsf/10.1.0?topic=variables-lsb-mcpu-hosts), else
    ``LSB_HOSTS`` (one name per slot).

    >>> lsf_hosts({"LSB_MCPU_HOSTS": "batch1 1 a01 42 a02 42"})
    ['batch1', 'a01', 'a02']
    """
    words = env.get("LSB_MCPU_HOSTS", "").split()[::2] or env.get("LSB_HOSTS", "").split()
    return list(dict.fromkeys(words))


# The job's nodes first: Open MPI's mpirun inside sbatch starts its remote daemons with `srun
# --nodelist=<the other nodes>`, so ranks there see a step nodelist without mpirun's own node
# (where rank 0 runs), while rank 0 sees the batch script's environment.
MPI_NODELIST_VARIABLES = ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NODELIST")


def allocation_hosts(env: Mapping[str, str]) -> list[str]:
    """The hosts of the batch allocation an MPI launcher runs in (Slurm, LSF, PBS), else []:
    the same list on every rank, wherever its daemon was started."""
    var = first_set(env, MPI_NODELIST_VARIABLES)
    if var and slurm_job_id(env):
        return expand_hostlist(env[var], var=var)
    if "LSB_JOBID" in env:
        return lsf_hosts(env)
    return hostfile_hosts(env, "PBS_NODEFILE")


def allocation_job(env: Mapping[str, str]) -> str | None:
    """The batch job (Slurm: job and step) an MPI launch runs in: its port's fallback key."""
    return slurm_run_id(env) or env.get("LSB_JOBID") or env.get("PBS_JOBID")


ALLOCATION_VARIABLES = (
    *("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID"),
    *("SLURM_JOBID", "SLURM_STEP_ID", "SLURM_STEPID", "LSB_JOBID", "LSB_MCPU_HOSTS"),
    *("LSB_HOSTS", "PBS_NODEFILE", "PBS_JOBID"),
)


class MpiEnvironment(LauncherEnvironment):
    """An MPI launcher that names rank, size, local rank and local size in four variables."""

    rank_var: ClassVar[str]
    size_var: ClassVar[str]
    local_rank_vars: ClassVar[tuple[str, ...]]
    local_size_vars: ClassVar[tuple[str, ...]]
    also_reads: ClassVar[tuple[str, ...]] = ()  # job id, hosts, node count, MASTER_*

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The four topology variables are named once, above; ``variables`` (what
        # LAUNCHER_VARIABLES collects, rank/size/local rank first for ``why``) follows them.
        cls.variables = (
            cls.rank_var,
            cls.size_var,
            *cls.local_rank_vars,
            *cls.local_size_vars,
            *cls.also_reads,
        )

    def activated(self) -> bool:
        return self.rank_var in self.env

    def why(self) -> str:
        return f"{self.rank_var}={self.env[self.rank_var]} is set"

    def job(self, local_world: int, world: int) -> str | None:
        """The launch's own job id, the same on every rank (None where it names none)."""
        raise NotImplementedError

    def step(self) -> str | None:
        """What tells apart launches of one job (LSF: jsrun's PMIx namespace), else None."""
        return None

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return -(-world // local_world)

    def hosts(self) -> list[str]:
        return allocation_hosts(self.env)

    def topology(self) -> Topology:
        env = self.env
        rank = int_var(env, self.rank_var)
        world = int_var(env, self.size_var)
        local_rank_var = first_set(env, self.local_rank_vars)
        local_size_var = first_set(env, self.local_size_vars)
        if world > 1 and not (local_rank_var and local_size_var):
            raise TopologyError(
                f"rank {rank}: {self.name} set {self.rank_var} and {self.size_var} but not the "
                f"local rank and size ({' or '.join(self.local_rank_vars)}); export "
                "LOCAL_RANK and LOCAL_WORLD_SIZE, RANK and WORLD_SIZE instead"
            )
        local_rank = int_var(env, local_rank_var, 0) if local_rank_var else 0
        local_world = int_var(env, local_size_var, 1) if local_size_var else 1
        hosts = [] if local_world == world else self.hosts()
        num_nodes = max(self.num_nodes(world, local_world, hosts), 1)
        own, step = self.job(local_world, world), self.step()
        addr, port = self.rendezvous(
            rank, world, local_world, hosts, own or allocation_job(env), step if own else None
        )
        # Only the launcher's own id names the launch alike on every rank: the Slurm step a
        # rank sees differs between mpirun's node and the nodes of its daemons.
        launch = f"{self.name}-{own}{f'.{step}' if step else ''}" if own else None
        return Topology(
            launcher=self.name,
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            node_rank=self.node_rank(rank, local_world, num_nodes),
            num_nodes=num_nodes,
            master_addr=addr,
            master_port=port,
            run_id=slurm_run_id(env),
            launch_id=launch,
        )

    def node_rank(self, rank: int, local_world: int, num_nodes: int) -> int:
        return block_node(rank, local_world, num_nodes)


class OpenMpiEnvironment(MpiEnvironment):
    """A process started by Open MPI's ``mpirun``/``mpiexec`` (also inside Slurm, LSF, PBS).

    Reads ``OMPI_COMM_WORLD_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``
    (https://docs.open-mpi.org/en/v5.0.x/tuning-apps/environment-var.html); the job id for
    the port is ``OMPI_MCA_ess_base_jobid`` (Open MPI 4) or ``PMIX_NAMESPACE`` (Open MPI 5),
    the node count ``OMPI_MCA_orte_num_nodes`` where set (Open MPI 4.1, as seen from Debian's
    ``mpirun``). Across nodes rank 0 runs on the allocation's first host (mpirun's default
    mapping), which Slurm, LSF and PBS name; outside one, export ``MASTER_ADDR``.
    """

    name = "openmpi"
    rank_var = "OMPI_COMM_WORLD_RANK"
    size_var = "OMPI_COMM_WORLD_SIZE"
    local_rank_vars = ("OMPI_COMM_WORLD_LOCAL_RANK",)
    local_size_vars = ("OMPI_COMM_WORLD_LOCAL_SIZE",)
    also_reads = (
        *("OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_num_nodes", "PMIX_NAMESPACE"),
        *("MASTER_ADDR", "MASTER_PORT", *ALLOCATION_VARIABLES),
    )

    def job(self, local_world: int, world: int) -> str | None:
        return self.env.get("OMPI_MCA_ess_base_jobid") or self.env.get("PMIX_NAMESPACE")

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return int_var(self.env, "OMPI_MCA_orte_num_nodes", -(-world // local_world))


class MvapichEnvironment(MpiEnvironment):
    """A process started by MVAPICH2's ``mpirun_rsh``: ``MV2_COMM_WORLD_RANK``, ``_SIZE``,
    ``_LOCAL_RANK``, ``_LOCAL_SIZE``
    (https://mvapich.cse.ohio-state.edu/static/media/mvapich/mvapich2-userguide.html,
    "MPIRUN_RSH Parameters"). ``mpirun_rsh`` names no job id, so the port is derived from the
    node's ``mpispawn`` process (one node), or must be exported (several).
    """

    name = "mvapich"
    rank_var = "MV2_COMM_WORLD_RANK"
    size_var = "MV2_COMM_WORLD_SIZE"
    local_rank_vars = ("MV2_COMM_WORLD_LOCAL_RANK",)
    local_size_vars = ("MV2_COMM_WORLD_LOCAL_SIZE",)
    also_reads = ("MASTER_ADDR", "MASTER_PORT", *ALLOCATION_VARIABLES)

    def job(self, local_world: int, world: int) -> str | None:
        pid = ancestor_pid(("mpispawn",)) if local_world == world else None
        return f"mpispawn-{pid}" if pid else None


class MpichEnvironment(MpiEnvironment):
    """A process started by a PMI-1/PMI-2 process manager: MPICH's and Intel MPI's Hydra
    ``mpiexec`` (``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``, as
    Debian's MPICH 4.0 sets them), or Cray PMI (``PMI_LOCAL_RANK``, ``PMI_LOCAL_SIZE``).

    https://www.mpich.org/static/docs/latest/www1/mpiexec.html,
    https://www.intel.com/content/www/us/en/docs/mpi-library/developer-reference-linux/2021-15/mpiexec-hydra.html.
    Hydra names no job id: on one node the port is derived from the node's
    ``hydra_pmi_proxy`` (the parent of every local rank); across nodes export ``MASTER_PORT``.
    ``srun --mpi=pmi2`` also sets ``PMI_RANK``/``PMI_SIZE``: where they equal the Slurm step's
    rank and size, the task is Slurm's (see :mod:`ddpseed.topology`).
    """

    name = "mpich"
    rank_var = "PMI_RANK"
    size_var = "PMI_SIZE"
    local_rank_vars = ("MPI_LOCALRANKID", "PMI_LOCAL_RANK")
    local_size_vars = ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")
    also_reads = ("MASTER_ADDR", "MASTER_PORT", *ALLOCATION_VARIABLES)

    def activated(self) -> bool:
        env = self.env
        if "PMI_RANK" not in env or "PMI_SIZE" not in env:
            return False
        return not started_by_srun(env, env["PMI_RANK"], env["PMI_SIZE"])

    def job(self, local_world: int, world: int) -> str | None:
        pid = ancestor_pid(("hydra_pmi_proxy", "pmi_proxy")) if local_world == world else None
        return f"hydra-{pid}" if pid else None


class PmixEnvironment(LauncherEnvironment):
    """A process of a PMIx launch that no other class claims: ``PMIX_RANK`` and
    ``PMIX_NAMESPACE`` (https://docs.openpmix.org/en/latest/ — the PMIx client reads them).

    PMIx hands out the world size only through its API, not the environment, so this class
    raises a :class:`TopologyError` saying so rather than running as a world of one. Open MPI's
    ``mpirun``, ``srun --mpi=pmix``, ``jsrun`` and ``flux run`` set PMIx variables as well as
    their own, and are detected as those launchers.
    """

    name = "pmix"
    variables = ("PMIX_RANK", "PMIX_NAMESPACE")

    def activated(self) -> bool:
        rank = self.env.get("PMIX_RANK")
        return rank is not None and not started_by_srun(self.env, rank, None)

    def topology(self) -> Topology:
        raise TopologyError(
            f"PMIx launch (PMIX_RANK={self.env.get('PMIX_RANK')}, PMIX_NAMESPACE="
            f"{self.env.get('PMIX_NAMESPACE')}) with no variables naming the world size; "
            "launch with mpirun, srun, jsrun or flux run, or export RANK, WORLD_SIZE, "
            "LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
