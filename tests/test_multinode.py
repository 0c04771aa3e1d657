"""Real multi-node runs: two hosts as Linux network namespaces joined through a bridge.

Each "host" is a network namespace with one interface, ``ddp0``, holding an address of a /24
that exists only inside the namespaces (plus ``lo``), built by launch/lib.sh as
local_multinode.sh builds its nodes. ``launch/torchrun_multi_node.sh``
runs in each through ``ip netns exec``, so the ranks of node 1 reach node 0 over a real
interface, exactly as on two machines. No traffic leaves the namespaces or loopback.

Also here: launch/local_multinode.sh (both modes), launch/torchrun_single_node.sh, and the
torchrun command lines the launch scripts build (--dry-run, no processes started).
"""

from __future__ import annotations

import subprocess

import pytest

from helpers.netns import IFNAME, Host, _ip, _netns_unavailable
from helpers.procs import REPO, clean_env

LAUNCH = REPO / "launch"


def _start_node(
    procs,
    launch_env,
    host: Host,
    node_rank: int,
    master: Host,
    port: int,
    rdzv: str,
    command: list[str],
    **extra: object,
) -> None:
    env = launch_env(
        NODE_RANK=node_rank,
        MASTER_ADDR=master.addr,
        MASTER_PORT=port,
        RDZV=rdzv,
        RUN_ID=host.ns.rsplit("-", 1)[0],
        LOCAL_ADDR=host.addr,
        GLOO_SOCKET_IFNAME=IFNAME,
        **extra,
    )
    cmd = [
        "ip",
        "netns",
        "exec",
        host.ns,
        str(LAUNCH / "torchrun_multi_node.sh"),
        "--nnodes=2",
        "--nproc_per_node=2",
        *command,
    ]
    procs.start(f"node{node_rank}", cmd, env)


@pytest.mark.netns
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_two_hosts_agree(
    netns_pair,
    rdzv,
    procs,
    launch_env,
    free_port,
    verify_command,
    verify_reports,
    verify_checker,
):
    node0, node1 = netns_pair
    for rank, host in enumerate(netns_pair):
        _start_node(
            procs, launch_env, host, rank, node0, free_port, rdzv, verify_command, DDPSEED_SEED=4321
        )
    results = procs.wait_all(timeout=120)
    assert all(rc == 0 for rc, _ in results.values()), procs.dump()

    output = "\n".join(out for _, out in results.values())
    reports = verify_reports(output)
    verify_checker(
        reports, nodes=2, per_node=2, launcher="torchrun", seed=4321, static_nodes=rdzv == "static"
    )
    if rdzv == "static":
        # Node 0's torchrun hosts the store at its namespace address; every rank used it.
        assert {(r["master_addr"], r["master_port"]) for r in reports} == {(node0.addr, free_port)}
    else:
        # c10d: the workers' store lives on whichever agent became node 0, at its LOCAL_ADDR.
        assert {r["master_addr"] for r in reports} <= {node0.addr, node1.addr}


@pytest.mark.netns
def test_disagreeing_seeds_fail_on_every_node(
    netns_pair, procs, launch_env, free_port, verify_command
):
    node0, _ = netns_pair
    for rank, host in enumerate(netns_pair):
        _start_node(
            procs,
            launch_env,
            host,
            rank,
            node0,
            free_port,
            "static",
            verify_command,
            DDPSEED_SEED=100 + rank,
        )
    results = procs.wait_all(timeout=120)
    assert all(rc != 0 for rc, _ in results.values()), procs.dump()


@pytest.mark.parametrize("mode", [pytest.param("netns", marks=pytest.mark.netns), "loopback"])
def test_local_multinode_script(
    mode, procs, launch_env, free_port, verify_command, verify_reports, verify_checker
):
    if mode == "netns":
        reason = _netns_unavailable()
        if reason:
            pytest.skip(reason)
    cmd = [
        str(LAUNCH / "local_multinode.sh"),
        f"--mode={mode}",
        "--nnodes=2",
        "--nproc-per-node=2",
        f"--master-port={free_port}",
        "--seed=99",
        "--",
        *verify_command,
    ]
    procs.start("local", cmd, launch_env())
    rc, output = procs.wait_all(timeout=120)["local"]
    assert rc == 0, output[-6000:]
    assert f"{mode} mode" in output
    verify_checker(verify_reports(output), nodes=2, per_node=2, launcher="torchrun", seed=99)
    if mode == "netns":
        assert "rendezvous at 10." in output  # node 0's namespace address, not loopback
        leftover = _ip("netns", "list").stdout
        assert f"ddps{procs.procs[0].popen.pid}" not in leftover, leftover


@pytest.mark.parametrize("port", ["standalone", "fixed"])
def test_single_node_script(
    port, procs, launch_env, free_port, verify_command, verify_reports, verify_checker
):
    env = launch_env(NPROC_PER_NODE=2, DDPSEED_SEED=11)
    if port == "fixed":
        env["MASTER_PORT"] = str(free_port)
    procs.start("single", [str(LAUNCH / "torchrun_single_node.sh"), *verify_command], env)
    rc, output = procs.wait_all(timeout=90)["single"]
    assert rc == 0, output[-6000:]
    reports = verify_reports(output)
    verify_checker(reports, nodes=1, per_node=2, launcher="torchrun", seed=11)
    if port == "fixed":
        assert {r["master_port"] for r in reports} == {free_port}


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAUNCH / script), "--dry-run", *args],
        env=clean_env({"NPROC_PER_NODE": 2, **env}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, "python3 -m torch.distributed.run --nnodes=1 --nproc-per-node=2 --node-rank=0 "
         "--master-addr=127.0.0.1 --master-port=29500 --module ddpseed verify"),
        (("--nnodes=2", "--node_rank", "1", "/venv/bin/python3", "train.py", "--lr", "0.1"),
         {"MASTER_ADDR": "node0"},
         "/venv/bin/python3 -m torch.distributed.run --nnodes=2 --nproc-per-node=2 "
         "--node-rank=1 --master-addr=node0 --master-port=29500 train.py --lr 0.1"),
        (("--rdzv=c10d", "--nnodes=1:4", "-m", "pkg.train"),
         {"RUN_ID": "exp", "MASTER_ADDR": "10.1.1.1", "LOCAL_ADDR": "10.1.1.1"},
         "--nnodes=1:4 --nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=10.1.1.1:29500 "
         "--rdzv-id=exp --rdzv-conf=is_host=true --local-addr=10.1.1.1 --module pkg.train"),
        (("--", "./bench", "-x"), {"TORCHRUN_EXTRA_ARGS": "--max-restarts=2"},
         "--max-restarts=2 --no-python ./bench -x"),
    ],
)  # fmt: skip
def test_multi_node_script_builds_torchrun_command(args, env, expected):
    done = _dry_run("torchrun_multi_node.sh", *args, **env)
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout, done.stdout
    assert "PYTHONHASHSEED=0" in done.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--node-rank=2", "--nnodes=2"), {}, "NODE_RANK=2 is not in [0, NNODES=2)"),
        (("--nnodes=1:2",), {}, "needs RDZV=c10d"),
        (("--master-port=70000",), {}, "MASTER_PORT=70000"),
        (("--seed=-3",), {}, "DDPSEED_SEED=-3"),
        (("--seed=4294967296",), {}, "DDPSEED_SEED=4294967296 is not an integer in [0, 2**32)"),
        (("--rdzv=etcd",), {}, "RDZV=etcd"),
        (("--bogus=1",), {}, "unknown option --bogus"),
        (("--nnodes",), {}, "--nnodes needs a value"),
        ((), {"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE=0"),
    ],
)
def test_multi_node_script_rejects_bad_settings(args, env, message):
    done = _dry_run("torchrun_multi_node.sh", *args, **env)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr, done.stderr


def test_single_node_script_dry_run():
    done = _dry_run("torchrun_single_node.sh", "--seed", "5", "python", "-m", "ddpseed", "verify")
    assert done.returncode == 0, done.stderr
    assert "--nproc-per-node=2 --standalone --module ddpseed verify" in done.stdout
    assert "DDPSEED_SEED=5" in done.stderr


def test_single_node_script_passes_the_seed_as_the_library_reads_it():
    done = _dry_run("torchrun_single_node.sh", "--seed", "0007", "train.py")
    assert done.returncode == 0, done.stderr
    assert "DDPSEED_SEED=7" in done.stderr, done.stderr


def test_local_multinode_dry_run_prints_every_node_command():
    done = _dry_run(
        "local_multinode.sh", "--mode=loopback", "--nnodes=3", "--master-port=2345", "--seed=9",
        "--", "-m", "pkg.train",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "ddpseed dry run:" in line]
    assert len(lines) == 3, done.stdout
    for rank, line in enumerate(lines):
        assert line.startswith(f"[node{rank}] "), line
        assert f"--nnodes=3 --nproc-per-node=2 --node-rank={rank} --master-addr=127.0.0.1 " \
            "--master-port=2345 --module pkg.train" in line, line  # fmt: skip
    assert "DDPSEED_SEED=9" in done.stdout


def test_local_multinode_failing_node_fails_the_run(procs, launch_env, free_port):
    cmd = [str(LAUNCH / "local_multinode.sh"), "--mode=loopback", f"--master-port={free_port}",
           "--", "/bin/false"]  # fmt: skip
    procs.start("local", cmd, launch_env())
    rc, output = procs.wait_all(timeout=60)["local"]
    assert rc != 0, output[-4000:]
    assert "stopping the others" in output
