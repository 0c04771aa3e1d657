"""Where this process sits in the job, read from the launcher's environment.

One small class per launcher (:mod:`ddpseed.launchers`) maps its variables to a
:class:`Topology`; :func:`detect` asks them in order of precedence, ``ENVIRONMENTS``::

    >>> detect({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
    Topology(torchrun rank 1/2 local 1/2 node 0/1 master 127.0.0.1:29500)
    >>> detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
    ...         "OMPI_COMM_WORLD_LOCAL_RANK": "2", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
    ...         "OMPI_MCA_ess_base_jobid": "1143930881"})
    Topology(openmpi rank 2/4 local 2/4 node 0/1 master 127.0.0.1:20881)

Precedence: a launcher started *inside* another sets its own variables on top of the outer
one's, and its own describe the processes that actually run, so the innermost launcher wins:

1. ``kubeflow``: a PyTorchJob pod's process when no launcher runs inside the pod (``PET_*``
   without ``TORCHELASTIC_RUN_ID``, ``LOCAL_RANK`` or a ``RANK`` other than ``PET_NODE_RANK``;
   the pod's ``RANK``/``WORLD_SIZE`` count pods);
2. ``torchrun``: torchrun's workers (inside Slurm, mpirun, a pod, SageMaker) or any launch
   that exports ``RANK``/``WORLD_SIZE`` (DeepSpeed's launcher in a pod, too);
3. the MPI launchers, which may run inside a Slurm, LSF or PBS allocation (Open MPI's mpirun
   starts its daemons with srun, so its ranks also see a Slurm step): ``lsf`` (jsrun, which
   also sets Open MPI's variables), ``openmpi``, ``mvapich``, ``flux``, ``pals`` (which also
   sets ``PMI_*``), then ``mpich`` and ``pmix``, unless their ``PMI_RANK``/``PMIX_RANK`` is
   the enclosing Slurm step's own rank: ``srun --mpi=pmi2|pmix`` sets both families, and the
   task is then Slurm's;
4. ``slurm``: an srun task (the batch script itself is not one);
5. ``sagemaker``: one process per host;
6. ``single``: a world of one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from .errors import TopologyError
from .launchers import (
    FluxEnvironment,
    JsrunEnvironment,
    KubeflowEnvironment,
    LauncherEnvironment,
    MpichEnvironment,
    MvapichEnvironment,
    OpenMpiEnvironment,
    PalsEnvironment,
    PmixEnvironment,
    SageMakerEnvironment,
    SingleEnvironment,
    SlurmEnvironment,
    Topology,
    TorchrunEnvironment,
    slurm_job_id,
)

# The launcher classes and helpers themselves are ddpseed.launchers'; Topology is re-exported
# because every module that places a rank imports it from here.
__all__ = ["ENVIRONMENTS", "LAUNCHER_VARIABLES", "Topology", "choose", "detect", "outranked"]

log = logging.getLogger(__name__)

ENVIRONMENTS: tuple[type[LauncherEnvironment], ...] = (
    KubeflowEnvironment,
    TorchrunEnvironment,
    JsrunEnvironment,
    OpenMpiEnvironment,
    MvapichEnvironment,
    FluxEnvironment,
    PalsEnvironment,
    MpichEnvironment,
    PmixEnvironment,
    SlurmEnvironment,
    SageMakerEnvironment,
    SingleEnvironment,
)

# Every launcher variable ddpseed reads: what tests and the bench remove from the environment
# of processes that must not believe a launcher started them.
LAUNCHER_VARIABLES: frozenset[str] = frozenset(
    name for cls in ENVIRONMENTS for name in cls.variables
)


def choose(environ: Mapping[str, str] | None = None) -> LauncherEnvironment:
    """The launcher whose variables describe this process: the first of ``ENVIRONMENTS``
    that applies."""
    env = os.environ if environ is None else environ
    for cls in ENVIRONMENTS:
        launcher = cls(env)
        if launcher.activated():
            return launcher
    raise AssertionError("SingleEnvironment is always activated")


def outranked(environ: Mapping[str, str] | None = None) -> list[LauncherEnvironment]:
    """The launchers that also apply but lose to :func:`choose`'s (an outer launcher)."""
    env = os.environ if environ is None else environ
    found = [cls(env) for cls in ENVIRONMENTS[:-1]]
    return [launcher for launcher in found if launcher.activated()][1:]


def detect(environ: Mapping[str, str] | None = None) -> Topology:
    """The topology of this process, from the first launcher whose variables are present."""
    env = os.environ if environ is None else environ
    slurm = SlurmEnvironment(env)
    launcher = choose(env)
    if slurm.in_allocation() and not slurm.in_step() and isinstance(launcher, SingleEnvironment):
        log.info(
            "inside Slurm job %s but outside srun (the batch script itself): running as a "
            "single process; start one task per GPU with srun to get a distributed world",
            slurm_job_id(env),
        )
    topo = launcher.topology()
    if topo.world_size == 1:
        _warn_if_outer_world(env, launcher)
    return topo


def _warn_if_outer_world(env: Mapping[str, str], launcher: LauncherEnvironment) -> None:
    """Say so when the winning launcher makes a world of one inside an outer launch of
    several: stale ``RANK=0 WORLD_SIZE=1`` under mpirun would make every process rank 0 with
    the whole dataset. (Not an error: srun tasks that each run a one-process job are fine.)"""
    for outer in outranked(env):
        try:
            other = outer.topology()
        except TopologyError:
            continue
        if other.world_size > 1:
            log.warning(
                "%s's variables (%s) make this process a world of one, but %s's say rank %d of "
                "%d: every such process gets rank 0's seeds and the whole dataset. If they are "
                "one job, unset the stale variables",
                launcher.name,
                launcher.why(),
                other.launcher,
                other.rank,
                other.world_size,
            )
            return
