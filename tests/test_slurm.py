"""The Slurm launchers against a real Slurm 22.05 (Debian's packages) on this one machine.

A private cluster: its own munged (own key and socket), one slurmctld and two slurmd daemons
(nodes n1 and n2, both on this host, told apart by port with ``slurmd -N``), every file under
a temporary directory and every port free when picked. Nothing of the system's Slurm or munge
configuration is used or changed, so several clusters can run side by side.

Under xdist all tests of this module share one cluster when run with ``--dist loadgroup``
(they are in one ``xdist_group``); with plain ``-n auto`` each worker that gets one of them
builds its own cluster, which is slower but just as correct. The packages are installed once,
under a file lock, if missing (tests/helpers/slurm_install.py, through conftest's
``slurm_installed``).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ddpseed.launchers import SlurmEnvironment, job_port
from helpers.procs import REPO, ProcessGroup, clean_env, free_port, stop_pids
from helpers.ranks import parse_verify

pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

LAUNCH = REPO / "launch"
HELPERS = Path(__file__).resolve().parent / "helpers"
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


def _run(cmd: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd), capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


@dataclass
class Job:
    job_id: int
    state: str
    exit_code: str
    output: str


@dataclass
class SlurmCluster:
    """A two-node Slurm cluster on this host, all of it under ``root``."""

    root: Path
    hostname: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    munged_pid: int | None = None
    daemons: ProcessGroup = field(init=False)
    install_seconds: float = 0.0

    def __post_init__(self) -> None:
        # the daemons' own stdout goes to log/<name>-stdout.log, beside the logs they write
        self.daemons = ProcessGroup(self.root / "log")

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.sock"

    def env(self, **extra: str) -> dict[str, str]:
        """A client environment for this cluster (and nothing of an enclosing job)."""
        # the job inherits the submitter's environment: only what a test passes may reach it
        return clean_env(SLURM_CONF=self.conf, **extra)

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        for sub in ("munge", "state", "log", "spool", "out"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o755)  # munged refuses a socket dir others can write
        self._start_munge()
        self._write_conf()
        self.daemons.start(
            "slurmctld-stdout", ["slurmctld", "-D", "-f", str(self.conf)], self.env()
        )
        for node in ("n1", "n2"):
            cmd = ["slurmd", "-D", "-N", node, "-f", str(self.conf)]
            self.daemons.start(f"slurmd-{node}-stdout", cmd, self.env())
        self._wait_idle(timeout=90)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        pidfile = self.root / "munge" / "munged.pid"
        done = _run(
            [
                "munged",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={pidfile}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
            timeout=30,
        )
        assert done.returncode == 0, f"munged failed: {done.stderr}"
        deadline = time.monotonic() + 20
        while not (self.munge_socket.exists() and pidfile.exists()):
            assert time.monotonic() < deadline, "munged did not create its socket"
            time.sleep(0.05)
        self.munged_pid = int(pidfile.read_text().strip())

    def _write_conf(self) -> None:
        r = self.root
        ctld, n1, n2 = free_port(), free_port(), free_port()
        # Distinct job ids per cluster keep derived ports apart (SystemRandom: tests elsewhere
        # seed `random`).
        first_job = random.SystemRandom().randrange(1000, 2_000_000)
        self.conf.write_text(f"""\
ClusterName=ddpseedtest
SlurmctldHost={self.hostname}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={n1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
FirstJobId={first_job}
MinJobAge=600
NodeName=n1 NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={n1} CPUs=4 State=UNKNOWN
NodeName=n2 NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={n2} CPUs=4 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=30 State=UP
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            for proc in self.daemons.procs:
                assert proc.popen.poll() is None, f"{proc.name} exited:\n{self.logs()}"
            done = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), timeout=20)
            states = done.stdout.strip()
            seen = dict(line.split() for line in states.splitlines() if line.strip())
            if seen.get("n1") == "idle" and seen.get("n2") == "idle":
                return
            time.sleep(0.2)
        raise AssertionError(f"nodes not idle after {timeout}s: {states!r}\n{self.logs()}")

    def logs(self, tail: int = 2500) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- jobs --------------------------------------------------------------------------------
    def submit(
        self,
        script: Path,
        args: Sequence[str],
        options: Sequence[str],
        timeout: float = 90,
        **env: str,
    ) -> Job:
        """``sbatch`` a script and poll until the job ends (``sbatch --wait`` polls too
        slowly: its interval doubles up to 32 s)."""
        out = self.root / "out"
        done = _run(
            [
                "sbatch",
                "--parsable",
                f"--output={out}/%j.out",
                "--time=5",
                f"--chdir={REPO}",
                *options,
                str(script),
                *args,
            ],
            env=self.env(**env),
            timeout=30,
        )
        assert done.returncode == 0, f"sbatch failed: {done.stderr}\n{self.logs()}"
        job_id = int(done.stdout.strip().split(";")[0])
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        while True:
            shown = _run(["scontrol", "show", "job", "-o", str(job_id)], env=self.env(), timeout=20)
            fields = dict(re.findall(r"(\w+)=(\S*)", shown.stdout))
            if fields.get("JobState") in TERMINAL:
                break
            if time.monotonic() > deadline:
                _run(["scancel", str(job_id)], env=self.env(), timeout=20)
                output = (
                    (out / f"{job_id}.out").read_text(errors="replace")
                    if (out / f"{job_id}.out").exists()
                    else ""
                )
                pytest.fail(
                    f"job {job_id} still {fields.get('JobState')} after {timeout}s:\n"
                    f"{output[-5000:]}\n{self.logs()}"
                )
            time.sleep(0.2)
        path = out / f"{job_id}.out"
        return Job(
            job_id,
            fields["JobState"],
            fields.get("ExitCode", "?"),
            path.read_text(errors="replace") if path.exists() else "",
        )

    # -- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.daemons.procs and self.daemons.procs[0].popen.poll() is None:
            # Cancel leftovers first, so no slurmstepd outlives its slurmd.
            _run(["scancel", "--full", "--partition=debug"], env=self.env(), timeout=20)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                queued = _run(["squeue", "-h", "-o", "%i"], env=self.env(), timeout=20)
                if queued.returncode != 0 or not queued.stdout.strip():
                    break
                time.sleep(0.2)
        self.daemons.kill_all(grace=20)
        if self.munged_pid:
            stop_pids([self.munged_pid], grace=10)


@pytest.fixture(scope="module")
def slurm(slurm_installed: float) -> Iterator[SlurmCluster]:
    if sys.platform != "linux":
        pytest.skip("the Slurm testbed runs on Linux only")
    if os.geteuid() != 0:
        pytest.skip("running slurmd (which starts jobs as their users) needs root")
    install_seconds = slurm_installed
    # Unix socket paths must stay short (108 bytes): use a short directory of our own.
    root = Path(tempfile.mkdtemp(prefix="ddpseed-slurm-"))
    cluster = SlurmCluster(root, install_seconds=install_seconds)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _verify(job: Job) -> list[dict]:
    return parse_verify(job.output, f"job {job.job_id} ({job.state})")


def test_srun_sbatch_two_nodes(slurm, verify_command, verify_checker, free_port):
    """One task per 'GPU' with srun: ranks, nodes and local ranks are Slurm's own."""
    job = slurm.submit(
        LAUNCH / "slurm_srun.sbatch",
        verify_command,
        ["--nodes=2", "--ntasks-per-node=2"],
        MASTER_PORT=str(free_port),
        DDPSEED_SEED="2024",
    )
    assert job.state == "COMPLETED" and job.exit_code == "0:0", job.output[-6000:]
    reports = _verify(job)
    verify_checker(reports, nodes=2, per_node=2, launcher="slurm", seed=2024)
    # MASTER_ADDR is the NodeAddr of the allocation's first node (n1), not its name.
    assert {r["master_addr"] for r in reports} == {"127.0.0.1"}
    assert {r["master_port"] for r in reports} == {free_port}
    assert "MASTER_ADDR=127.0.0.1" in job.output and "PYTHONHASHSEED=0" in job.output


@pytest.mark.parametrize("rdzv", ["c10d", "static"])
def test_torchrun_inside_sbatch(slurm, verify_command, verify_checker, free_port, rdzv):
    """One torchrun per node via srun --ntasks-per-node=1; torchrun's variables win."""
    job = slurm.submit(
        LAUNCH / "slurm_torchrun.sbatch",
        verify_command,
        ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2"],
        MASTER_PORT=str(free_port),
        DDPSEED_SEED="77",
        NPROC_PER_NODE="2",
        RDZV=rdzv,
        PYTHON=sys.executable,
    )
    assert job.state == "COMPLETED" and job.exit_code == "0:0", job.output[-6000:]
    verify_checker(
        _verify(job),
        nodes=2,
        per_node=2,
        launcher="torchrun",
        seed=77,
        static_nodes=rdzv == "static",
    )


def test_batch_script_outside_srun_is_one_process(slurm, verify_command):
    """The batch script has Slurm's job variables but is one process, not a world of 4."""
    job = slurm.submit(
        HELPERS / "slurm_batch_only.sbatch",
        verify_command,
        ["--nodes=2", "--ntasks-per-node=2"],
        DDPSEED_SEED="5",
    )
    assert job.state == "COMPLETED" and job.exit_code == "0:0", job.output[-6000:]
    lines = job.output.splitlines()
    batch_env = dict(
        line[len("BATCH_ENV ") :].split("=", 1) for line in lines if line.startswith("BATCH_ENV ")
    )
    task_env = dict(
        line[len("TASK_ENV ") :].split("=", 1) for line in lines if line.startswith("TASK_ENV ")
    )
    # What Slurm 22.05 really sets: the batch script has no step id at all, and claims
    # SLURM_PROCID=0 of SLURM_NTASKS=4; srun tasks carry the step's id and sizes.
    assert "SLURM_STEP_ID" not in batch_env and "SLURM_STEPID" not in batch_env, batch_env
    assert batch_env["SLURM_PROCID"] == "0" and batch_env["SLURM_NTASKS"] == "4", batch_env
    assert task_env["SLURM_STEP_ID"] == "0" and task_env["SLURM_STEP_NUM_TASKS"] == "4", task_env
    assert not SlurmEnvironment(batch_env).activated()
    assert SlurmEnvironment(task_env).activated()

    topo = json.loads(next(line for line in lines if line.startswith("TOPOLOGY "))[9:])
    assert topo["launcher"] == "single" and topo["world_size"] == 1, topo
    assert any("outside srun" in line for line in lines), job.output[-4000:]
    reports = _verify(job)
    assert [(r["launcher"], r["world_size"], r["base_seed"]) for r in reports] == [("single", 1, 5)]


def test_master_port_derived_from_job_id(slurm, monkeypatch):
    """Without MASTER_PORT the sbatch scripts derive the port exactly as ddpseed does."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))  # for scontrol in expand_hostlist
    for script in ("slurm_srun.sbatch", "slurm_torchrun.sbatch"):
        job = slurm.submit(LAUNCH / script, [], ["--nodes=2", "--ntasks-per-node=1"], DRY_RUN="1")
        assert job.state == "COMPLETED", job.output
        port = int(re.search(r"MASTER_PORT=(\d+)", job.output).group(1))
        library = SlurmEnvironment(
            {
                "SLURM_JOB_ID": str(job.job_id),
                "SLURM_PROCID": "0",
                "SLURM_STEP_ID": "0",
                "SLURM_NTASKS": "2",
                "SLURM_JOB_NODELIST": "n[1-2]",
                "MASTER_ADDR": "127.0.0.1",
            }
        ).topology()
        assert port == library.master_port == 10000 + job.job_id % 20000
        assert "MASTER_ADDR=127.0.0.1" in job.output
        assert "ddpseed dry run: srun" in job.output


def test_two_concurrent_srun_steps_on_one_node_form_groups_of_their_own(slurm):
    """A sweep in one allocation: two `srun --exact -n2 ... &` steps on one node at once, with
    MASTER_PORT unset. Before: both derived the job's port and met there (one task of each
    formed a 2-rank group, or the steps failed); now each step gets its own port."""
    job = slurm.submit(
        HELPERS / "slurm_two_steps.sbatch",
        [sys.executable, str(HELPERS / "step_rank.py")],
        ["--nodes=1", "--ntasks=4"],
        TIMEOUT="30",
    )
    assert job.state == "COMPLETED" and job.exit_code == "0:0", job.output[-6000:]
    reports = [json.loads(ln[len("STEP_RANK ") :]) for ln in job.output.splitlines()
               if ln.startswith("STEP_RANK ")]  # fmt: skip
    assert len(reports) == 4, job.output[-6000:]
    steps = {r["launch_id"] for r in reports}
    assert len(steps) == 2, reports
    for r in reports:
        assert r["group"] in (["step-a", "step-a"], ["step-b", "step-b"]), reports
        step = r["launch_id"].rsplit(".", 1)[1]
        assert r["master_port"] == job_port(str(job.job_id), step), r
