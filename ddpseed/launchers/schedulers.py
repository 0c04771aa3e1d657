"""HPC schedulers' own task launchers: LSF's ``jsrun``, PBS Pro's ``mpiexec`` on HPE Cray
PALS, and Flux."""

from __future__ import annotations

from collections.abc import Sequence

from .base import LauncherEnvironment, Topology, block_node, int_var
from .mpi import MpiEnvironment, hostfile_hosts, lsf_hosts


class JsrunEnvironment(MpiEnvironment):
    """A task started by LSF's ``jsrun`` (IBM Job Step Manager, e.g. Summit).

    ``JSM_NAMESPACE_RANK``, ``_SIZE``, ``_LOCAL_RANK``, ``_LOCAL_SIZE``
    (https://www.ibm.com/docs/en/spectrum-lsf/10.1.0?topic=jsm-jsrun, and Lightning's
    LSFEnvironment: https://lightning.ai/docs/pytorch/stable/api/lightning.pytorch.plugins.environments.LSFEnvironment.html).
    Hosts come from ``LSB_MCPU_HOSTS``/``LSB_HOSTS``
    (https://www.ibm.com/docs/en/spectrum-lsf/10.1.0?topic=variables-environment-set-job-execution);
    their first entry is the launch node, which runs no task when more follow, so rank 0 is on
    the second. The port comes from ``LSB_JOBID`` and the launch's PMIx namespace
    (``PMIX_NAMESPACE``, which jsrun as a PMIx server gives each launch: two jsruns of one job
    running at once get two ports; https://openpmix.github.io/support/faq/rm-provided-information).
    """

    name = "lsf"
    rank_var = "JSM_NAMESPACE_RANK"
    size_var = "JSM_NAMESPACE_SIZE"
    local_rank_vars = ("JSM_NAMESPACE_LOCAL_RANK",)
    local_size_vars = ("JSM_NAMESPACE_LOCAL_SIZE",)
    also_reads = (
        *("LSB_JOBID", "PMIX_NAMESPACE", "LSB_MCPU_HOSTS", "LSB_HOSTS", "MASTER_ADDR"),
        "MASTER_PORT",
    )

    def hosts(self) -> list[str]:
        hosts = lsf_hosts(self.env)
        return hosts[1:] if len(hosts) > 1 else hosts

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return len(hosts) or -(-world // local_world)

    def job(self, local_world: int, world: int) -> str | None:
        return self.env.get("LSB_JOBID")

    def step(self) -> str | None:
        return self.env.get("PMIX_NAMESPACE") or None


class PalsEnvironment(MpiEnvironment):
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
    also_reads = (
        *("PALS_NODEID", "PALS_APID", "PBS_JOBID", "PBS_NODEFILE", "MASTER_ADDR", "MASTER_PORT"),
    )

    def hosts(self) -> list[str]:
        return hostfile_hosts(self.env, "PBS_NODEFILE")

    def num_nodes(self, world: int, local_world: int, hosts: Sequence[str]) -> int:
        return len(hosts) or -(-world // local_world)

    def node_rank(self, rank: int, local_world: int, num_nodes: int) -> int:
        return int_var(self.env, "PALS_NODEID", block_node(rank, local_world, num_nodes))

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
        rank = int_var(env, "FLUX_TASK_RANK")
        world = int_var(env, "FLUX_JOB_SIZE")
        nodes = int_var(env, "FLUX_JOB_NNODES", 1)
        local_rank = int_var(env, "FLUX_TASK_LOCAL_ID", 0)
        local_world = world if nodes == 1 else max(-(-world // nodes), local_rank + 1)
        job = env.get("FLUX_JOB_ID")
        addr, port = self.rendezvous(rank, world, local_world, [], job)
        return Topology(
            launcher="flux",
            rank=rank,
            local_rank=local_rank,
            world_size=world,
            local_world_size=local_world,
            node_rank=block_node(rank, local_world, nodes),
            num_nodes=nodes,
            master_addr=addr,
            master_port=port,
            launch_id=f"flux-{job}" if job else None,
        )
