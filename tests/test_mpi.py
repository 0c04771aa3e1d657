"""Real MPI launches: Open MPI's ``mpirun`` and MPICH's ``mpiexec`` start ``ddpseed.setup``.

Open MPI (``openmpi-bin``) and MPICH (``mpich``) are Debian packages installed by the session
fixtures in tests/conftest.py when missing (file-locked apt-get, like Slurm); both install
side by side. No rendezvous variable is exported: on one node ddpseed uses loopback and a
port derived from the launch (Open MPI's job id; the node's Hydra proxy for MPICH), so tests
running in parallel do not collide, and the ports lie below the kernel's ephemeral range that
the other tests' ``free_port`` draws from.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from helpers.netns import IFNAME, Host
from helpers.procs import REPO, ProcessGroup

RANK_SCRIPT = REPO / "tests" / "helpers" / "mpi_rank.py"
MARKER = "MPI_RANK "
OMPI_FLAGS = ("--allow-run-as-root", "--oversubscribe")


def launch(
    procs: ProcessGroup,
    name: str,
    cmd: Sequence[str],
    env: dict[str, str],
    world: int,
    timeout: float = 180,
) -> list[dict[str, Any]]:
    """Run ``cmd`` to the end; the ``MPI_RANK`` report of every rank, by rank."""
    proc = procs.start(name, cmd, env)
    code, output = procs.wait_all(timeout)[proc.name]
    assert code == 0, f"{name} exited {code}:\n{output[-6000:]}"
    decoder = json.JSONDecoder()
    reports = [decoder.raw_decode(part)[0] for part in output.split(MARKER)[1:]]
    assert sorted(r["rank"] for r in reports) == list(range(world)), output[-6000:]
    return sorted(reports, key=lambda r: r["rank"])


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object in ``text``: mpirun forwards the ranks' output in chunks, so two ranks'
    lines can share one line of its own output."""
    found, decoder, at = [], json.JSONDecoder(), text.find("{")
    while at >= 0:
        obj, end = decoder.raw_decode(text, at)
        found.append(obj)
        at = text.find("{", end)
    return found


def check_world(reports: Sequence[dict[str, Any]], launcher: str, world: int) -> None:
    """One node, ``world`` ranks, one base seed, distinct process seeds, one rendezvous."""
    brief = [(r["rank"], r["local_rank"], r["launcher"], r["base_seed"]) for r in reports]
    for r in reports:
        assert r["launcher"] == launcher, brief
        assert (r["world_size"], r["local_world_size"]) == (world, world), r
        assert (r["node_rank"], r["num_nodes"]) == (0, 1), r
        assert r["local_rank"] == r["rank"], brief
        assert r["master_addr"] == "127.0.0.1", r
    assert len({r["base_seed"] for r in reports}) == 1, brief
    assert len({r["process_seed"] for r in reports}) == world, brief
    assert len({r["master_port"] for r in reports}) == 1, brief
    assert 10000 <= reports[0]["master_port"] < 30000, reports[0]["master_port"]


def resume_round(
    procs: ProcessGroup,
    tmp_path: Path,
    command: Callable[[str], list[str]],
    env: Callable[..., dict[str, str]],
    launcher: str,
    world: int,
) -> None:
    """Full run (entropy seed) vs. the same seed stopped after 6 batches, saved, resumed."""
    full = launch(procs, "full", command("full"), env(MODE="full"), world)
    check_world(full, launcher, world)
    assert full[0]["seed_source"] == "entropy", full[0]
    seed = str(full[0]["base_seed"])
    state = str(tmp_path / "state" / "rng.pt")
    part = launch(
        procs,
        "save",
        command("save"),
        env(MODE="save", STOP_AT="6", STATE=state, DDPSEED_SEED=seed),
        world,
    )
    rest = launch(
        procs,
        "resume",
        command("resume"),
        env(MODE="resume", STATE=state, DDPSEED_SEED=seed),
        world,
    )
    check_world(rest, launcher, world)
    per_epoch = math.ceil(math.ceil(40 / world) / 3)  # batches of 3 from one rank's shard
    for a, b, c in zip(full, part, rest, strict=True):
        assert len(a["seen"]) == 2 * per_epoch, a["seen"]
        assert b["seen"] == a["seen"][:6], (a["rank"], b["seen"], a["seen"])
        assert c["seen"] == a["seen"][6:], (a["rank"], c["seen"], a["seen"])
    epoch0 = {i for r in full for epoch, batch, _ in r["seen"] if epoch == 0 for i in batch}
    assert epoch0 == set(range(40)), "the ranks' epoch-0 shards cover the data"


@pytest.mark.timeout(600)
def test_openmpi_mpirun_four_ranks_agree_and_resume_exactly(
    openmpi_installed: str,
    procs: ProcessGroup,
    launch_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    def command(mode: str) -> list[str]:
        return [openmpi_installed, *OMPI_FLAGS, "-np", "4", sys.executable, str(RANK_SCRIPT)]

    resume_round(procs, tmp_path, command, launch_env, "openmpi", 4)


@pytest.mark.timeout(600)
def test_mpich_mpiexec_three_ranks_agree_and_resume_exactly(
    mpich_installed: str,
    procs: ProcessGroup,
    launch_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    def command(mode: str) -> list[str]:
        return [mpich_installed, "-n", "3", sys.executable, str(RANK_SCRIPT)]

    resume_round(procs, tmp_path, command, launch_env, "mpich", 3)


def test_two_concurrent_mpiruns_on_one_node_get_different_ports(
    openmpi_installed: str, procs: ProcessGroup, launch_env: Callable[..., dict[str, str]]
) -> None:
    """Two jobs at once on one node: each derives its own port from its job id."""
    cmd = [openmpi_installed, *OMPI_FLAGS, "-np", "2", sys.executable, "-m", "ddpseed", "env"]
    for name in ("a", "b"):
        procs.start(name, [*cmd, "--json"], launch_env())
    results = procs.wait_all(120)
    ports = set()
    for code, output in results.values():
        assert code == 0, output
        tops = json_objects(output)
        assert [t["launcher"] for t in tops] == ["openmpi", "openmpi"], output
        assert len({t["master_port"] for t in tops}) == 1, output
        ports.add(tops[0]["master_port"])
    assert len(ports) == 2, f"two mpiruns derived the same port: {results}"


def test_launch_script_mpirun_runs_verify_on_one_node(
    openmpi_installed: str, procs: ProcessGroup, launch_env: Callable[..., dict[str, str]]
) -> None:
    env = launch_env(MPIRUN=openmpi_installed, DDPSEED_SEED=77, PYTHON=sys.executable)
    proc = procs.start("script", [str(REPO / "launch" / "mpirun.sh"), "--np", "2"], env)
    code, output = procs.wait_all(180)[proc.name]
    assert code == 0, output[-6000:]
    assert "all 2 ranks agree on base seed 77" in output, output[-6000:]


# --- two "hosts": network namespaces (conftest's netns_pair) ----------------------------------

NSRSH = """#!/bin/sh
# rsh/ssh agent for namespace "hosts" (Open MPI's plm_rsh_agent, Hydra's -launcher-exec): run
# the remote daemon in the host's namespace. Leading options (ssh's -x) are dropped.
while [ "${{1#-}}" != "$1" ]; do shift; done
host=$1; shift
case $host in
{cases}
    *) echo "nsrsh: unknown host $host" >&2; exit 1 ;;
esac
exec ip netns exec "$ns" sh -c "$*"
"""


def across_namespaces(
    hosts: Sequence[Host], tmp_path: Path, flavour: str = "openmpi"
) -> tuple[list[str], str]:
    """``ip netns exec <first host>`` and the mpirun options that reach the second host
    through an rsh agent (no ssh), over the namespaces' own interface only."""
    agent = tmp_path / "nsrsh"
    cases = "\n".join(f"    {h.addr}) ns={h.ns} ;;" for h in hosts)
    agent.write_text(NSRSH.format(cases=cases))
    agent.chmod(0o755)
    if flavour == "mpich":
        extra = (
            f"-launcher ssh -launcher-exec {agent} -iface {IFNAME} -genv PYTHONPATH {REPO} "
            f"-genv GLOO_SOCKET_IFNAME {IFNAME}"
        )
    else:
        extra = (
            f"--mca plm_rsh_agent {agent} --mca oob_tcp_if_include {IFNAME} "
            f"--mca btl_tcp_if_include {IFNAME} -x PYTHONPATH -x PATH -x GLOO_SOCKET_IFNAME"
        )
    return ["ip", "netns", "exec", hosts[0].ns], extra


@pytest.mark.netns
@pytest.mark.timeout(300)
@pytest.mark.parametrize("flavour", ["openmpi", "mpich"])
def test_mpirun_script_across_two_namespace_hosts(
    flavour: str,
    request: pytest.FixtureRequest,
    netns_pair: tuple[Host, Host],
    procs: ProcessGroup,
    launch_env: Callable[..., dict[str, str]],
    tmp_path: Path,
    verify_reports: Callable[[str], list[dict[str, Any]]],
    verify_checker: Callable[..., None],
) -> None:
    """launch/mpirun.sh --hosts a:2,b:2 with Open MPI's mpirun and MPICH's mpiexec: rank 0's
    host becomes MASTER_ADDR; 2 nodes x 2 ranks agree."""
    mpirun = request.getfixturevalue(f"{flavour}_installed")
    prefix, extra = across_namespaces(netns_pair, tmp_path, flavour)
    hosts = ",".join(f"{h.addr}:2" for h in netns_pair)
    env = launch_env(
        MPIRUN=mpirun,
        MPIRUN_EXTRA_ARGS=extra,
        GLOO_SOCKET_IFNAME=IFNAME,
        DDPSEED_SEED=11,
        PYTHON=sys.executable,
    )
    cmd = [*prefix, str(REPO / "launch" / "mpirun.sh"), "--hosts", hosts]
    proc = procs.start("mpirun", [*cmd, sys.executable, "-m", "ddpseed", "verify", "--json"], env)
    code, output = procs.wait_all(240)[proc.name]
    assert code == 0, output[-6000:]
    reports = verify_reports(output)
    verify_checker(reports, nodes=2, per_node=2, launcher=flavour, seed=11)
    assert reports[0]["master_addr"] == netns_pair[0].addr, reports[0]


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_bare_mpirun_across_hosts_fails_on_every_rank_saying_what_to_export(
    openmpi_installed: str,
    netns_pair: tuple[Host, Host],
    procs: ProcessGroup,
    launch_env: Callable[..., dict[str, str]],
    tmp_path: Path,
) -> None:
    prefix, extra = across_namespaces(netns_pair, tmp_path)
    hosts = ",".join(f"{h.addr}:2" for h in netns_pair)
    cmd = [*prefix, openmpi_installed, *OMPI_FLAGS, *extra.split(), "--host", hosts]
    proc = procs.start("mpirun", [*cmd, sys.executable, "-m", "ddpseed", "env"], launch_env())
    code, output = procs.wait_all(240)[proc.name]
    assert code != 0, output[-6000:]
    for rank in range(4):
        assert f"rank {rank}: openmpi started 4 processes over several nodes" in output, output
    assert "export MASTER_ADDR" in output
