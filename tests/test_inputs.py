"""Inputs ddpseed must refuse by name instead of hanging, crashing or carrying on (issue 12).

Timeouts, seed strings, Slurm nodelists, state paths that are not regular files, the rank
prefix of errors shared between ranks, and checkpoint paths and commit records that are no
checkpoint's. Multi-rank cases run real gloo processes (as in
tests/test_faults.py) and assert every rank's exit status, message and time to fail.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ddpseed
from ddpseed.commit import COMMIT_FORMAT, commit_path, read_commit_record, state_path
from ddpseed.derivation import SEED_SPACE, validate_seed
from ddpseed.errors import DDPSeedError, SeedValueError, StateError, TopologyError
from ddpseed.files import atomic_write_bytes
from ddpseed.hostlist import expand_hostlist
from ddpseed.payload import read_state
from ddpseed.topology import detect
from helpers.procs import REPO, clean_env, processes_carrying, without_launcher
from helpers.ranks import RankResult, run_ranks

SCRIPT = Path(__file__).parent / "helpers" / "input_rank.py"
TIMEOUT = 20.0
# A refused input must be refused before any network wait: well inside this bound.
PROMPT = 5.0
# Only stops a hung case (the bug being tested) from stalling the suite.
HANG_CAP = 60.0
DOUBLED = re.compile(r"rank \d+: rank \d+:")


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In-process cases are a world of one whatever launched the suite."""
    for name in set(os.environ) - set(without_launcher(os.environ)):
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def run(world: int, **kw: object) -> list[RankResult]:
    token = f"ddpseed-input-case-{uuid.uuid4().hex}"
    env = {"INPUT_TOKEN": token, **kw.pop("env", {})}  # type: ignore[dict-item]
    results = run_ranks(SCRIPT, world, timeout=HANG_CAP, env=env, **kw)  # type: ignore[arg-type]
    assert processes_carrying(token) == [], "a rank process outlived its case"
    return results


def setup_env(**kwargs: object) -> dict[str, str]:
    return {"INPUT_SETUP": json.dumps(kwargs)}


def elapsed(r: RankResult) -> float:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("ELAPSED ")]
    assert lines, f"rank {r.rank} printed no ELAPSED line:\n{r.stderr[-3000:]}"
    return float(lines[-1].split()[1])


def error_of(r: RankResult) -> str:
    assert "test harness" not in r.stderr, f"rank {r.rank} hung:\n{r.stderr[-3000:]}"
    assert r.returncode == 3, f"rank {r.rank} exit {r.returncode}:\n{r.stderr[-3000:]}"
    at = r.stderr.find("DDPSEED_ERROR ")
    assert at >= 0, r.stderr[-3000:]
    return r.stderr[at:]


def no_doubled_prefix(text: str) -> None:
    bad = [line for line in text.splitlines() if DOUBLED.search(line)]
    assert not bad, f"rank prefix repeated: {bad}"


# --- 1. timeouts ----------------------------------------------------------------------------

BAD_TIMEOUTS = [math.inf, 0, -1, math.nan]


@pytest.mark.parametrize("bad", BAD_TIMEOUTS, ids=str)
def test_bad_timeout_is_refused_before_any_collective(bad: float) -> None:
    """Only rank 1 of 2 runs: any rendezvous would wait for rank 0 (forever, for inf)."""
    (r,) = run(2, ranks=[1], env=setup_env(seed=1, timeout=bad))
    err = error_of(r)
    assert err.startswith("DDPSEED_ERROR ArgumentError: rank 1: "), err
    assert f"timeout={bad!r}" in err and "finite number of seconds" in err, err
    assert "MASTER_ADDR" not in err and "rank 0" not in err, err  # nothing blames the network
    assert elapsed(r) < PROMPT, err


@pytest.mark.parametrize("bad", [0, math.inf], ids=str)
def test_bad_timeout_with_the_scripts_own_group_fails_every_rank(bad: float) -> None:
    results = run(2, env={**setup_env(seed=1, timeout=bad), "INPUT_OWN_GROUP": "60"})
    for r in results:
        err = error_of(r)
        assert f"ArgumentError: rank {r.rank}: timeout={bad!r}" in err, err
        assert elapsed(r) < PROMPT, err


_NOT_SECONDS = [math.inf, 0, -1, math.nan, -math.inf, 1e10, "30", True, timedelta(seconds=30)]


@pytest.mark.parametrize(
    ("name", "bad"),
    [("timeout", b) for b in [*_NOT_SECONDS, None]] + [("pg_timeout", b) for b in _NOT_SECONDS],
    ids=repr,
)
def test_timeout_values_in_one_process(name: str, bad: object) -> None:
    """A world of one makes no collective, so before the fix these passed silently."""
    with pytest.raises(ddpseed.ArgumentError) as info:
        ddpseed.setup(seed=1, **{name: bad})
    assert isinstance(info.value, ValueError) and isinstance(info.value, DDPSeedError)
    message = str(info.value)
    assert message.startswith("rank 0: ") and f"{name}={bad!r}" in message, message
    assert "seconds" in message and "e.g." in message, message


@pytest.mark.parametrize(
    ("kwargs", "own_group", "expected"),
    [
        ({}, None, torch.distributed.default_pg_timeout.total_seconds()),
        ({"pg_timeout": 123.0}, None, 123.0),
        ({}, "45", 45.0),
        ({"pg_timeout": 77.0}, "45", 77.0),
    ],
    ids=["created-default", "created-chosen", "own-kept", "own-chosen"],
)
def test_process_group_timeout_is_torchs_default_unless_chosen(
    kwargs: dict[str, float], own_group: str | None, expected: float
) -> None:
    """The setup timeout (20 s here) bounds ddpseed's own collectives, not the training's."""
    env = setup_env(seed=1, timeout=TIMEOUT, **kwargs)
    if own_group:
        env["INPUT_OWN_GROUP"] = own_group
    results = run(2, env=env)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank}:\n{r.stderr[-3000:]}"
        assert f"PG_TIMEOUT {expected}\n" in r.stdout, (r.rank, r.stdout)


def test_group_creation_stays_bounded_by_the_setup_timeout() -> None:
    """A rank that dies between the rendezvous and its gloo connection must not leave rank 0
    waiting for torch's 30-minute group timeout: creation is bounded by ``timeout``."""
    results = run(
        2, env=setup_env(seed=1, timeout=10.0), per_rank_env={1: {"INPUT_DIE_IN_INIT": "1"}}
    )
    assert results[1].returncode == -9, results[1].stderr[-3000:]
    err = error_of(results[0])
    assert "CoordinationError: rank 0" in err and "within 10s" in err, err
    assert elapsed(results[0]) < 10.0 + 15.0, err


# --- 2. seed strings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "\u00b2",  # superscript two: str.isdigit() is True, int() refuses it
        "\u0663",  # Arabic-Indic three: int() would take it as 3
        "\uff11\uff12",  # fullwidth 12
        "+\u00b2",
        "9" * 10_000,  # beyond Python's int max-str-digits limit
        "-" + "9" * 10_000,
        "x" * 10_000,
    ],
    ids=lambda v: repr(v[:12]) + f"(len {len(v)})",
)
def test_seed_strings_outside_ascii_digits_are_refused_by_name(bad: str) -> None:
    with pytest.raises(SeedValueError) as info:
        validate_seed(bad, source="DDPSEED_SEED")
    message = str(info.value)
    assert message.startswith("DDPSEED_SEED="), message
    assert len(message) < 300, f"huge value not abbreviated: {len(message)} characters"
    assert "[0, 2**32)" in message and "e.g." in message, message
    if len(bad) > 100:
        assert f"{len(bad)} characters" in message, message
    else:
        assert repr(bad) in message, message


def test_seed_strings_of_ascii_digits_are_accepted() -> None:
    assert validate_seed(" +42\n", source="DDPSEED_SEED") == 42
    assert validate_seed("0" * 9_999 + "7", source="DDPSEED_SEED") == 7  # leading zeros only
    assert validate_seed(str(SEED_SPACE - 1), source="DDPSEED_SEED") == SEED_SPACE - 1


def test_huge_integer_seed_is_refused_by_name() -> None:
    with pytest.raises(SeedValueError) as info:
        validate_seed(10**5000, source="seed")
    message = str(info.value)
    assert "5001 digits" in message and "[0, 2**32)" in message and len(message) < 300, message


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(), st.text(string.digits + "+- \u00b2\u0663", max_size=30)))
def test_any_seed_string_is_a_seed_or_a_seed_value_error(value: str) -> None:
    try:
        seed = validate_seed(value, source="DDPSEED_SEED")
    except SeedValueError as exc:
        assert "DDPSEED_SEED=" in str(exc)
        return
    assert 0 <= seed < SEED_SPACE
    assert re.fullmatch(r"\s*[+-]?[0-9]+\s*", value), value


def test_unicode_digit_seed_on_one_rank_fails_every_rank_with_one_prefix() -> None:
    results = run(2, per_rank_env={1: {"DDPSEED_SEED": "\u00b2"}}, env=setup_env(timeout=TIMEOUT))
    for r in results:
        err = error_of(r)
        assert "SeedValueError: invalid seed on 1 of 2 ranks" in err, err
        assert "rank 1: DDPSEED_SEED='\u00b2' is not a decimal integer" in err, err
        no_doubled_prefix(err)
        assert elapsed(r) < TIMEOUT, err


# --- 3. Slurm nodelists -----------------------------------------------------------------------

SRUN_TASK = {
    "SLURM_JOB_ID": "77",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_TASKS_PER_NODE": "2",
}


@pytest.mark.parametrize(
    "bad", [",", ",,", " , ", "a,,b", ",n1", "n1,", "n[1-2],", "n 1", "n\x001"]
)
@pytest.mark.parametrize("var", ["SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST"])
def test_malformed_nodelist_names_variable_value_and_fix(var: str, bad: str) -> None:
    with pytest.raises(TopologyError) as info:
        detect({**SRUN_TASK, var: bad})
    message = str(info.value)
    assert message.startswith("rank 1: "), message
    assert f"{var}={bad!r}" in message and "hostlist" in message, message
    assert "srun" in message, message  # the fix: let Slurm set it


@pytest.mark.parametrize("blank", ["", "  "])
def test_empty_nodelist_variable_is_refused(blank: str) -> None:
    with pytest.raises(TopologyError) as info:
        detect({**SRUN_TASK, "SLURM_JOB_NODELIST": blank})
    assert f"SLURM_JOB_NODELIST={blank!r}" in str(info.value), str(info.value)


def test_missing_nodelist_still_defaults_to_this_host() -> None:
    assert detect(SRUN_TASK).master_addr == "127.0.0.1"


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(
        st.text(),
        st.text("ab01-9[],- \t\n", max_size=24),
        st.lists(st.sampled_from(["n", "n[", "]", "1", "-", "2", ",", "[1-3]", "0"])).map("".join),
    )
)
def test_any_nodelist_is_hosts_or_a_topology_error(text: str) -> None:
    try:
        hosts = expand_hostlist(text, use_scontrol=False, var="SLURM_JOB_NODELIST")
    except TopologyError as exc:
        assert "SLURM_JOB_NODELIST=" in str(exc)
        return
    assert hosts and all(isinstance(h, str) and h.strip() == h and h for h in hosts), hosts
    assert all(h.isprintable() and not any(c in h for c in "[],") for h in hosts), hosts


# --- 4. state paths that are not regular files ------------------------------------------------

_LOAD_FIFO = """
import os, sys
import ddpseed
plan = ddpseed.setup(seed=3)
try:
    ddpseed.load_state(sys.argv[1], plan)
except ddpseed.StateError as exc:
    print("STATE_ERROR", exc)
"""


@pytest.mark.parametrize("at", ["commit record", "state file"])
def test_fifo_at_a_checkpoint_path_is_refused_without_opening_it(tmp_path: Path, at: str) -> None:
    if at == "commit record":
        fifo = commit_path(tmp_path / "rng.pt")
    else:
        commit_path(tmp_path / "rng.pt").write_text(
            json.dumps({"format": COMMIT_FORMAT, "save": 1, "world_size": 1})
        )
        fifo = state_path(tmp_path / "rng.pt", 0, 1)
    os.mkfifo(fifo)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_FIFO, str(tmp_path / "rng.pt")],
            env=clean_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=HANG_CAP,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("load_state blocked opening a FIFO at the state path")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"STATE_ERROR load_state('{tmp_path / 'rng.pt'}') failed on 1 of 1 ranks" in done.stdout
    assert f"rank 0: {at} {fifo} is not a regular file (a FIFO)" in done.stdout
    no_doubled_prefix(done.stdout)


def _special(tmp_path: Path, kind: str) -> Path:
    path = state_path(tmp_path / "rng.pt", 0, 1)
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["directory"])
def test_non_regular_state_path_is_refused_on_read(tmp_path: Path, kind: str) -> None:
    # (The FIFO case runs in a subprocess above: a regression would block this one forever.)
    path = _special(tmp_path, kind)
    with pytest.raises(StateError) as info:
        read_state(tmp_path / "rng.pt", 0, 1)
    assert f"state file {path} is not a regular file (a {kind})" in str(info.value)


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_file_is_never_replaced_by_a_write(tmp_path: Path, kind: str) -> None:
    path = _special(tmp_path, kind)
    with pytest.raises(StateError) as info:
        atomic_write_bytes(path, b"data", what="rank 0 RNG state")
    message = str(info.value)
    assert f"{path} is not a regular file" in message and "nothing was written" in message
    assert path.is_fifo() if kind == "fifo" else path.is_dir(), "the special file was replaced"
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "a temp file was left behind"


# --- 5. one rank prefix per line --------------------------------------------------------------


def test_load_failures_carry_one_rank_prefix_in_one_process(tmp_path: Path) -> None:
    plan = ddpseed.SeedPlan(3, detect({}))
    with pytest.raises(StateError) as info:
        ddpseed.load_state(tmp_path / "none.pt", plan)
    message = str(info.value)
    assert f"  rank 0: no checkpoint at {tmp_path / 'none.pt'}: its commit record" in message
    no_doubled_prefix(message)


def test_load_failures_carry_one_rank_prefix_on_every_rank(tmp_path: Path) -> None:
    # A commit record naming save 1 whose rank files are missing: every rank fails to read.
    commit_path(tmp_path / "x.pt").write_text(
        json.dumps({"format": COMMIT_FORMAT, "save": 1, "world_size": 2})
    )
    results = run(
        2, env={**setup_env(seed=1, timeout=TIMEOUT), "INPUT_LOAD": str(tmp_path / "x.pt")}
    )
    for r in results:
        err = error_of(r)
        assert "StateError: load_state(" in err and "failed on 2 of 2 ranks" in err, err
        for rank in (0, 1):
            assert f"  rank {rank}: state file {tmp_path}/x.rank{rank}.1.pt of save 1" in err
        no_doubled_prefix(err)
        assert elapsed(r) < TIMEOUT, err


# --- 6. checkpoint paths and commit records ---------------------------------------------------


@pytest.mark.parametrize("call", ["save", "load"])
@pytest.mark.parametrize("kind", ["bytes", "nul"])
def test_a_path_that_is_no_path_stops_every_rank_at_once(
    tmp_path: Path, call: str, kind: str
) -> None:
    """Only rank 0 used to touch the path (the commit record) and fail there, alone; the other
    rank waited out its timeout."""
    env = {
        **setup_env(seed=1, timeout=TIMEOUT),
        f"INPUT_{call.upper()}": str(tmp_path / "rng.pt"),
        "INPUT_PATH_AS": kind,
    }
    results = run(2, env=env)
    reason = {"bytes": "the path's type is bytes", "nul": "the path contains a NUL byte"}[kind]
    errors = [error_of(r) for r in results]
    assert errors[0] == errors[1], errors
    assert f"ArgumentError: {call}_state: invalid path on 2 of 2 ranks" in errors[0], errors[0]
    for rank in (0, 1):
        assert f"  rank {rank}: {call}_state(" in errors[0] and reason in errors[0], errors[0]
    no_doubled_prefix(errors[0])
    assert all(elapsed(r) < PROMPT for r in results), errors
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("save", 2**63),  # an exchange carries int64: it used to fail there, as if a rank died
        ("save", 2**62),
        ("save", True),
        ("world_size", 2**64),
        ("token", 0),
        ("token", 2**62),
        ("rank0_files", 7),
    ],
)
def test_a_commit_record_with_values_no_exchange_carries_is_corrupted(
    tmp_path: Path, field: str, value: object
) -> None:
    record = {"format": COMMIT_FORMAT, "save": 1, "world_size": 2, field: value}
    commit_path(tmp_path / "rng.pt").write_text(json.dumps(record))
    with pytest.raises(StateError) as info:
        read_commit_record(tmp_path / "rng.pt")
    message = str(info.value)
    assert "is corrupted" in message and field in message, message


@pytest.mark.parametrize("call", ["save", "load"])
def test_a_huge_save_number_in_the_commit_record_is_named_on_every_rank(
    tmp_path: Path, call: str
) -> None:
    commit_path(tmp_path / "rng.pt").write_text(
        json.dumps({"format": COMMIT_FORMAT, "save": 2**63, "world_size": 2})
    )
    env = {**setup_env(seed=1, timeout=TIMEOUT), f"INPUT_{call.upper()}": str(tmp_path / "rng.pt")}
    for r in run(2, env=env):
        err = error_of(r)
        assert f"StateError: {call}_state(" in err and "failed on 1 of 2 ranks" in err, err
        assert f"commit record {commit_path(tmp_path / 'rng.pt')} is corrupted" in err, err
        assert "never reached" not in err and elapsed(r) < PROMPT, err


@pytest.mark.parametrize(
    ("first", "second"),
    [("rng.step100", "rng.step200"), ("{rank}/rng.pt", "0/rng.pt")],
)
def test_paths_sharing_a_commit_record_cannot_take_each_others_checkpoint(
    tmp_path: Path, first: str, second: str
) -> None:
    """Paths that differ only after the last dot (or in where {rank} goes) have one commit
    record: saving the second used to make the first's checkpoint unloadable."""
    plan = ddpseed.SeedPlan(3, detect({}))
    ddpseed.save_state(tmp_path / first, plan)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for call in (ddpseed.save_state, ddpseed.load_state):
        with pytest.raises(StateError) as info:
            call(tmp_path / second, plan)
        message = str(info.value)
        assert f"commit record {commit_path(tmp_path / first)} commits the checkpoint" in message
        assert f"not those of {str(tmp_path / second)!r}" in message, message
        assert "give each its own stem or directory" in message, message
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files
    ddpseed.load_state(tmp_path / first, plan)
    # A record written before records named their files (an older ddpseed) commits any path.
    record = commit_path(tmp_path / first)
    data = json.loads(record.read_text())
    del data["rank0_files"], data["token"]
    record.write_text(json.dumps(data))
    ddpseed.load_state(tmp_path / first, plan)
