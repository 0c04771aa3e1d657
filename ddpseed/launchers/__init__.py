"""One class per launcher: its documented variables mapped to a :class:`Topology`.

Every class reads only the environment it is given (and, for PBS and LSF, the host file a
variable names), declares the variables it reads in ``variables``, and says in ``why()`` which
of them made it apply. Which class wins when several apply is decided in
:mod:`ddpseed.topology` (``ENVIRONMENTS``, ``detect``, ``LAUNCHER_VARIABLES``).

Rendezvous (:meth:`LauncherEnvironment.rendezvous`): ``MASTER_ADDR``/``MASTER_PORT`` when
exported; else loopback when every rank is on this node, or the first host of the allocation
where the launcher names one; the port is derived from the launch's job id, so two jobs sharing
a node do not collide. Without either, every rank raises the same :class:`TopologyError`.

Modules: :mod:`.base` (the shared class, :class:`Topology`, the port rule), :mod:`.torchrun`
(torchrun and a plain process), :mod:`.slurm`, :mod:`.mpi` (Open MPI, MVAPICH, MPICH/PMI,
PMIx, and the allocation's host lists), :mod:`.schedulers` (LSF jsrun, PBS/PALS, Flux),
:mod:`.cloud` (Kubeflow, SageMaker).
"""

from .base import (
    DEFAULT_PORT,
    LOOPBACK,
    Launcher,
    LauncherEnvironment,
    Topology,
    job_port,
    safe_name,
)
from .cloud import KubeflowEnvironment, SageMakerEnvironment
from .mpi import (
    ALLOCATION_VARIABLES,
    MpichEnvironment,
    MpiEnvironment,
    MvapichEnvironment,
    OpenMpiEnvironment,
    PmixEnvironment,
    allocation_hosts,
    allocation_job,
    lsf_hosts,
)
from .schedulers import FluxEnvironment, JsrunEnvironment, PalsEnvironment
from .slurm import SlurmEnvironment, slurm_job_id, slurm_run_id, started_by_srun
from .torchrun import (
    SingleEnvironment,
    TorchrunEnvironment,
    names_torchrun_launch,
    torchrun_run_id,
)

__all__ = [
    "ALLOCATION_VARIABLES",
    "DEFAULT_PORT",
    "LOOPBACK",
    "FluxEnvironment",
    "JsrunEnvironment",
    "KubeflowEnvironment",
    "Launcher",
    "LauncherEnvironment",
    "MpiEnvironment",
    "MpichEnvironment",
    "MvapichEnvironment",
    "OpenMpiEnvironment",
    "PalsEnvironment",
    "PmixEnvironment",
    "SageMakerEnvironment",
    "SingleEnvironment",
    "SlurmEnvironment",
    "Topology",
    "TorchrunEnvironment",
    "allocation_hosts",
    "allocation_job",
    "job_port",
    "lsf_hosts",
    "names_torchrun_launch",
    "safe_name",
    "slurm_job_id",
    "slurm_run_id",
    "started_by_srun",
    "torchrun_run_id",
]
