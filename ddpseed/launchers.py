"""One class per launcher: its documented variables mapped to a :class:`Topology`.

Every class reads only the environment it is given (and, for PBS and LSF, the host file a
variable names), declares the variables it reads in ``variables``, and says in ``why()`` which
of them made it apply. Which class wins when several apply is decided in
:mod:`ddpseed.topology` (``ENVIRONMENTS``, ``detect``).

Rendezvous (:meth:`LauncherEnvironment.rendezvous`): ``MASTER_ADDR``/``MASTER_PORT`` when
exported; else loopback when every rank is on this node, or the first host of the allocation
where the launcher names one; the port is derived from the launch's job id, so two jobs sharing
a node do not collide. Without either, every rank raises the same :class:`TopologyError`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from .errors import TopologyError
from .hostlist import expand_hostlist, parse_tasks_per_node

log = logging.getLogger(__name__)

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


def _first(env: Mapping[str, str], names: Sequence[str]) -> str | None:
    """The first of ``names`` set (non-empty) in ``env``."""
    return next((n for n in names if env.get(n)), None)


def job_port(job_id: str) -> int:
    """The rendezvous port of a launch: ``10000 + id % 20000`` (a numeric id, as for Slurm),
    else derived from the id's CRC-32, so every rank of one launch computes the same port.

    >>> job_port("17"), job_port("1143930881"), job_port("fABC") == job_port("fABC")
    (10017, 20881, True)
    """
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 10000 + key % 20000


def _guess_node(rank: int, local_world: int, num_nodes: int) -> int:
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
        self, rank: int, world: int, local_world: int, hosts: Sequence[str], job: str | None
    ) -> tuple[str, int]:
        """``(MASTER_ADDR, MASTER_PORT)``: exported, else loopback when every rank is local,
        else ``hosts[0]``; the port from ``job``. Raises the same error on every rank."""
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
            return addr, _int(env, "MASTER_PORT")
        if not job:
            raise TopologyError(
                f"rank {rank}: {self.name} gives this launch no job id to derive a rendezvous "
                f"port from; {fix}"
            )
        return addr, job_port(job)


# -- torchrun and Kubeflow ------------------------------------------------------------------------


class TorchrunEnvironment(LauncherEnvironment):
    """``torchrun`` / ``torch.distributed.run``, or any env:// launch that sets ``RANK``.

    https://pytorch.org/docs/stable/elastic/run.html#environment-variables
    """

    name = "torchrun"
    variables = (
        *("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        *("GROUP_RANK", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
        # set by torchrun, read by ddpseed.rundir / ddpseed.coordinator
        *("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"),
    )

    def activated(self) -> bool:
        return "RANK" in self.env or "TORCHELASTIC_RUN_ID" in self.env

    def why(self) -> str:
        if "TORCHELASTIC_RUN_ID" in self.env:
            return "TORCHELASTIC_RUN_ID is set: a torchrun worker"
        return f"RANK={self.env.get('RANK')} is set: an env:// launch"

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
            master_addr=env.get("MASTER_ADDR", LOOPBACK),
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            run_id=slurm_run_id(env) or torchrun_run_id(rdzv_id),
        )


class KubeflowEnvironment(LauncherEnvironment):
    """A Kubeflow PyTorchJob pod whose command is plain ``python train.py`` (no torchrun).

    The training operator sets ``MASTER_ADDR``/``MASTER_PORT``, ``RANK`` (the pod's index)
    and ``WORLD_SIZE``, plus ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``,
    ``PET_MASTER_ADDR``/``PET_MASTER_PORT`` for torchrun, which reads ``PET_*`` as its options
    (kubeflow/trainer#1840). ``WORLD_SIZE`` counts pods, or pods x nprocPerNode since that
    change (kubeflow/trainer#1790), so it is not the number of processes here: one process per
    pod is rank ``PET_NODE_RANK`` of ``PET_NNODES``. With nprocPerNode > 1 the pod must run
    torchrun (whose workers are then detected as torchrun).

    https://github.com/kubeflow/trainer/pull/1840, https://github.com/kubeflow/trainer/issues/1790
    """

    name = "kubeflow"
    variables = (
        *("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR"),
        *("PET_MASTER_PORT", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
        "TORCHELASTIC_RUN_ID",
    )

    def activated(self) -> bool:
        pet = any(v in self.env for v in self.variables[:5])
        return pet and "TORCHELASTIC_RUN_ID" not in self.env

    def why(self) -> str:
        return "PET_* variables set by a PyTorchJob, and no torchrun (TORCHELASTIC_RUN_ID)"

    def topology(self) -> Topology:
        env = self.env
        nproc = env.get("PET_NPROC_PER_NODE", "1")
        nnodes = env.get("PET_NNODES", "")
        if nproc != "1" or ":" in nnodes:
            raise TopologyError(
                f"this PyTorchJob asks for PET_NPROC_PER_NODE={nproc} processes per pod"
                f"{f' and PET_NNODES={nnodes}' if nnodes else ''}, which torchrun starts, but "
                "this process was started without torchrun: make the container command "
                "`torchrun train.py` (torchrun reads the PET_* variables), or set "
                "nprocPerNode: 1 and no elastic policy"
            )
        rank = _int(env, "PET_NODE_RANK", _int(env, "RANK", 0))
        pods = _int(env, "PET_NNODES", _int(env, "WORLD_SIZE", 1))
        return Topology(
            launcher="kubeflow",
            rank=rank,
            local_rank=0,
            world_size=pods,
            local_world_size=1,
            node_rank=rank,
            num_nodes=pods,
            master_addr=env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR") or LOOPBACK,
            master_port=_int(env, "MASTER_PORT", _int(env, "PET_MASTER_PORT", DEFAULT_PORT)),
        )


# -- batch systems' host lists (the first host of an MPI launch runs rank 0) ---------------------


def _read_hostfile(env: Mapping[str, str], var: str) -> list[str]:
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


def allocation_hosts(env: Mapping[str, str]) -> list[str]:
    """The hosts of the batch allocation an MPI launcher runs in (Slurm, LSF, PBS), else []."""
    var = _first(env, _NODELIST_VARS)
    if var and slurm_job_id(env):
        return expand_hostlist(env[var], var=var)
    if "LSB_JOBID" in env:
        return lsf_hosts(env)
    return _read_hostfile(env, "PBS_NODEFILE")


def allocation_job(env: Mapping[str, str]) -> str | None:
    """The batch job (Slurm: job and step) an MPI launch runs in: its port's fallback key."""
    return slurm_run_id(env) or env.get("LSB_JOBID") or env.get("PBS_JOBID")


ALLOCATION_VARIABLES = (
    *("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_JOB_ID"),
    *("SLURM_JOBID", "SLURM_STEP_ID", "SLURM_STEPID", "LSB_JOBID", "LSB_MCPU_HOSTS"),
    *("LSB_HOSTS", "PBS_NODEFILE", "PBS_JOBID"),
)


class _MpiEnvironment(LauncherEnvironment):
    """An MPI launcher that names rank, size, local rank and local size in four variables."""

    rank_var: ClassVar[str]
    size_var: ClassVar[str]
    local_rank_vars: ClassVar[tuple[str, ...]]
    local_size_vars: ClassVar[tuple[str, ...]]

    def activated(self) -> bool:
        return self.rank_var in self.env

    def why(self) -> str:
        return f"{self.rank_var}={self.env[self.rank_var]} is set"

    def job(self, local_world: int, world: int) -> str | None:
        raise NotImplementedError

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return -(-world // local_world)

    def hosts(self) -> list[str]:
        return allocation_hosts(self.env)

    def topology(self) -> Topology:
        env = self.env
        rank = _int(env, self.rank_var)
        world = _int(env, self.size_var)
        local_rank_var = _first(env, self.local_rank_vars)
        local_size_var = _first(env, self.local_size_vars)
        if world > 1 and not (local_rank_var and local_size_var):
            raise TopologyError(
                f"rank {rank}: {self.name} set {self.rank_var} and {self.size_var} but not the "
                f"local rank and size ({' or '.join(self.local_rank_vars)}); export "
                "LOCAL_RANK and LOCAL_WORLD_SIZE, RANK and WORLD_SIZE instead"
            )
        local_rank = _int(env, local_rank_var, 0) if local_rank_var else 0
        local_world = _int(env, local_size_var, 1) if local_size_var else 1
        hosts = [] if local_world == world else self.hosts()
        num_nodes = max(self.num_nodes(world, local_world, hosts), 1)
        job = self.job(local_world, world) or allocation_job(env)
        addr, port = self.rendezvous(rank, world, local_world, hosts, job)
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
        )

    def node_rank(self, rank: int, local_world: int, num_nodes: int) -> int:
        return _guess_node(rank, local_world, num_nodes)


class OpenMpiEnvironment(_MpiEnvironment):
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
    variables = (
        *("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
        *("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_num_nodes"),
        *("PMIX_NAMESPACE", "MASTER_ADDR", "MASTER_PORT", *ALLOCATION_VARIABLES),
    )

    def job(self, local_world: int, world: int) -> str | None:
        return self.env.get("OMPI_MCA_ess_base_jobid") or self.env.get("PMIX_NAMESPACE")

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return _int(self.env, "OMPI_MCA_orte_num_nodes", -(-world // local_world))


class MvapichEnvironment(_MpiEnvironment):
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
    variables = (
        *("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
        *("MV2_COMM_WORLD_LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", *ALLOCATION_VARIABLES),
    )

    def job(self, local_world: int, world: int) -> str | None:
        pid = ancestor_pid(("mpispawn",)) if local_world == world else None
        return f"mpispawn-{pid}" if pid else None


class MpichEnvironment(_MpiEnvironment):
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
    variables = (
        *("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "MPI_LOCALNRANKS"),
        *("PMI_LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", *ALLOCATION_VARIABLES),
    )

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


# -- LSF, PBS/PALS, Flux ------------------------------------------------------------------------


class JsrunEnvironment(_MpiEnvironment):
    """A task started by LSF's ``jsrun`` (IBM Job Step Manager, e.g. Summit).

    ``JSM_NAMESPACE_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``
    (https://www.ibm.com/docs/en/spectrum-lsf/10.1.0?topic=jsm-jsrun, and Lightning's
    LSFEnvironment: https://lightning.ai/docs/pytorch/stable/api/lightning.pytorch.plugins.environments.LSFEnvironment.html).
    Hosts come from ``LSB_MCPU_HOSTS``/``LSB_HOSTS``
    (https://www.ibm.com/docs/en/spectrum-lsf/10.1.0?topic=variables-environment-set-job-execution);
    their first entry is the launch node, which runs no task when more follow, so rank 0 is on
    the second. The port comes from ``LSB_JOBID``.
    """

    name = "lsf"
    rank_var = "JSM_NAMESPACE_RANK"
    size_var = "JSM_NAMESPACE_SIZE"
    local_rank_vars = ("JSM_NAMESPACE_LOCAL_RANK",)
    local_size_vars = ("JSM_NAMESPACE_LOCAL_SIZE",)
    variables = (
        *("JSM_NAMESPACE_RANK", "JSM_NAMESPACE_SIZE", "JSM_NAMESPACE_LOCAL_RANK"),
        *("JSM_NAMESPACE_LOCAL_SIZE", "LSB_JOBID", "LSB_MCPU_HOSTS", "LSB_HOSTS"),
        *("MASTER_ADDR", "MASTER_PORT"),
    )

    def hosts(self) -> list[str]:
        hosts = lsf_hosts(self.env)
        return hosts[1:] if len(hosts) > 1 else hosts

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return len(hosts) or -(-world // local_world)

    def job(self, local_world: int, world: int) -> str | None:
        return self.env.get("LSB_JOBID")


class PalsEnvironment(_MpiEnvironment):
    """A rank started by PBS Pro's ``mpiexec`` on HPE Cray PALS (e.g. ALCF Polaris, Aurora).

    ``PALS_RANKID``, ``PALS_LOCAL_RANKID``, ``PALS_NODEID`` and the Cray PMI sizes
    ``PMI_SIZE``, ``PALS_LOCAL_SIZE``/``PMI_LOCAL_SIZE``
    (https://docs.alcf.anl.gov/polaris/running-jobs/, https://docs.open-mpi.org/en/v6.0.x-pre-release/launching-apps/pals.html).
    Hosts are the lines of ``PBS_NODEFILE``
    (https://www.altair.com/pdfs/pbsworks/PBSUserGuide2022.1.pdf, "PBS_NODEFILE"); the port
    comes from ``PALS_APID`` (one per mpiexec), else ``PBS_JOBID``.
    """

    name = "pals"
    rank_var = "PALS_RANKID"
    size_var = "PMI_SIZE"
    local_rank_vars = ("PALS_LOCAL_RANKID", "PMI_LOCAL_RANK")
    local_size_vars = ("PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE")
    variables = (
        *("PALS_RANKID", "PMI_SIZE", "PALS_LOCAL_RANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_SIZE"),
        *("PMI_LOCAL_SIZE", "PALS_NODEID", "PALS_APID", "PBS_JOBID", "PBS_NODEFILE"),
        *("MASTER_ADDR", "MASTER_PORT"),
    )

    def hosts(self) -> list[str]:
        return _read_hostfile(self.env, "PBS_NODEFILE")

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return len(hosts) or -(-world // local_world)

    def node_rank(self, rank: int, local_world: int, num_nodes: int) -> int:
        return _int(self.env, "PALS_NODEID", _guess_node(rank, local_world, num_nodes))

    def job(self, local_world: int, world: int) -> str | None:
        return self.env.get("PALS_APID") or self.env.get("PBS_JOBID")


class FluxEnvironment(LauncherEnvironment):
    """A task of a Flux job (``flux run``/``flux submit``): ``FLUX_TASK_RANK``,
    ``FLUX_TASK_LOCAL_ID``, ``FLUX_JOB_SIZE``, ``FLUX_JOB_NNODES``, ``FLUX_JOB_ID``
    (https://flux-framework.readthedocs.io/projects/flux-core/en/latest/man7/flux-environment.html).

    Flux names neither the tasks per node nor the hosts in the environment: on one node every
    task is local and rank 0 is on loopback; across nodes tasks are taken to be spread evenly
    (``ceil(size / nnodes)`` per node) and ``MASTER_ADDR`` must be exported.
    """

    name = "flux"
    variables = (
        *("FLUX_TASK_RANK", "FLUX_TASK_LOCAL_ID", "FLUX_JOB_SIZE", "FLUX_JOB_NNODES"),
        *("FLUX_JOB_ID", "MASTER_ADDR", "MASTER_PORT"),
    )

    def activated(self) -> bool:
        return "FLUX_TASK_RANK" in self.env

    def topology(self) -> Topology:
        env = self.env
        rank = _int(env, "FLUX_TASK_RANK")
        world = _int(env, "FLUX_JOB_SIZE")
        nodes = _int(env, "FLUX_JOB_NNODES", 1)
        local_rank = _int(env, "FLUX_TASK_LOCAL_ID", 0)
        local_world = world if nodes == 1 else max(-(-world // nodes), local_rank + 1)
        addr, port = self.rendezvous(rank, world, local_world, [], env.get("FLUX_JOB_ID"))
        return Topology(
            launcher="flux",
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            node_rank=_guess_node(rank, local_world, nodes),
            num_nodes=nodes,
            master_addr=addr,
            master_port=port,
        )


# -- Slurm ----------------------------------------------------------------------------------


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
        *("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", *_NODELIST_VARS, "SLURM_STEP_TASKS_PER_NODE"),
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
        world = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        rank = _int(env, "SLURM_PROCID")
        nodes_var = next((v for v in _NODELIST_VARS if v in env), None)
        try:
            hosts = expand_hostlist(env[nodes_var], var=nodes_var) if nodes_var else [LOOPBACK]
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
        default_port = job_port(job_id) if job_id.isdigit() else DEFAULT_PORT
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


# -- SageMaker and a plain process ------------------------------------------------------------


class SageMakerEnvironment(LauncherEnvironment):
    """A SageMaker training container running the entry point once per host.

    ``SM_HOSTS`` (a JSON list), ``SM_CURRENT_HOST``, ``SM_NUM_GPUS``
    (https://github.com/aws/sagemaker-training-toolkit/blob/master/ENVIRONMENT_VARIABLES.md):
    one process per host, rank = this host's index in ``SM_HOSTS``, rank 0 on its first host.
    For one process per GPU run torchrun in the entry point (or the estimator's
    ``torch_distributed``/``pytorchddp`` distribution, which start torchrun or mpirun: those
    are detected first).
    """

    name = "sagemaker"
    variables = ("SM_HOSTS", "SM_CURRENT_HOST", "SM_NUM_GPUS", "MASTER_ADDR", "MASTER_PORT")

    def activated(self) -> bool:
        return "SM_HOSTS" in self.env and "SM_CURRENT_HOST" in self.env

    def why(self) -> str:
        return f"SM_CURRENT_HOST={self.env.get('SM_CURRENT_HOST')} in SM_HOSTS"

    def topology(self) -> Topology:
        env = self.env
        try:
            hosts = json.loads(env["SM_HOSTS"])
            assert isinstance(hosts, list) and hosts and all(isinstance(h, str) for h in hosts)
        except (ValueError, AssertionError):
            raise TopologyError(
                f"SM_HOSTS={env['SM_HOSTS']!r} is not a JSON list of host names"
            ) from None
        current = env["SM_CURRENT_HOST"]
        if current not in hosts:
            raise TopologyError(f"SM_CURRENT_HOST={current!r} is not in SM_HOSTS={hosts}")
        rank = hosts.index(current)
        gpus = _int(env, "SM_NUM_GPUS", 0)
        if gpus > 1:
            log.info(
                "SageMaker host %s has %d GPUs and runs one process; use torchrun "
                "--nproc-per-node=%d in the entry point for one rank per GPU",
                current,
                gpus,
                gpus,
            )
        return Topology(
            launcher="sagemaker",
            rank=rank,
            local_rank=0,
            world_size=len(hosts),
            local_world_size=1,
            node_rank=rank,
            num_nodes=len(hosts),
            master_addr=env.get("MASTER_ADDR") or hosts[0],
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
        )


class SingleEnvironment(LauncherEnvironment):
    """A plain ``python train.py``: a world of one."""

    name = "single"
    variables = (
        *("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID"),
        "SLURM_STEPID",
    )

    def activated(self) -> bool:
        return True

    def why(self) -> str:
        return "no launcher variables are set: one process"

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
            master_addr=env.get("MASTER_ADDR", LOOPBACK),
            master_port=_int(env, "MASTER_PORT", DEFAULT_PORT),
            run_id=slurm_run_id(env),
        )


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
