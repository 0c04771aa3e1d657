"""Fault suite: real gloo ranks; every live rank must fail fast, say why, and leave nothing.

Each case bounds the run at the configured timeout plus a margin for process start-up (torch
import alone takes seconds on a loaded 2-core machine), and asserts on what each rank printed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from helpers.ranks import RankResult, assert_bounded, run_ranks

SCRIPT = Path(__file__).parent / "helpers" / "fault_rank.py"
TIMEOUT = 20.0
# A failing rank must end within TIMEOUT + BOUND_MARGIN of calling ddpseed (the margin covers
# the absent-rank diagnostics' grace); HANG_CAP only stops a hung case from stalling the suite.
BOUND_MARGIN = 15.0
HANG_CAP = TIMEOUT + 90.0


def run(world: int, fault: str = "none", fault_rank: int = -1, **kw: object) -> list[RankResult]:
    env = {
        "FAULT": fault,
        "FAULT_RANK": str(fault_rank),
        "FAULT_TIMEOUT": str(TIMEOUT),
        **kw.pop("env", {}),
    }  # type: ignore[dict-item]
    token = f"ddpseed-fault-case-{uuid.uuid4().hex}"
    results = run_ranks(
        SCRIPT,
        world,
        timeout=HANG_CAP,
        env=env,
        args=[token],
        **kw,  # type: ignore[arg-type]
    )
    assert_bounded(results, token, TIMEOUT + BOUND_MARGIN)
    return results


def errors_of(results: list[RankResult]) -> dict[int, str]:
    out = {}
    for r in results:
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("DDPSEED_ERROR")]
        idx = r.stderr.find("DDPSEED_ERROR")
        out[r.rank] = r.stderr[idx:] if lines else ""
    return out


def assert_every_live_rank_failed(
    results: list[RankResult], *fragments: str, dead: tuple[int, ...] = ()
) -> dict[int, str]:
    errs = errors_of(results)
    for r in results:
        if r.rank in dead:
            continue
        assert r.returncode == 3, f"rank {r.rank} exit {r.returncode}:\n{r.stderr[-3000:]}"
        for frag in fragments:
            assert frag in errs[r.rank], f"rank {r.rank} lacks {frag!r}:\n{errs[r.rank]}"
    return errs


def test_healthy_job_agrees() -> None:
    results = run(3, env={"DDPSEED_SEED": "5"})
    assert [r.stdout.strip() for r in results] == ["OK 5"] * 3


def test_ranks_started_with_different_world_sizes_stop_at_once_naming_both() -> None:
    """Before: the gloo connect waited for a rank that never came, about five times the
    timeout, then blamed the port (rank 1 says world 3, rank 0 says 2)."""
    results = run(2, per_rank_env={1: {"WORLD_SIZE": "3"}})
    errs = assert_every_live_rank_failed(results, "TopologyError")
    assert "world size 2, rank 1's says 3" in errs[0]
    assert "world size 3, rank 0's says 2" in errs[1]
    assert all(r.elapsed < TIMEOUT / 2 for r in results), [r.elapsed for r in results]


def test_rank_raises_before_setup() -> None:
    results = run(3, "raise", 1)
    assert "user code failed" in results[1].stderr and results[1].returncode == 1
    assert_every_live_rank_failed(results, "CoordinationError", "within 20s", dead=(1,))


def test_rank_sigkilled_before_the_agreement() -> None:
    results = run(3, "kill-before", 2)
    assert results[2].returncode == -9
    assert_every_live_rank_failed(results, "CoordinationError", "seed agreement", dead=(2,))


def test_rank_sigkilled_during_the_agreement() -> None:
    results = run(3, "kill-during", 1)
    assert results[1].returncode == -9
    # The victim's data may already have reached its peers; whatever they saw, no rank hangs.
    for r in results:
        if r.rank != 1:
            assert r.returncode in (0, 3), r.stderr[-2000:]


def test_rank_that_joined_but_never_calls_setup_is_named() -> None:
    results = run(3, "stall", 2)
    assert_every_live_rank_failed(
        results, "CoordinationError", "seed agreement", "rank 2 never reached it", dead=(2,)
    )


def test_rank_zero_never_arrives() -> None:
    results = run(3, ranks=[1, 2])
    assert_every_live_rank_failed(results, "could not reach rank 0", "MASTER_ADDR/MASTER_PORT")


def test_one_rank_uses_another_master_port() -> None:
    # Hold the wrong port bound but not listening for the whole case: connections to it are
    # refused, and no parallel test can start a store there meanwhile.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        wrong = str(held.getsockname()[1])
        results = run(2, per_rank_env={1: {"MASTER_PORT": wrong}})
    errs = assert_every_live_rank_failed(
        results, "CoordinationError", "same MASTER_ADDR/MASTER_PORT"
    )
    assert "could not listen" in errs[0] and "could not reach rank 0" in errs[1]


def test_ranks_given_different_seeds() -> None:
    results = run(
        3,
        per_rank_env={0: {"DDPSEED_SEED": "1"}, 1: {"DDPSEED_SEED": "1"}, 2: {"DDPSEED_SEED": "2"}},
    )
    errs = assert_every_live_rank_failed(
        results,
        "SeedMismatchError",
        "seed 1 (from DDPSEED_SEED) on ranks 0-1",
        "seed 2 (from DDPSEED_SEED) on ranks 2",
    )
    assert len(set(errs.values())) == 1  # one identical message on every rank


def test_seed_set_on_one_node_only() -> None:
    node = {"LOCAL_WORLD_SIZE": "2"}
    per = {
        r: {
            **node,
            "GROUP_RANK": str(r // 2),
            "LOCAL_RANK": str(r % 2),
            **({"DDPSEED_SEED": "9"} if r < 2 else {}),
        }
        for r in range(4)
    }
    results = run(4, per_rank_env=per)
    assert_every_live_rank_failed(
        results, "seed 9 (from DDPSEED_SEED) on ranks 0-1", "no seed on ranks 2-3"
    )


@pytest.mark.parametrize("given_to", [0, 1])
def test_run_dir_given_to_one_rank_only(tmp_path: Path, given_to: int) -> None:
    # Only rank 0 keeps the run record, so rank 0's directory decides for all; before, the
    # ranks without one skipped the record step and left the others waiting in it.
    run_dir = tmp_path / "run"
    results = run(2, per_rank_env={given_to: {"FAULT_RUN_DIR": str(run_dir)}})
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    (seed,) = {r.stdout.split()[-1] for r in results}
    if given_to == 0:
        assert json.loads((run_dir / "seed.json").read_text())["base_seed"] == int(seed)
        assert (run_dir / "manifest.json").exists()
    else:
        assert not run_dir.exists()
    assert "differs from rank 0's" in results[1].stderr
    assert "differs from rank 0's" not in results[0].stderr


def test_an_empty_run_dir_on_one_rank_stops_every_rank_at_once() -> None:
    # Rank 1 used to raise before the agreement, alone: rank 0 waited out its timeout in the
    # rendezvous and then blamed the port.
    results = run(2, per_rank_env={1: {"FAULT_RUN_DIR": ""}})
    assert_every_live_rank_failed(
        results,
        "RunDirError",
        "invalid run directory on 1 of 2 ranks",
        "rank 1: run_dir='' names no directory",
    )
    assert max(r.elapsed for r in results) < TIMEOUT, [r.elapsed for r in results]


@pytest.mark.parametrize("bad", ["-1", str(2**32), "1e3", "abc", ""])
def test_bad_seed_on_one_rank_fails_every_rank(bad: str) -> None:
    results = run(2, per_rank_env={1: {"DDPSEED_SEED": bad}})
    errs = assert_every_live_rank_failed(results, "SeedValueError", "rank 1: DDPSEED_SEED=")
    assert "[0, 2**32)" in errs[0]


def _saved(tmp_path: Path) -> Path:
    results = run(2, "save", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(tmp_path / "rng.pt")})
    assert all(r.returncode == 0 for r in results), results[0].stderr[-2000:]
    return tmp_path / "rng.pt"


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "foreign", "missing"])
def test_bad_state_file_on_one_rank_stops_every_rank(tmp_path: Path, damage: str) -> None:
    path = _saved(tmp_path)
    victim = tmp_path / "rng.rank1.1.pt"
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "corrupted":
        # Flip bytes inside the stored tensors (not the zip directory): only the digest sees it.
        blob = bytearray(data)
        at = data.find(b"data/0") + 200
        blob[at : at + 8] = bytes(b ^ 0xFF for b in blob[at : at + 8])
        victim.write_bytes(bytes(blob))
    elif damage == "foreign":
        torch.save({"model": torch.zeros(3)}, victim)
    else:
        victim.unlink()
    results = run(2, "load", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(path)})
    expected = {
        "truncated": "truncated or not a ddpseed state file",
        "corrupted": "",
        "foreign": "is not a ddpseed state file",
        "missing": "does not exist",
    }[damage]
    assert_every_live_rank_failed(
        results,
        "StateError",
        "failed on 1 of 2 ranks",
        f"rank 1: state file {victim}" if damage != "foreign" else f"rank 1: {victim}",
        expected,
    )


def test_state_from_another_seed_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    results = run(2, "load", env={"DDPSEED_SEED": "5", "FAULT_STATE": str(path)})
    assert_every_live_rank_failed(results, "saved with base seed 4 but this run has 5")


def test_state_from_another_world_size_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    shutil.copy(tmp_path / "rng.rank0.1.pt", tmp_path / "rng.rank2.1.pt")
    results = run(3, "load", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(path)})
    # The commit record names the saving world: refused before any rank file is read.
    assert_every_live_rank_failed(results, "save 1 was written by 2 ranks but this job has 3")
    assert_every_live_rank_failed(results, "or pass elastic=True to ddpseed.load_state")
    # A record edited to claim 3 ranks: the rank files themselves still say 2.
    record = path.with_name("rng.commit.json")
    record.write_text(json.dumps({**json.loads(record.read_text()), "world_size": 3}))
    results = run(3, "load", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(path)})
    assert_every_live_rank_failed(results, "saved with world size 2 but this run has 3")


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 1 MiB tmpfs of this test's own (root only), unmounted afterwards."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to make a tiny filesystem")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {made.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs: Path) -> None:
    with open(fs / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_state_write_failure_keeps_the_previous_file(small_fs: Path, how: str) -> None:
    path = small_fs / "rng.pt"
    results = run(2, "save", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(path)})
    assert all(r.returncode == 0 for r in results), results[0].stderr[-2000:]
    good = (small_fs / "rng.rank1.1.pt").read_bytes()
    if how == "full":
        _fill(small_fs)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    results = run(2, "save", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(path)})
    reason = "No space left on device" if how == "full" else "Read-only file system"
    assert_every_live_rank_failed(
        results,
        "StateError",
        "could not write rank",
        reason,
        "the previous complete checkpoint (save 1) is intact and still loads",
    )
    assert (small_fs / "rng.rank1.1.pt").read_bytes() == good
    assert not [p for p in small_fs.iterdir() if p.name.endswith(".tmp")]
    if how == "full":
        (small_fs / "filler").unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    results = run(2, "load", env={"DDPSEED_SEED": "4", "FAULT_STATE": str(path)})
    assert [r.stdout.strip() for r in results] == ["OK 4"] * 2, results[0].stderr[-2000:]


@pytest.mark.parametrize("how", ["full", "read-only"])
def test_manifest_write_failure_stops_every_rank(small_fs: Path, how: str) -> None:
    run_dir = small_fs / "run"
    results = run(2, env={"DDPSEED_SEED": "4", "FAULT_RUN_DIR": str(run_dir)})
    assert all(r.returncode == 0 for r in results), results[0].stderr[-2000:]
    before = (run_dir / "manifest.json").read_bytes()
    if how == "full":
        _fill(small_fs)  # this attempt's manifest must be written, and there is no room for it
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    results = run(2, env={"DDPSEED_SEED": "4", "FAULT_RUN_DIR": str(run_dir)})
    errs = assert_every_live_rank_failed(results, "StateError")
    for rank in (0, 1):  # rank 0's own reason reaches rank 1 too
        assert "rank 0 could not use the run record" in errs[rank]
        assert "could not write manifest" in errs[rank]
    assert (run_dir / "manifest.json").read_bytes() == before
