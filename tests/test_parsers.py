"""Slurm's compact notations, and launcher detection over real environment dumps.

The environment dumps below were taken from real launches on this project's test machine:
torchrun 2.13 (single node and 2 nodes x 2 processes), and Slurm 22.05.8's batch script and
srun tasks (2 nodes x 2 tasks; tests/test_slurm.py re-checks the Slurm ones against a live
cluster). Only variables a launcher sets are kept.
"""

from __future__ import annotations

import logging
import os
import string
from pathlib import Path

import hostlist as python_hostlist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ddpseed.errors import TopologyError
from ddpseed.hostlist import expand_hostlist, parse_tasks_per_node
from ddpseed.launchers import SlurmEnvironment, TorchrunEnvironment
from ddpseed.topology import detect

# --- hostlists ------------------------------------------------------------------------------


@pytest.fixture
def scontrol_conf(slurm_installed, tmp_path, monkeypatch) -> None:
    """scontrol (installed by the session fixture if missing) with a minimal config of its own:
    without one it looks for the controller in DNS (SRV records) before giving up."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=parsers\nSlurmctldHost=localhost\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


@pytest.fixture(params=["python-hostlist", "scontrol"])
def use_scontrol(request) -> bool:
    """Run a test through both expanders."""
    if request.param == "scontrol":
        request.getfixturevalue("scontrol_conf")
        return True
    return False


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu7", ["gpu7"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("node[001-003]", ["node001", "node002", "node003"]),
        ("node[08-11]", ["node08", "node09", "node10", "node11"]),
        ("node[01-02,07],gpu3", ["node01", "node02", "node07", "gpu3"]),
        ("a[1-2],b[01-02]", ["a1", "a2", "b01", "b02"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
        ("n[1-2]", ["n1", "n2"]),  # what our Slurm testbed reports
        ("  node[1-2]\n", ["node1", "node2"]),
    ],
)
def test_expand_hostlist(nodelist, hosts, use_scontrol):
    assert expand_hostlist(nodelist, use_scontrol=use_scontrol) == hosts


@pytest.mark.parametrize("nodelist", ["", "   ", "node[3-1]", "node[1-2"])
def test_expand_hostlist_rejects(nodelist):
    with pytest.raises(TopologyError) as info:
        expand_hostlist(nodelist, use_scontrol=False)
    assert "hostlist" in str(info.value)
    if nodelist.strip():
        assert repr(nodelist) in str(info.value)  # names the value


def test_expand_hostlist_without_scontrol_on_path(tmp_path, monkeypatch):
    """use_scontrol=True falls back to python-hostlist when Slurm is not installed."""
    monkeypatch.setenv("PATH", str(tmp_path))
    assert expand_hostlist("node[1-2]") == ["node1", "node2"]


def test_expand_hostlist_rejects_malformed_with_scontrol(scontrol_conf):
    with pytest.raises(TopologyError):
        expand_hostlist("node[1-", use_scontrol=True)


_prefix = st.text(string.ascii_lowercase, min_size=1, max_size=4)


@st.composite
def _groups(draw):
    """A well-formed hostlist as Slurm writes them: distinct prefixes with bracketed, possibly
    zero-padded ranges. (Slurm never repeats a node; given `a0,a0`, scontrol keeps both and
    python-hostlist drops the repeat unless called with allow_duplicates=True.)"""
    prefixes = draw(st.lists(_prefix, min_size=1, max_size=3, unique=True))
    parts = []
    for prefix in prefixes:
        width = draw(st.integers(1, 3))
        start = draw(st.integers(0, 10**width - 3))
        stop = draw(st.integers(start, min(start + 4, 10**width - 1)))
        parts.append(f"{prefix}[{start:0{width}d}-{stop:0{width}d}]")
    return ",".join(parts)


@settings(max_examples=40, deadline=None)
@given(nodelist=_groups())
def test_scontrol_and_python_hostlist_agree(slurm_installed, nodelist):
    """Both expanders give the same hosts, so ranks never depend on Slurm being installed."""
    expected = python_hostlist.expand_hostlist(nodelist)
    assert expand_hostlist(nodelist, use_scontrol=False) == expected
    conf = Path(os.environ.get("TMPDIR", "/tmp")) / f"ddpseed-parsers-{os.getpid()}.conf"
    conf.write_text("ClusterName=parsers\nSlurmctldHost=localhost\n")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        assert expand_hostlist(nodelist, use_scontrol=True) == expected
    finally:
        conf.unlink()
        if old is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = old


# --- SLURM_TASKS_PER_NODE ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "counts"),
    [
        ("4", [4]),
        ("2(x3),1", [2, 2, 2, 1]),
        ("1(x4)", [1, 1, 1, 1]),
        ("2(x2)", [2, 2]),  # what Slurm 22.05 sets for --nodes=2 --ntasks-per-node=2
        (" 3 , 1(x2) ", [3, 1, 1]),
    ],
)
def test_parse_tasks_per_node(spec, counts):
    assert parse_tasks_per_node(spec) == counts


@pytest.mark.parametrize("spec", ["", "x", "2(x)", "2(3)", "2(x3", "-1", "2,,1", "1.5"])
def test_parse_tasks_per_node_rejects(spec):
    with pytest.raises(TopologyError) as info:
        parse_tasks_per_node(spec)
    assert repr(spec) in str(info.value)


# --- detect() over real environment dumps -----------------------------------------------------

TORCHRUN_SINGLE_NODE_RANK1 = {  # torchrun --standalone --nproc-per-node=2, rank 1
    "GROUP_RANK": "0",
    "GROUP_WORLD_SIZE": "1",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "localhost",
    "MASTER_PORT": "35879",
    "OMP_NUM_THREADS": "1",
    "RANK": "1",
    "ROLE_NAME": "default",
    "ROLE_RANK": "1",
    "ROLE_WORLD_SIZE": "2",
    "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_RUN_ID": "23b7f104-5eac-425d-9696-ada6cfa094f1",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "WORLD_SIZE": "2",
}

TORCHRUN_NODE1_RANK3 = {  # torchrun --nnodes=2 --nproc-per-node=2 --node-rank=1 (static)
    "GROUP_RANK": "1",
    "GROUP_WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "127.0.0.1",
    "MASTER_PORT": "29571",
    "OMP_NUM_THREADS": "1",
    "RANK": "3",
    "ROLE_NAME": "default",
    "ROLE_RANK": "3",
    "ROLE_WORLD_SIZE": "4",
    "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_RESTART_COUNT": "0",
    "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "WORLD_SIZE": "4",
}

_SLURM_JOB = {  # sbatch --nodes=2 --ntasks-per-node=2, Slurm 22.05.8
    "SLURM_CLUSTER_NAME": "ddpseedtest",
    "SLURM_JOBID": "1000",
    "SLURM_JOB_ID": "1000",
    "SLURM_JOB_CPUS_PER_NODE": "2(x2)",
    "SLURM_JOB_GID": "0",
    "SLURM_JOB_NAME": "env.sbatch",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_PARTITION": "debug",
    "SLURM_JOB_UID": "0",
    "SLURM_JOB_USER": "root",
    "SLURM_NNODES": "2",
    "SLURM_NODELIST": "n[1-2]",
    "SLURM_NODE_ALIASES": "(null)",
    "SLURM_NPROCS": "4",
    "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_PRIO_PROCESS": "0",
    "SLURM_SUBMIT_DIR": "/tmp/sx",
    "SLURM_SUBMIT_HOST": "vm",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_TOPOLOGY_ADDR_PATTERN": "node",
    "SLURM_WORKING_CLUSTER": "ddpseedtest:127.0.0.1:16817:9728:109",
}

# The batch script itself: no SLURM_STEP_ID / SLURM_STEPID at all, yet PROCID 0 of NTASKS 4.
SBATCH_BATCH_SCRIPT = {
    **_SLURM_JOB,
    "SLURMD_NODENAME": "n1",
    "SLURM_CPUS_ON_NODE": "2",
    "SLURM_GTIDS": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_PROCID": "0",
    "SLURM_TASK_PID": "5702",
    "SLURM_TOPOLOGY_ADDR": "n1",
}

# srun inside that job: task 3, the second task on the second node.
SRUN_TASK3 = {
    **_SLURM_JOB,
    "SLURMD_NODENAME": "n2",
    "SLURM_CPUS_ON_NODE": "2",
    "SLURM_DISTRIBUTION": "block",
    "SLURM_GTIDS": "2,3",
    "SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0": "2(x2)",
    "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "3",
    "SLURM_SRUN_COMM_HOST": "127.0.0.1",
    "SLURM_SRUN_COMM_PORT": "45363",
    "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_LAUNCHER_PORT": "45363",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_TASK_PID": "5731",
    "SLURM_TOPOLOGY_ADDR": "n2",
    "SLURM_UMASK": "0022",
}

# launch/slurm_torchrun.sbatch: torchrun started by `srun --ntasks-per-node=1` on node 2 of 2,
# its rank 3 worker. The Slurm variables describe the agent's step (2 tasks); RANK is the truth.
TORCHRUN_IN_SBATCH_RANK3 = {
    **SRUN_TASK3,
    "SLURM_NTASKS": "2",
    "SLURM_NPROCS": "2",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_TASKS_PER_NODE": "1(x2)",
    "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_GTIDS": "1",
    "SLURM_LOCALID": "0",
    "SLURM_PROCID": "1",
    **TORCHRUN_NODE1_RANK3,
    "TORCHELASTIC_RUN_ID": "slurm-1000",
}


def _summary(topo):
    return (
        topo.launcher,
        topo.rank,
        topo.local_rank,
        topo.world_size,
        topo.local_world_size,
        topo.node_rank,
        topo.num_nodes,
        topo.master_addr,
        topo.master_port,
    )


def test_detect_torchrun_single_node():
    topo = detect(TORCHRUN_SINGLE_NODE_RANK1)
    assert _summary(topo) == ("torchrun", 1, 1, 2, 2, 0, 1, "localhost", 35879)
    assert topo.run_id == "torchrun-23b7f104-5eac-425d-9696-ada6cfa094f1"  # + the launch key


def test_detect_torchrun_multi_node():
    topo = detect(TORCHRUN_NODE1_RANK3)
    assert _summary(topo) == ("torchrun", 3, 1, 4, 2, 1, 2, "127.0.0.1", 29571)
    assert topo.run_id == "torchrun"  # rdzv id "none": only the launch key names the launch


def test_detect_srun_task(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # expand n[1-2] without scontrol
    topo = detect(SRUN_TASK3)
    # No MASTER_ADDR: the first host of the nodelist, and the port derived from the job id.
    assert _summary(topo) == ("slurm", 3, 1, 4, 2, 1, 2, "n1", 10000 + 1000 % 20000)
    assert topo.run_id == "slurm-1000.0"  # each srun step is its own run
    with_master = detect({**SRUN_TASK3, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "12345"})
    assert (with_master.master_addr, with_master.master_port) == ("10.0.0.5", 12345)


def test_detect_sbatch_batch_script_is_single(caplog):
    assert not SlurmEnvironment(SBATCH_BATCH_SCRIPT).in_step()
    with caplog.at_level(logging.INFO, logger="ddpseed.topology"):
        topo = detect(SBATCH_BATCH_SCRIPT)
    assert _summary(topo)[:7] == ("single", 0, 0, 1, 1, 0, 1)
    assert topo.run_id == "slurm-1000.batch"
    assert any(
        "outside srun" in r.getMessage() and "1000" in r.getMessage() for r in caplog.records
    ), caplog.text
    # older Slurm versions and some site wrappers set only the deprecated SLURM_JOBID
    legacy = {k: v for k, v in SBATCH_BATCH_SCRIPT.items() if k != "SLURM_JOB_ID"}
    assert detect(legacy).run_id == "slurm-1000.batch"


def test_detect_torchrun_inside_sbatch_wins():
    assert SlurmEnvironment(TORCHRUN_IN_SBATCH_RANK3).activated()
    topo = detect(TORCHRUN_IN_SBATCH_RANK3)
    assert _summary(topo) == ("torchrun", 3, 1, 4, 2, 1, 2, "127.0.0.1", 29571)
    # The step and the launch: several torchruns can share one step, so the step alone would
    # let one launch's restart continue another's seed (ddpseed.rundir adds the launch key).
    assert topo.run_id == "slurm-1000.0-torchrun-slurm-1000"


def test_detect_plain_python():
    assert _summary(detect({})) == ("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RANK": "4", "WORLD_SIZE": "4"}, "rank 4"),
        ({"RANK": "7", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}, "rank 7"),
        ({"RANK": "1"}, "RANK='1'"),
        ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK='one'"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "world size 0"),
        (
            {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
            "local rank 2",
        ),
        ({**TORCHRUN_NODE1_RANK3, "MASTER_PORT": "70000"}, "70000"),
        ({**SRUN_TASK3, "SLURM_NODEID": "5"}, "SLURM_NODEID=5"),
        ({**SRUN_TASK3, "SLURM_PROCID": "4"}, "rank 4"),
        ({**SRUN_TASK3, "SLURM_STEP_TASKS_PER_NODE": "2(x"}, "2(x"),
    ],
)
def test_detect_rejects_contradictions(env, named, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TopologyError) as info:
        detect(env)
    assert named in str(info.value)


def test_torchrun_environment_activation():
    assert TorchrunEnvironment({"TORCHELASTIC_RUN_ID": "x"}).activated()
    assert not TorchrunEnvironment(SRUN_TASK3).activated()
