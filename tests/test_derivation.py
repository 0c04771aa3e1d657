"""The pure derivation rules: formulas, validation, collision checks (with hypothesis)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ddpseed
from ddpseed.derivation import SEED_SPACE, batch_seed, rule, seed_table

seeds = st.integers(0, SEED_SPACE - 1)
small = st.integers(1, 12)


def test_formulas_from_the_contract() -> None:
    assert ddpseed.process_seed(1234, 3) == 1237
    assert ddpseed.worker_seed(1234, 3, 4, 1) == 1234 + 3 * 4 + 1
    # epoch e moves rank r's workers to slot (e*world + r)*W + w
    assert ddpseed.worker_seed(1234, 3, 4, 1, epoch=2, world_size=8) == 1234 + (2 * 8 + 3) * 4 + 1
    assert ddpseed.process_seed(SEED_SPACE - 1, 2) == 1


def _fmix32(x: int) -> int:  # murmur3's 32-bit finaliser, written out from its reference
    x ^= x >> 16
    x = (x * 0x85EBCA6B) % 2**32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) % 2**32
    return x ^ (x >> 16)


@given(base=seeds, world=small, workers=small, rank=st.integers(0, 11), epoch=st.integers(0, 3))
@pytest.mark.parametrize("scheme", ["default", "disjoint"])
def test_manifest_rule_text_reproduces_the_seeds(
    scheme: str, base: int, world: int, workers: int, rank: int, epoch: int
) -> None:
    # The formulas a run's manifest records, evaluated as written, give the seeds it used.
    text = rule(scheme)  # type: ignore[arg-type]
    rank %= world

    def key(b: int, s: int) -> int:
        value: int = eval(text["K(b, s)"].replace(" mod ", " % "), {"F": _fmix32, "b": b, "s": s})
        return value

    names = {"base": base, "rank": rank, "world_size": world, "W": workers, "epoch": epoch}
    for worker_id in range(workers):
        env = {**names, "worker_id": worker_id, "K": key}
        worker = eval(text["worker_seed"].replace(" mod ", " % "), env)
        assert worker == ddpseed.worker_seed(
            base,
            rank,
            workers,
            worker_id,
            epoch,
            world,
            scheme=scheme,  # type: ignore[arg-type]
        )
    process = eval(text["process_seed"].replace(" mod ", " % "), {**names, "K": key})
    assert process == ddpseed.process_seed(base, rank, scheme=scheme)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (-1, "outside [0, 2**32)"),
        (2**32, "outside [0, 2**32)"),
        (1e3, "float"),
        (True, "bool"),
        ("abc", "not a decimal integer"),
        ("", "not a decimal integer"),
        ("1e3", "not a decimal integer"),
        ("-1", "outside"),
        ([1], "not an integer"),
    ],
)
def test_bad_seeds_are_named(value: object, fragment: str) -> None:
    with pytest.raises(ddpseed.SeedValueError, match=r"seed") as info:
        ddpseed.validate_seed(value)
    assert fragment in str(info.value)
    shown = value  # the message names the value as given, or as parsed when it is a number
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            shown = int(value)
    assert f"seed={shown!r}" in str(info.value)


def test_string_seeds_from_the_environment() -> None:
    assert ddpseed.validate_seed(" 42 ", source="DDPSEED_SEED") == 42
    assert ddpseed.validate_seed(str(SEED_SPACE - 1)) == SEED_SPACE - 1


def test_worker_seed_argument_errors() -> None:
    with pytest.raises(ValueError, match="worker_id=4"):
        ddpseed.worker_seed(0, 0, 4, 4)
    with pytest.raises(ValueError, match="num_workers=0"):
        ddpseed.worker_seed(0, 0, 0, 0)
    with pytest.raises(ValueError, match="rank=3"):
        ddpseed.worker_seed(0, 3, 2, 0, epoch=1, world_size=2)


def test_batch_seed_starts_at_the_worker_seed() -> None:
    assert batch_seed(99, 0) == 99
    assert len({batch_seed(99, k) for k in range(1000)}) == 1000


@given(base=seeds, rank=st.integers(0, 10**6))
def test_process_seed_in_range_and_formula(base: int, rank: int) -> None:
    s = ddpseed.process_seed(base, rank)
    assert 0 <= s < SEED_SPACE and s == (base + rank) % SEED_SPACE
    assert 0 <= ddpseed.process_seed(base, rank, scheme="disjoint") < SEED_SPACE


@given(base=seeds, world=small, workers=small, epoch=st.integers(0, 50), data=st.data())
def test_worker_seed_in_range_and_formula(
    base: int, world: int, workers: int, epoch: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, world - 1))
    wid = data.draw(st.integers(0, workers - 1))
    s = ddpseed.worker_seed(base, rank, workers, wid, epoch, world)
    assert s == (base + (epoch * world + rank) * workers + wid) % SEED_SPACE
    assert (
        0
        <= ddpseed.worker_seed(base, rank, workers, wid, epoch, world, scheme="disjoint")
        < SEED_SPACE
    )


@settings(max_examples=60, deadline=None)
@given(
    base=seeds,
    world=small,
    workers=small,
    epochs=st.integers(1, 4),
    scheme=st.sampled_from(["default", "disjoint"]),
)
def test_no_two_workers_or_ranks_share_a_seed(
    base: int, world: int, workers: int, epochs: int, scheme: str
) -> None:
    table = seed_table(base, world, workers, epochs, scheme=scheme)  # type: ignore[arg-type]
    worker_seeds = [s for e in table.workers for r in e for s in r]
    assert len(set(worker_seeds)) == len(worker_seeds)
    assert len(set(table.process)) == len(table.process)
    if scheme == "disjoint":
        assert not set(table.process) & set(worker_seeds)
        assert table.collisions() == []


def _brute_force_collisions(table: ddpseed.SeedTable) -> set[int]:
    seen: dict[int, int] = {}
    for s in table.process:
        seen[s] = seen.get(s, 0) + 1
    for e in table.workers:
        for r in e:
            for s in r:
                seen[s] = seen.get(s, 0) + 1
    return {s for s, n in seen.items() if n > 1}


def ddpseed_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``python -m ddpseed ARGS`` in a fresh interpreter, output captured."""
    cmd = [sys.executable, "-m", "ddpseed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


@settings(max_examples=5, deadline=None)
@given(
    base=st.one_of(seeds, st.just(SEED_SPACE - 3)),
    world=small,
    workers=st.integers(0, 6),
    epochs=st.integers(1, 3),
    scheme=st.sampled_from(["default", "disjoint"]),
)
def test_cli_plan_reports_exactly_the_brute_force_collisions(
    base: int, world: int, workers: int, epochs: int, scheme: str
) -> None:
    proc = ddpseed_cli(
        "plan",
        *("--seed", str(base), "--world-size", str(world), "--num-workers", str(workers)),
        *("--epochs", str(epochs), "--scheme", scheme, "--json"),
    )
    report = json.loads(proc.stdout)
    table = seed_table(base, world, workers, epochs, scheme=scheme)  # type: ignore[arg-type]
    assert {c["seed"] for c in report["collisions"]} == _brute_force_collisions(table)
    assert report["process_seeds"] == list(table.process)


def test_cli_plan_table_lists_every_rank() -> None:
    proc = ddpseed_cli(
        "plan", "--seed", "42", "--world-size", "16", "--num-workers", "4", "--epochs", "2"
    )
    lines = proc.stdout.splitlines()
    assert lines[2].split()[:6] == ["0", "42", "42", "43", "44", "45"]
    assert lines[17].split()[:2] == ["15", "57"]
    assert "collisions: 16 seeds are used more than once" in proc.stdout


def test_cli_rejects_a_bad_seed_with_the_reason() -> None:
    proc = ddpseed_cli("plan", "--seed", "-5", "--world-size", "2", check=False)
    assert proc.returncode == 2 and "outside [0, 2**32)" in proc.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--world-size", "0"), ("--world-size", "-3"), ("--num-workers", "-1"), ("--epochs", "0")],
)
def test_cli_plan_rejects_counts_out_of_range(flag: str, value: str) -> None:
    args = {"--seed": "1", "--world-size": "2", flag: value}
    proc = ddpseed_cli("plan", *(x for kv in args.items() for x in kv), check=False)
    assert proc.returncode == 2 and f"argument {flag}: {value} is below" in proc.stderr


def test_cli_plan_table_stays_aligned_for_ten_digit_seeds() -> None:
    proc = ddpseed_cli(
        "plan", "--seed", str(SEED_SPACE - 3), "--world-size", "3", "--num-workers", "2",
        "--epochs", "2",
    )  # fmt: skip
    rows = proc.stdout.splitlines()[1:5]
    # Numbers are right-aligned: every column ends where it ends in the other rows, whatever
    # the number of digits, and the epoch-1 header starts over that epoch's first column.
    ends = {tuple(i for i, c in enumerate(r) if c != " " and (i + 1 == len(r) or r[i + 1] == " "))
            for r in rows[1:]}  # fmt: skip
    assert len(ends) == 1, rows
    _, process_end, _, w1_end, _, _ = next(iter(ends))
    assert rows[0].index("worker seeds epoch 1") == w1_end + 3, rows
    assert rows[0].index("worker seeds epoch 0") == process_end + 3, rows


def test_cli_version_and_help_are_plain_text() -> None:
    assert ddpseed_cli("--version").stdout.strip() == f"ddpseed {ddpseed.__version__}"
    top = ddpseed_cli("--help").stdout
    assert "``" not in top and ":class:" not in top and "demo" in top
    demo = ddpseed_cli("demo", "--help").stdout
    lines = demo.splitlines()
    for option in ("--nproc", "--num-workers", "--epochs", "--seed", "--timeout"):
        at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(option))
        described = " ".join(lines[at : at + 2]).split()  # argparse may wrap to the next line
        assert len(described) > 3, f"{option} has no description: {lines[at : at + 2]}"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: ddpseed.process_seed(1.0, 0), TypeError),  # type: ignore[arg-type]
        (lambda: ddpseed.process_seed(True, 0), TypeError),
        (lambda: ddpseed.process_seed(2**32, 0), ValueError),
        (lambda: ddpseed.process_seed(1, 0.5), TypeError),  # type: ignore[arg-type]
        (lambda: ddpseed.worker_seed(1, 5, 2, 0, world_size=2), ValueError),
        (lambda: ddpseed.worker_seed(1, rank=0, num_workers=2, worker_id=0, epoch=1), ValueError),
        (lambda: ddpseed.worker_seed(1, rank=0, num_workers=2.0, worker_id=0), TypeError),  # type: ignore[arg-type]
    ],
)  # fmt: skip
def test_pure_rules_refuse_nonsense_arguments(call: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        call()
