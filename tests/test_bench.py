"""``ddpseed bench``: the tables it prints, its flags, and its measuring processes."""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import ddpseed.bench as bench
import ddpseed.paired as paired


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    bench.register(sub)
    return parser.parse_args(["bench", *argv])


def test_register_adds_the_subcommand() -> None:
    args = parse("--quick", "--skip-setup", "--sizes", "1e3,2000", "--world-sizes", "2")
    assert args.func is bench.run
    assert args.quick and args.skip_setup
    assert bench._options(args) == ([1000, 2000], [2], 1, 1000, 1000, 1.0)
    defaults = bench._options(parse())
    assert defaults == ([10**6, 10**7, 10**8, 10**9], [2, 4, 8, 16, 32], 3, 10**8, 10**7, 120.0)


@pytest.mark.parametrize(
    "bad",
    [["--sizes", "0"], ["--sizes", "1.5"], ["--repeats", "0"], ["--paired-seconds", "-1"]],
)
def test_bad_flags_exit_2(bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.run(parse("--skip-setup", *bad)) == 2
    assert "ddpseed bench:" in capsys.readouterr().err


def test_quick_run_prints_the_table_with_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Real measurements, each in a fresh interpreter: torch, Seeded and Scalable at N=1e4,
    # Scalable alone at N=1e5.
    report = tmp_path / "bench.json"
    assert bench.run(parse("--quick", "--skip-setup", "--json", str(report))) == 0
    text = capsys.readouterr().out
    for name in bench.SAMPLERS.values():
        assert re.search(rf"^\s+1e4\s+{name}\s", text, re.M), name
    assert re.search(r"^\s+1e5\s+ddpseed ScalableDistributedSampler\s", text, re.M)
    ratio = (
        r"first index: [\d,]+x sooner \([\d.]+x the time\); ns/index: [\d.]+x torch .*; "
        r"RSS: [\d.]+x torch"
    )
    assert re.search(rf"SeededDistributedSampler vs torch: {ratio}", text)
    assert re.search(rf"ScalableDistributedSampler vs torch: {ratio}", text)
    assert "skipped at N=1e5" in text
    assert "target: peak RSS < 64 MB at N=1e5" in text
    # the warm paired rounds: torch, Seeded and torch again (A/A) at N=1e4 only
    interval = r"[\d.]+x \[[\d.]+-[\d.]+\]"
    assert re.search(
        rf"^\s+1e4\s+\d+\s+{interval}\s+{interval}\s+{interval}\s+{interval}$", text, re.M
    )
    assert re.search(
        rf"target: SeededDistributedSampler within 5% of torch at N=1e4 \(\d+ warm rounds\): "
        rf"first index {interval}, ns/index {interval}, RSS [\d.]+x (OK|MISSED|UNRESOLVED)$",
        text,
        re.M,
    )
    data = json.loads(report.read_text())
    rows = {(r["sampler"], r["n"]): r for r in data["samplers"]}
    assert set(rows) == {
        ("torch", 10**4),
        ("seeded", 10**4),
        ("scalable", 10**4),
        ("scalable", 10**5),
    }
    assert all(r["count"] == r["n"] // 8 for r in rows.values())
    assert all(r["first_s"] > 0 and r["ns_per_index"] > 0 for r in rows.values())
    assert data["setup"] == []
    (warm,) = data["paired"]
    assert warm["n"] == 10**4 and warm["rounds"] >= paired.MIN_ROUNDS
    assert set(warm) >= {"seeded", "torch_again"}
    # the loader section: plan.dataloader against torch's DataLoader + DistributedSampler, real
    # loaders alternated in one process, for both datasets and 0 and 2 workers
    cases = [(r["dataset"], r["workers"]) for r in data["loader"]]
    assert cases == [("cheap", 0), ("cheap", 2), ("1 ms", 0), ("1 ms", 2)]
    for r in data["loader"]:
        assert r["rounds"] >= paired.MIN_ROUNDS and r["torch_samples_per_s"] > 0
        lo, hi = r["seeded"]["ci"]
        assert lo <= r["seeded"]["median"] <= hi
        assert re.search(rf"^{r['dataset']}\s+{r['workers']}\s+\d+\s+\d+\s+[\d,]+\s+"
                         rf"{interval}\s+{interval}$", text, re.M)  # fmt: skip
    # randomness="sample" against "batch", both plan.dataloader, on the ~1 ms dataset
    assert "randomness='sample') vs randomness='batch'" in text
    sample_cases = [(r["dataset"], r["workers"]) for r in data["loader_sample"]]
    assert sample_cases == [("1 ms", 0), ("1 ms", 2)]
    for r in data["loader_sample"]:
        lo, hi = r["seeded"]["ci"]
        assert r["rounds"] >= paired.MIN_ROUNDS and lo <= r["seeded"]["median"] <= hi


def fake_measurement(kind: str, n: int, repeats: int) -> dict[str, Any]:
    slow = kind != "scalable"
    return {
        "sampler": kind,
        "n": n,
        "count": n // 8,
        "repeats": repeats,
        "first_s": n * 1e-7 if slow else 1e-4,
        "ns_per_index": 800.0 if slow else 150.0,
        "ns_per_index_after_first": 60.0 if slow else 140.0,
        "rss_bytes": 48 * n if slow else 3 * 2**20,
    }


def test_layout_and_targets(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    calls: list[tuple[str, int]] = []

    def run_child(cmd: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
        if cmd[-3] == "paired":
            calls.append(("paired", int(cmd[-2])))
            same = [(0.5, 2.0)] * 6
            return {"rounds": 6, "runs": dict.fromkeys(paired.ARMS, same)}
        kind, n = cmd[-2], int(cmd[-1])
        calls.append((kind, n))
        fake = fake_measurement(kind, n, 1)
        first = fake["first_s"]
        return {**fake, "total_s": first + fake["ns_per_index_after_first"] * 1e-9 * (n // 8 - 1)}

    monkeypatch.setattr(bench, "_run_child", run_child)
    assert bench.run(parse("--skip-setup", "--skip-loader", "--json")) == 0
    text = capsys.readouterr().out
    # Every size gets --repeats (3) runs per sampler, interleaved, each round rotated by one;
    # above 1e8 torch's samplers are skipped.
    at_1e7 = [kind for kind, n in calls if n == 10**7 and kind != "paired"]
    t, s, x = "torch", "seeded", "scalable"
    assert at_1e7 == [t, s, x, s, x, t, x, t, s]
    assert [c for c in calls if c[1] == 10**9] == [("scalable", 10**9)] * 3
    # the warm paired rounds run up to 1e7 only
    assert [c for c in calls if c[0] == "paired"] == [("paired", 10**6), ("paired", 10**7)]
    assert "target: first index >= 1000x sooner than torch at N=1e8: 100,000x OK" in text
    assert "target: ns/index over the shard <= torch's at N=1e8: 0." in text
    assert "target: peak RSS < 64 MB at N=1e9: 3.0 MB OK" in text
    # the fake seeded sampler is torch's twin, so every figure is 1.000x
    assert (
        "target: SeededDistributedSampler within 5% of torch at N=1e6 (6 warm rounds): first "
        "index 1.000x [1.000-1.000], ns/index 1.000x [1.000-1.000], RSS 1.000x OK" in text
    )
    assert "within 5% of torch at N=1e8 (3 fresh runs): first index 1.000x [1.000-1.000]" in text
    assert "does not fit in this machine's" in text  # 48 GB at N=1e9
    assert json.loads(text[text.index("{") :])["replicas"] == 8


def test_seeded_target_flags_a_gap_over_5_percent() -> None:
    torch_r = fake_measurement("torch", 10**6, 3)
    seeded = {**fake_measurement("seeded", 10**6, 3), "first_s": torch_r["first_s"] * 1.06}
    (line,) = [ln for ln in bench.target_lines([torch_r, seeded]) if "within 5%" in ln]
    assert line.endswith(
        "(3 fresh runs): first index 1.060x [1.060-1.060], ns/index 1.000x [1.000-1.000], "
        "RSS 1.000x MISSED"
    )


def test_median_interval_covers_the_median_about_95_percent_of_the_time() -> None:
    rng = random.Random(4)
    covered = 0
    for _ in range(2000):
        lo, hi = paired.median_ci([rng.lognormvariate(0, 0.3) for _ in range(60)])
        covered += lo <= 1.0 <= hi  # the lognormal's median is exp(0) = 1
    assert 0.93 <= covered / 2000 <= 0.99


def test_rounds_balance_order_and_are_fixed_before_measuring() -> None:
    seen: list[str] = []

    def maker(arm: str) -> Callable[[], list[int]]:
        def make() -> list[int]:
            seen.append(arm)
            return [1, 2]

        return make

    result = paired.run_rounds({arm: maker(arm) for arm in "abc"}, seconds=0.0)
    assert result["rounds"] == paired.MIN_ROUNDS == 6
    assert all(len(runs) == 6 for runs in result["runs"].values())
    measured = seen[3:]  # after the warm-up round
    rounds = [tuple(measured[i : i + 3]) for i in range(0, len(measured), 3)]
    assert sorted(rounds) == sorted(itertools.permutations("abc"))
    # within a round, every arm directly follows every other arm equally often
    follows = Counter(pair for r in rounds for pair in itertools.pairwise(r))
    assert len(follows) == 6 and set(follows.values()) == {2}, follows


@pytest.mark.parametrize(
    ("intervals", "expected"),
    [
        ([(0.96, 1.04), (1.0, 1.0)], "OK"),
        ([(0.96, 1.04), (1.051, 1.2)], "MISSED"),
        ([(0.8, 1.2), (1.0, 1.0)], "UNRESOLVED"),
        ([(0.8, 1.2), (0.5, 0.9)], "MISSED"),
    ],
)
def test_verdict_on_intervals(intervals: list[tuple[float, float]], expected: str) -> None:
    assert paired.verdict(intervals) == expected


def test_setup_targets_count_collectives() -> None:
    row = {"world": 2, "broadcast_s": 1e-3, "two_rounds_s": 2e-3, "setup_s": 2.5e-3}
    ok = bench.setup_target_lines([{**row, "collectives": ["gather", "broadcast"]}])
    assert ok[0].endswith("2 collectives vs 1 OK")
    assert "1.25-1.25x torch's own gather + broadcast, 2.5-2.5x the bare broadcast" in ok[1]
    extra = bench.setup_target_lines([{**row, "collectives": ["gather", "broadcast", "barrier"]}])
    assert extra[0].endswith("3 collectives vs 1 MISSED")


def test_sampler_child_measures_one_pass() -> None:
    result = bench.sampler_child("scalable", 4000)
    assert result["count"] == 500 and result["total_s"] >= result["first_s"] > 0
    assert result["rss_method"] in ("VmHWM", "ru_maxrss") and result["baseline_rss_bytes"] > 0


def test_free_port_is_bindable() -> None:
    import socket

    port = bench.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_setup_section_on_two_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    results = bench.setup_section([2], repeats=2)
    text = capsys.readouterr().out
    assert results[0]["world"] == 2 and results[0]["repeats"] == 2
    assert results[0]["broadcast_s"] > 0 and results[0]["setup_s"] > 0
    assert results[0]["two_rounds_s"] > 0
    # measured, not assumed: the torch.distributed calls one real setup made
    assert results[0]["collectives"] == ["gather", "broadcast"]
    assert re.search(r"^\s+2\s+\S+ m?s.*gather\+broadcast$", text, re.M), text
    assert "setup/2 rounds" in text
    # the agreement checks of a distributed loader, made and iterated on both ranks
    assert {"loader_check_s", "iter_check_s"} <= set(results[0])
    assert "loader check" in text and "iter check" in text
