"""The agreement verdict, in process: ``decide`` is pure, so every rule is a plain call here.

The multi-process fault tests (test_faults.py, test_integrity.py) prove that every rank reaches
and reports this verdict; these pin the verdict itself, case by case.
"""

from __future__ import annotations

import dataclasses

import pytest

from ddpseed.coordinator import Agreement, ErrorKind, Proposal, Source, decide
from ddpseed.errors import (
    ArgumentError,
    RunDirError,
    SeedMismatchError,
    SeedValueError,
    TopologyError,
)


def ranks(*proposals: Proposal) -> list[Proposal]:
    """Proposals of one job: the world size is the number given."""
    return [dataclasses.replace(p, world_size=len(proposals)) for p in proposals]


def test_the_record_travels_by_name_and_comes_back_whole() -> None:
    p = Proposal(
        source=Source.ENVIRONMENT,
        seed=7,
        fallback=None,
        fallback_source=Source.NONE,
        world_size=4,
        run_dir=123,
        explicit_dir=True,
        scheme=1,
        deterministic=True,
        mesh=99,
        error_kind=ErrorKind.MESH,
    )
    assert Proposal.from_values(p.values(), "why") == dataclasses.replace(p, error="why")
    assert p.values()[1:3] == (7, -1)  # None travels as -1


def test_an_explicit_seed_on_every_rank_is_the_base_seed() -> None:
    verdict = decide(ranks(*[Proposal(Source.ARGUMENT, 11)] * 3))
    assert verdict == Agreement(11, Source.ARGUMENT)


def test_without_an_explicit_seed_rank_zeros_fallback_decides() -> None:
    rank0 = Proposal(fallback=42, fallback_source=Source.ENTROPY)
    others = Proposal(fallback=5, fallback_source=Source.ENTROPY)  # never theirs
    assert decide(ranks(rank0, others, others)) == Agreement(42, Source.ENTROPY)


def test_an_explicit_seed_beats_rank_zeros_record() -> None:
    rank0 = Proposal(Source.ENVIRONMENT, 3, fallback=42, fallback_source=Source.RECORD)
    assert decide(ranks(rank0, Proposal(Source.ENVIRONMENT, 3))).base_seed == 3


def test_different_seeds_are_refused_naming_each_group_of_ranks() -> None:
    a, b = Proposal(Source.ARGUMENT, 1), Proposal(Source.ENVIRONMENT, 2)
    with pytest.raises(SeedMismatchError) as info:
        decide(ranks(a, b, a, b))
    text = str(info.value)
    assert "seed 1 (from argument) on ranks 0,2" in text
    assert "seed 2 (from DDPSEED_SEED) on ranks 1,3" in text
    assert "fix:" in text


def test_a_seed_on_some_ranks_only_is_refused_naming_the_others() -> None:
    with pytest.raises(SeedMismatchError, match=r"no seed on ranks 1-3"):
        decide(ranks(Proposal(Source.ARGUMENT, 1), *[Proposal()] * 3))


def test_ranks_of_different_launches_are_refused() -> None:
    records = [Proposal(Source.ARGUMENT, 1, world_size=2), Proposal(Source.ARGUMENT, 1)]
    with pytest.raises(TopologyError, match=r"2 on ranks 0; 1 on ranks 1"):
        decide(records)


def test_invalid_seeds_are_listed_once_per_rank_and_nobody_is_seeded() -> None:
    bad = Proposal(error="rank 1: DDPSEED_SEED='x' is not an integer")
    with pytest.raises(SeedValueError) as info:
        decide(ranks(Proposal(Source.ARGUMENT, 1), bad))
    text = str(info.value)
    assert "invalid seed on 1 of 2 ranks; no rank was seeded" in text
    assert "  rank 1: DDPSEED_SEED='x'" in text and "rank 1: rank 1" not in text


def test_invalid_mesh_settings_are_an_argument_error() -> None:
    bad = Proposal(Source.ARGUMENT, 1, error="mesh has no data dim", error_kind=ErrorKind.MESH)
    with pytest.raises(ArgumentError, match=r"invalid mesh settings on 2 of 2 ranks"):
        decide(ranks(bad, bad))


@pytest.mark.parametrize(
    ("field", "values", "shown"),
    [
        ("scheme", (0, 1), "'default' on ranks 0; 'disjoint' on ranks 1"),
        ("deterministic", (True, False), "True on ranks 0; False on ranks 1"),
    ],
)
def test_settings_every_rank_must_share_are_compared(
    field: str, values: tuple[object, object], shown: str
) -> None:
    records = [dataclasses.replace(Proposal(Source.ARGUMENT, 1), **{field: v}) for v in values]
    with pytest.raises(SeedMismatchError, match=rf"different {field} settings: {shown}"):
        decide(ranks(*records))


@pytest.mark.parametrize(
    ("explicit_dir", "source", "record"),
    [
        (True, Source.ARGUMENT, True),  # run_dir= given: always recorded
        (False, Source.ARGUMENT, False),  # a job-id directory needs no record of a given seed
        (False, Source.ENTROPY, True),  # ... but must remember a drawn one
        (False, Source.RECORD, True),
    ],
)
def test_rank_zeros_run_directory_decides_the_record(
    explicit_dir: bool, source: Source, record: bool
) -> None:
    seed = 9 if source is Source.ARGUMENT else None
    rank0 = Proposal(
        source if seed is not None else Source.NONE,
        seed,
        fallback=9,
        fallback_source=source,
        run_dir=5,
        explicit_dir=explicit_dir,
    )
    other = dataclasses.replace(rank0, run_dir=6, fallback=None)
    verdict = decide(ranks(rank0, rank0, other))
    assert (verdict.record, verdict.other_run_dir) == (record, (2,))


def test_different_mesh_settings_are_flagged_for_setup_to_show() -> None:
    a = Proposal(Source.ARGUMENT, 1, mesh=10)
    assert not decide(ranks(a, a)).mesh_differs
    assert decide(ranks(a, dataclasses.replace(a, mesh=11))).mesh_differs


def test_an_invalid_run_dir_on_one_rank_is_a_run_dir_error_on_every_rank() -> None:
    # It used to be raised before the agreement on that rank alone, so rank 0 waited out its
    # timeout and then blamed the network.
    bad = Proposal(Source.ARGUMENT, 1, error="rank 1: run_dir='' names no directory",
                   error_kind=ErrorKind.RUN_DIR)  # fmt: skip
    with pytest.raises(RunDirError, match=r"invalid run directory on 1 of 2 ranks(.|\n)*"
                       r"rank 1: run_dir='' names no directory"):  # fmt: skip
        decide(ranks(Proposal(Source.ARGUMENT, 1), bad))
