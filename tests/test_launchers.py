"""Every launcher's documented environment gives the right Topology; precedence; the one list.

Each environment below is what the cited documentation (or, where marked, a real run on this
machine) says the launcher sets for one process. Real launches of Open MPI and MPICH are in
tests/test_mpi.py; Slurm's in tests/test_slurm.py.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from ddpseed.errors import TopologyError
from ddpseed.launchers import job_port
from ddpseed.launchers import mpi as mpi_launchers
from ddpseed.topology import ENVIRONMENTS, LAUNCHER_VARIABLES, choose, detect, outranked
from helpers.procs import clean_env


def summary(env: Mapping[str, str]) -> tuple[object, ...]:
    t = detect(env)
    return (t.launcher, t.rank, t.local_rank, t.world_size, t.local_world_size, t.node_rank,
            t.num_nodes, t.master_addr, t.master_port)  # fmt: skip


# Open MPI 4.1.4 (Debian bookworm) `mpirun -np 2`, rank 1, as dumped on this machine; the four
# OMPI_COMM_WORLD_* are documented at
# https://docs.open-mpi.org/en/v5.0.x/tuning-apps/environment-var.html
OMPI_RANK1 = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "OMPI_COMM_WORLD_NODE_RANK": "1",
    "OMPI_MCA_ess_base_jobid": "1143930881",
    "OMPI_MCA_orte_num_nodes": "1",
    "PMIX_RANK": "1",
    "PMIX_NAMESPACE": "1143930881",
}
# MPICH 4.0.2 Hydra `mpiexec -n 2`, rank 1, dumped on this machine (mpiexec(1),
# https://www.mpich.org/static/docs/latest/www1/mpiexec.html).
HYDRA_RANK1 = {"PMI_RANK": "1", "PMI_SIZE": "2", "PMI_FD": "8", "MPI_LOCALRANKID": "1",
               "MPI_LOCALNRANKS": "2"}  # fmt: skip
# Slurm srun task 5 of 8 on the second of two nodes (srun(1) OUTPUT ENVIRONMENT VARIABLES).
SRUN_TASK5 = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "8",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_openmpi_one_node_is_loopback_with_a_port_from_the_job_id() -> None:
    assert summary(OMPI_RANK1) == ("openmpi", 1, 1, 2, 2, 0, 1, "127.0.0.1", job_port("1143930881"))


def test_openmpi_5_takes_its_port_from_the_pmix_namespace() -> None:
    env = {k: v for k, v in OMPI_RANK1.items() if not k.startswith("OMPI_MCA")}
    env["PMIX_NAMESPACE"] = "prterun-host-1234@1"
    assert detect(env).master_port == job_port("prterun-host-1234@1")


def test_mpi_across_nodes_without_a_host_is_an_error_saying_what_to_export() -> None:
    env = {**OMPI_RANK1, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_num_nodes": "2"}
    with pytest.raises(TopologyError, match=r"names no host for rank 0; export MASTER_ADDR"):
        detect(env)
    exported = {**env, "MASTER_ADDR": "node0", "MASTER_PORT": "23456"}
    assert summary(exported) == ("openmpi", 1, 1, 4, 2, 0, 2, "node0", 23456)


def test_a_world_of_one_inside_an_outer_launch_of_several_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stale RANK=0 WORLD_SIZE=1 exported into mpirun's ranks made each of them 'rank 0 of
    1' (the same seeds, the whole dataset) without a word."""
    stale = {**OMPI_RANK1, "RANK": "0", "WORLD_SIZE": "1"}
    with caplog.at_level("WARNING", logger="ddpseed.topology"):
        assert summary(stale)[:4] == ("torchrun", 0, 0, 1)
    assert "torchrun's variables (RANK=0" in caplog.text
    assert "openmpi's say rank 1 of 2" in caplog.text and "unset the stale" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ddpseed.topology"):
        detect({**OMPI_RANK1, "RANK": "1", "WORLD_SIZE": "2"})  # torchrun inside mpirun: fine
    assert caplog.text == ""


def test_mpirun_inside_sbatch_gives_every_rank_the_first_node_of_the_job() -> None:
    """Open MPI's mpirun inside a 2-node sbatch: rank 0 runs beside mpirun, in the batch
    script's environment; mpirun starts its daemon on the other node with `srun --nodes=1
    --nodelist=gpu08` (plm_slurm), so ranks there see a Slurm step of gpu08 alone. Before,
    those ranks took gpu08 (their step's nodelist) as rank 0's host while rank 0 took gpu07.
    Open MPI's variables win; every rank reads the job's nodelist."""
    batch = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
             "SLURM_NODELIST": "gpu[07-08]", "SLURM_PROCID": "0", "SLURM_NTASKS": "8",
             "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "0"}  # fmt: skip
    daemon_step = {**batch, "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "gpu08",
                   "SLURM_NODELIST": "gpu08", "SLURM_STEP_NUM_NODES": "1",
                   "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_TASKS_PER_NODE": "1",
                   "SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_LOCALID": "0"}  # fmt: skip

    def ompi(rank: int) -> dict[str, str]:
        return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "8",
                "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % 4), "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                "OMPI_MCA_ess_base_jobid": "77", "OMPI_MCA_orte_num_nodes": "2"}  # fmt: skip

    assert summary({**batch, **ompi(0)}) == ("openmpi", 0, 0, 8, 4, 0, 2, "gpu07", job_port("77"))
    remote = {**daemon_step, **ompi(6)}
    assert summary(remote) == ("openmpi", 6, 2, 8, 4, 1, 2, "gpu07", job_port("77"))
    assert [o.name for o in outranked(remote)] == ["slurm"]
    # one launch for the start-up check, though the ranks see two Slurm steps
    assert detect(remote).launch_id == detect({**batch, **ompi(0)}).launch_id == "openmpi-77"


def test_hydra_one_node_port_comes_from_its_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mpi_launchers, "ancestor_pid", lambda names: 4321)
    assert summary(HYDRA_RANK1) == ("mpich", 1, 1, 2, 2, 0, 1, "127.0.0.1", job_port("hydra-4321"))
    monkeypatch.setattr(mpi_launchers, "ancestor_pid", lambda names: None)
    with pytest.raises(TopologyError, match="no job id to derive a rendezvous port"):
        detect(HYDRA_RANK1)


def test_srun_steps_of_one_job_get_ports_and_launch_ids_of_their_own() -> None:
    """Before: every step of a job derived 10000 + job % 20000, so two steps running at once on
    one node (`srun --exact -n2 ... &` twice) met there. Step 0 keeps the job's port (the one
    launch/slurm_srun.sbatch exports)."""
    steps = [detect({**SRUN_TASK5, "SLURM_STEP_ID": str(s)}) for s in range(3)]
    assert len({t.master_port for t in steps}) == 3
    assert [t.master_port for t in steps] == [job_port("4242", str(s)) for s in range(3)]
    assert steps[0].master_port == 10000 + 4242 % 20000
    assert [t.launch_id for t in steps] == ["slurm-4242.0", "slurm-4242.1", "slurm-4242.2"]


def test_srun_mpi_pmi2_and_pmix_tasks_are_slurm_tasks() -> None:
    """srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE, --mpi=pmix PMIX_RANK, for the same task
    (https://slurm.schedmd.com/mpi_guide.html): Slurm's description (nodes, hosts) wins."""
    pmi2 = {**SRUN_TASK5, "PMI_RANK": "5", "PMI_SIZE": "8", "PMI_FD": "5", "PMI_JOBID": "4242.0"}
    pmix = {**SRUN_TASK5, "PMIX_RANK": "5", "PMIX_NAMESPACE": "slurm.pmix.4242.0"}
    for env in (pmi2, pmix):
        assert summary(env) == ("slurm", 5, 1, 8, 4, 1, 2, "gpu07", job_port("4242"))


def test_hydra_mpiexec_inside_an_srun_step_is_mpich() -> None:
    """Hydra's proxies are the step's tasks (one per node): its ranks' PMI_RANK differs."""
    env = {**SRUN_TASK5, "SLURM_PROCID": "1", "PMI_RANK": "5", "PMI_SIZE": "8",
           "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}  # fmt: skip
    # Hydra names no job id; the Slurm step its proxies run in names this launch
    assert summary(env) == ("mpich", 5, 1, 8, 4, 1, 2, "gpu07", job_port("slurm-4242.0"))


def test_pmix_alone_names_no_world_size() -> None:
    with pytest.raises(TopologyError, match="no variables naming the world size"):
        detect({"PMIX_RANK": "0", "PMIX_NAMESPACE": "prterun-x@1"})


def test_mvapich_mpirun_rsh_heterogeneous_nodes() -> None:
    """MV2_COMM_WORLD_* (MVAPICH2 user guide, "MPIRUN_RSH Parameters"); 3 ranks on node 0,
    1 on node 1, rank 3 alone there. mpirun_rsh names no node index or count: ddpseed's
    node_rank/num_nodes are then an estimate (reports only), the ranks and sizes are exact."""
    env = {"MV2_COMM_WORLD_RANK": "3", "MV2_COMM_WORLD_SIZE": "4",
           "MV2_COMM_WORLD_LOCAL_RANK": "0", "MV2_COMM_WORLD_LOCAL_SIZE": "1",
           "MASTER_ADDR": "n0", "MASTER_PORT": "1234"}  # fmt: skip
    t = detect(env)
    assert (t.launcher, t.rank, t.local_rank, t.world_size, t.local_world_size) == (
        "mvapich", 3, 0, 4, 1
    )  # fmt: skip
    assert (t.master_addr, t.master_port) == ("n0", 1234)


def test_jsrun_takes_rank0_host_after_the_launch_node() -> None:
    """JSM_NAMESPACE_* and LSB_MCPU_HOSTS (IBM jsrun and LSF job environment docs; Lightning's
    LSFEnvironment skips the launch node the same way)."""
    env = {"JSM_NAMESPACE_RANK": "7", "JSM_NAMESPACE_SIZE": "12",
           "JSM_NAMESPACE_LOCAL_RANK": "1", "JSM_NAMESPACE_LOCAL_SIZE": "6",
           "LSB_JOBID": "90210", "LSB_MCPU_HOSTS": "batch3 1 a01n05 42 a01n06 42",
           # jsrun's tasks are Spectrum MPI (Open MPI) processes too
           "OMPI_COMM_WORLD_RANK": "7", "OMPI_COMM_WORLD_SIZE": "12",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "6"}  # fmt: skip
    assert summary(env) == ("lsf", 7, 1, 12, 6, 1, 2, "a01n05", job_port("90210"))


def test_two_jsruns_of_one_lsf_job_get_ports_of_their_own() -> None:
    """jsrun, a PMIx server, gives each launch its namespace (PMIX_NAMESPACE). Before: the port
    came from LSB_JOBID alone, so two jsruns of one job at once met at one port."""
    env = {"JSM_NAMESPACE_RANK": "0", "JSM_NAMESPACE_SIZE": "2",
           "JSM_NAMESPACE_LOCAL_RANK": "0", "JSM_NAMESPACE_LOCAL_SIZE": "2",
           "LSB_JOBID": "90210"}  # fmt: skip
    first, second = (detect({**env, "PMIX_NAMESPACE": f"90210.{n}"}) for n in (1, 2))
    assert first.master_port != second.master_port
    assert first.master_port == job_port("90210", "90210.1")
    assert (first.launch_id, second.launch_id) == ("lsf-90210.90210.1", "lsf-90210.90210.2")
    assert detect(env).master_port == job_port("90210")  # no namespace: the job's port


def test_openmpi_inside_lsf_without_jsrun_uses_the_first_host() -> None:
    env = {**OMPI_RANK1, "OMPI_COMM_WORLD_SIZE": "4", "OMPI_MCA_orte_num_nodes": "2",
           "LSB_JOBID": "5", "LSB_MCPU_HOSTS": "hostA 2 hostB 2"}  # fmt: skip
    assert detect(env).master_addr == "hostA"


def test_pals_heterogeneous_nodes_from_pbs_nodefile(tmp_path: Path) -> None:
    """PALS_RANKID/PALS_LOCAL_RANKID/PALS_NODEID with Cray PMI sizes (ALCF Polaris docs);
    PBS_NODEFILE lists one line per chunk: rank 0 is on its first host."""
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x3001c0s7b0n0.hsn\nx3001c0s7b0n0.hsn\nx3001c0s13b1n0.hsn\n")
    env = {"PALS_RANKID": "4", "PALS_LOCAL_RANKID": "0", "PALS_NODEID": "1",
           "PALS_LOCAL_SIZE": "2", "PMI_RANK": "4", "PMI_SIZE": "6", "PMI_LOCAL_RANK": "0",
           "PMI_LOCAL_SIZE": "2", "PALS_APID": "5a7c-11", "PBS_JOBID": "123.polaris-pbs-01",
           "PBS_NODEFILE": str(nodefile)}  # fmt: skip
    assert summary(env) == ("pals", 4, 0, 6, 2, 1, 2, "x3001c0s7b0n0.hsn", job_port("5a7c-11"))
    env["PBS_NODEFILE"] = str(tmp_path / "missing")
    with pytest.raises(TopologyError, match=r"PBS_NODEFILE=.* cannot be read"):
        detect(env)


def test_flux_one_node_and_several() -> None:
    """flux-environment(7): FLUX_TASK_RANK, FLUX_TASK_LOCAL_ID, FLUX_JOB_SIZE, FLUX_JOB_NNODES,
    FLUX_JOB_ID (F58, not ASCII)."""
    one = {"FLUX_TASK_RANK": "2", "FLUX_TASK_LOCAL_ID": "2", "FLUX_JOB_SIZE": "4",
           "FLUX_JOB_NNODES": "1", "FLUX_JOB_ID": "ƒ2Xk7qp9", "FLUX_URI": "local:///x"}  # fmt: skip
    assert summary(one) == ("flux", 2, 2, 4, 4, 0, 1, "127.0.0.1", job_port("ƒ2Xk7qp9"))
    two = {**one, "FLUX_JOB_NNODES": "2", "FLUX_TASK_RANK": "3", "FLUX_TASK_LOCAL_ID": "1"}
    with pytest.raises(TopologyError, match="export MASTER_ADDR"):
        detect(two)
    assert summary({**two, "MASTER_ADDR": "f0"})[:8] == ("flux", 3, 1, 4, 2, 1, 2, "f0")


# Kubeflow training-operator >= 1.7 (kubeflow/trainer#1840): worker-1 of a 3-pod PyTorchJob.
KUBEFLOW_POD = {
    "MASTER_ADDR": "job-master-0",
    "MASTER_PORT": "23456",
    "RANK": "2",
    "WORLD_SIZE": "3",
    "PET_NNODES": "3",
    "PET_NODE_RANK": "2",
    "PET_NPROC_PER_NODE": "1",
    "PET_MASTER_ADDR": "job-master-0",
    "PET_MASTER_PORT": "23456",
}


def test_kubeflow_pod_is_one_rank_per_pod() -> None:
    assert summary(KUBEFLOW_POD) == ("kubeflow", 2, 0, 3, 1, 2, 3, "job-master-0", 23456)


def test_kubeflow_pod_asking_for_several_processes_needs_torchrun() -> None:
    """With nprocPerNode 4 the operator sets WORLD_SIZE = pods x 4 (kubeflow/trainer#1790):
    plain python in the pod would wait forever for ranks nobody starts."""
    env = {**KUBEFLOW_POD, "WORLD_SIZE": "12", "PET_NPROC_PER_NODE": "4"}
    with pytest.raises(TopologyError, match=r"`torchrun train\.py`"):
        detect(env)


def test_kubeflow_default_nproc_auto_pod_is_one_rank_per_pod() -> None:
    """training-operator 1.9 defaults nprocPerNode to "auto" (PET_NPROC_PER_NODE=auto) and
    counts it as 1 in WORLD_SIZE (pkg/controller.v1/pytorch/envvar.go): a plain `python
    train.py` PyTorchJob. Before: refused as asking for torchrun."""
    for nproc in ("auto", "gpu", "cpu"):
        env = {**KUBEFLOW_POD, "PET_NPROC_PER_NODE": nproc}
        assert summary(env) == ("kubeflow", 2, 0, 3, 1, 2, 3, "job-master-0", 23456)
    # a WORLD_SIZE counting more processes than pods still needs torchrun
    with pytest.raises(TopologyError, match=r"PET_NPROC_PER_NODE=auto .*\(WORLD_SIZE=12\)"):
        detect({**KUBEFLOW_POD, "PET_NPROC_PER_NODE": "auto", "WORLD_SIZE": "12"})


def test_an_inner_launcher_in_a_kubeflow_pod_wins() -> None:
    """A pod (nprocPerNode 1) whose command is a per-GPU launcher other than torchrun
    (DeepSpeed's) exporting RANK/LOCAL_RANK/WORLD_SIZE for its workers, without
    TORCHELASTIC_RUN_ID. The operator never sets LOCAL_RANK and sets RANK = PET_NODE_RANK.
    Before: every worker of pod 1 became kubeflow rank 1 of 3 (same seeds, same shard)."""
    inner = {"PET_NODE_RANK": "1", "WORLD_SIZE": "12", "MASTER_PORT": "29500"}
    workers = [
        {**KUBEFLOW_POD, **inner, "RANK": str(4 + local), "LOCAL_RANK": str(local)}
        for local in range(4)
    ]
    assert [summary(w)[:5] for w in workers] == [
        ("torchrun", 4 + local, local, 12, 12) for local in range(4)
    ]
    assert [o.name for o in outranked(workers[1])] == []  # kubeflow steps aside entirely
    # RANK rewritten without LOCAL_RANK (an mp.spawn wrapper) is the inner launcher's too
    assert detect({**KUBEFLOW_POD, "RANK": "7", "WORLD_SIZE": "12"}).launcher == "torchrun"
    assert detect(KUBEFLOW_POD).launcher == "kubeflow"  # RANK == PET_NODE_RANK: the pod's own


def test_torchrun_inside_a_kubeflow_pod_is_torchrun() -> None:
    worker = {**KUBEFLOW_POD, "TORCHELASTIC_RUN_ID": "none", "RANK": "9", "WORLD_SIZE": "12",
              "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "2",
              "GROUP_WORLD_SIZE": "3"}  # fmt: skip
    assert summary(worker) == ("torchrun", 9, 1, 12, 4, 2, 3, "job-master-0", 23456)


def test_torchrun_inside_mpirun_and_slurm_is_torchrun() -> None:
    worker = {**OMPI_RANK1, **SRUN_TASK5, "TORCHELASTIC_RUN_ID": "r", "RANK": "3",
              "WORLD_SIZE": "4", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400"}  # fmt: skip
    assert detect(worker).launcher == "torchrun"
    assert [o.name for o in outranked(worker)] == ["openmpi", "pmix", "slurm"]


# SageMaker training toolkit: ENVIRONMENT_VARIABLES.md
# (https://github.com/aws/sagemaker-training-toolkit/blob/master/ENVIRONMENT_VARIABLES.md).
SAGEMAKER = {"SM_HOSTS": '["algo-1","algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "8"}


def test_sagemaker_is_one_rank_per_host() -> None:
    assert summary(SAGEMAKER) == ("sagemaker", 1, 0, 2, 1, 1, 2, "algo-1", 29500)
    with pytest.raises(TopologyError, match="not in SM_HOSTS"):
        detect({**SAGEMAKER, "SM_CURRENT_HOST": "algo-3"})


def test_sagemaker_distribution_mpirun_is_openmpi() -> None:
    assert detect({**SAGEMAKER, **OMPI_RANK1}).launcher == "openmpi"


class Recorder(Mapping[str, str]):
    """A mapping that remembers every name looked up."""

    def __init__(self, data: Mapping[str, str]) -> None:
        self.data, self.asked = dict(data), set[str]()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return key in self.data

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.asked.add(key)
        return self.data.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


@pytest.mark.parametrize(
    "env",
    [OMPI_RANK1, HYDRA_RANK1, SRUN_TASK5, KUBEFLOW_POD, {**KUBEFLOW_POD, "LOCAL_RANK": "0"},
     SAGEMAKER, {}, {"RANK": "0",
     "WORLD_SIZE": "1"}, {**OMPI_RANK1, "OMPI_COMM_WORLD_SIZE": "4", "LSB_JOBID": "1",
     "LSB_MCPU_HOSTS": "a 2 b 2"}],
)  # fmt: skip
def test_every_variable_read_is_in_the_one_list(env: Mapping[str, str]) -> None:
    """LAUNCHER_VARIABLES is what tests and the bench strip; a name ddpseed reads but does not
    list would leak an outer launcher into their child processes."""
    recorder = Recorder(env)
    for cls in ENVIRONMENTS:
        launcher = cls(recorder)
        if launcher.activated():
            with contextlib.suppress(TopologyError):
                launcher.topology()
    assert recorder.asked - LAUNCHER_VARIABLES == set()


def test_the_list_is_what_the_bench_and_tests_strip() -> None:
    from ddpseed import measure
    from helpers import procs

    assert LAUNCHER_VARIABLES <= procs.DROPPED
    assert not set(procs.clean_env()) & LAUNCHER_VARIABLES
    assert measure.LAUNCHER_VARIABLES is LAUNCHER_VARIABLES
    child = measure.child_env()
    assert not set(child) & LAUNCHER_VARIABLES


def test_ddpseed_env_names_only_the_chosen_launcher_and_why() -> None:
    env = clean_env({**SRUN_TASK5, "TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2",
                     "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "ddpseed", "env"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Topology(torchrun rank 1/2"), lines
    assert "launcher: torchrun (TorchrunEnvironment): TORCHELASTIC_RUN_ID is set" in lines[1]
    assert "outranked (an outer launch): slurm" in lines[2], lines
    assert "Single" not in out.stdout and len(lines) == 3, lines
    assert choose(clean_env()).name == "single"


@pytest.mark.parametrize("job", ["\u00b2", "\u0661\u0662", "12\uff13"])
def test_a_job_id_of_other_unicode_digits_is_not_read_as_a_number(job: str) -> None:
    """Before: '²' raised ValueError from int(), and Slurm job '١٢' got port 10012 while
    launch/lib.sh (ASCII digits only) refused it; now both are names, hashed like any other."""
    port = job_port(job)
    assert 10000 <= port < 30000 and port == job_port(job)
    if job == "\u0661\u0662":
        assert port != 10012
    env = {"SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job, "SLURM_NTASKS": "1"}
    assert detect(env).master_port == 29500  # Slurm's default port needs a numeric job id
