"""Cloud training services: a Kubeflow PyTorchJob pod without torchrun, and SageMaker's one
process per host."""

from __future__ import annotations

import json
import logging

from ..errors import TopologyError
from .base import DEFAULT_PORT, LOOPBACK, LauncherEnvironment, Topology, int_var

log = logging.getLogger(__name__)


class KubeflowEnvironment(LauncherEnvironment):
    """A Kubeflow PyTorchJob pod whose command is plain ``python train.py`` (no torchrun).

    The training operator sets ``MASTER_ADDR``/``MASTER_PORT``, ``RANK`` (the pod's index)
    and ``WORLD_SIZE``, plus ``PET_NNODES``, ``PET_NODE_RANK`` (= ``RANK``),
    ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``/``PET_MASTER_PORT`` for torchrun, which reads
    ``PET_*`` as its options (kubeflow/trainer#1840). ``WORLD_SIZE`` counts pods, or pods x
    nprocPerNode since that change (kubeflow/trainer#1790; nprocPerNode defaults to ``auto``,
    counted as 1), so it is not the number of processes here: one process per pod is rank
    ``PET_NODE_RANK`` of ``PET_NNODES``. With nprocPerNode > 1 the pod must run torchrun
    (whose workers are then detected as torchrun).

    The operator never sets ``LOCAL_RANK``/``LOCAL_WORLD_SIZE``, and sets ``RANK`` to the pod's
    index: where either says otherwise a launcher inside the pod (DeepSpeed's, an ``mp.spawn``
    wrapper) exported its own workers' ``RANK``/``WORLD_SIZE``, and the innermost launcher wins
    (the env:// class reads them).

    https://github.com/kubeflow/trainer/pull/1840, https://github.com/kubeflow/trainer/issues/1790,
    pkg/controller.v1/pytorch/envvar.go and pkg/apis/kubeflow.org/v1/pytorch_defaults.go of
    https://github.com/kubeflow/training-operator (release-1.9)
    """

    name = "kubeflow"
    variables = (
        *("PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR"),
        *("PET_MASTER_PORT", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
        *("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    )

    def activated(self) -> bool:
        env = self.env
        pet = any(v in env for v in self.variables[:5])
        return pet and "TORCHELASTIC_RUN_ID" not in env and not self.inner_launcher()

    def inner_launcher(self) -> bool:
        """Whether a launcher in the pod rewrote the operator's ``RANK`` or added local ranks."""
        env = self.env
        rewritten = "RANK" in env and env.get("RANK") != env.get("PET_NODE_RANK", env["RANK"])
        return "LOCAL_RANK" in env or "LOCAL_WORLD_SIZE" in env or rewritten

    def why(self) -> str:
        return (
            "PET_* variables set by a PyTorchJob, and no launcher inside the pod (no "
            "TORCHELASTIC_RUN_ID, LOCAL_RANK, or RANK other than PET_NODE_RANK)"
        )

    def topology(self) -> Topology:
        env = self.env
        nproc = env.get("PET_NPROC_PER_NODE", "1")
        nnodes = env.get("PET_NNODES", "")
        # auto/gpu/cpu are torchrun's own choices; without torchrun the pod runs one process,
        # which the operator counted as such when WORLD_SIZE is the number of pods.
        one_per_pod = nproc == "1" or (
            nproc in ("auto", "gpu", "cpu") and env.get("WORLD_SIZE") == nnodes
        )
        if not one_per_pod or ":" in nnodes:
            world = env.get("WORLD_SIZE")
            raise TopologyError(
                f"pod {env.get('PET_NODE_RANK', '?')}: this PyTorchJob asks for "
                f"PET_NPROC_PER_NODE={nproc} processes per pod"
                f"{f' and PET_NNODES={nnodes}' if nnodes else ''} (WORLD_SIZE={world}), "
                "which torchrun starts, but this process was started without torchrun: make "
                "the container command `torchrun train.py` (torchrun reads the PET_* "
                "variables), or set nprocPerNode: 1 and no elastic policy"
            )
        rank = int_var(env, "PET_NODE_RANK", int_var(env, "RANK", 0))
        pods = int_var(env, "PET_NNODES", int_var(env, "WORLD_SIZE", 1))
        return Topology(
            launcher="kubeflow",
            rank=rank,
            local_rank=0,
            world_size=pods,
            local_world_size=1,
            node_rank=rank,
            num_nodes=pods,
            master_addr=env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR") or LOOPBACK,
            master_port=int_var(env, "MASTER_PORT", int_var(env, "PET_MASTER_PORT", DEFAULT_PORT)),
        )


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
        gpus = int_var(env, "SM_NUM_GPUS", 0)
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
            master_port=int_var(env, "MASTER_PORT", DEFAULT_PORT),
        )
