"""Make every rank agree on one base seed (the process group is :mod:`ddpseed.group`'s).

Every rank sends one :class:`Proposal` (its explicit seed or the error it hit validating it,
its scheme, deterministic flag and run directory); :func:`decide` is the pure verdict every
rank reaches from the same table of records, so a rank with a bad value fails *with* its peers
instead of leaving them blocked in a collective until a watchdog fires. The records travel in
one :func:`ddpseed.collective.exchange` (a gather to rank 0 and a broadcast of the table).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NoReturn

from .collective import call_id, exchange, ranks_text, strip_rank
from .derivation import SCHEMES
from .errors import (
    ArgumentError,
    CoordinationError,
    RunDirError,
    SeedMismatchError,
    SeedValueError,
    TopologyError,
)
from .group import loopback_hint
from .topology import Topology


class Source(IntEnum):
    NONE = 0
    ARGUMENT = 1
    ENVIRONMENT = 2
    RECORD = 3
    ENTROPY = 4

    @property
    def label(self) -> str:
        return {
            Source.NONE: "none",
            Source.ARGUMENT: "argument",
            Source.ENVIRONMENT: "DDPSEED_SEED",
            Source.RECORD: "run record",
            Source.ENTROPY: "entropy",
        }[self]


class ErrorKind(IntEnum):
    """What a rank's error in its proposal is about: it picks the exception every rank raises."""

    SEED = 0
    MESH = 1
    RUN_DIR = 2
    ARGUMENT = 3
    DEVICE = 4

    def raise_for(self, lines: str, count: int, world_size: int) -> NoReturn:
        what, cls = {
            ErrorKind.SEED: ("invalid seed", SeedValueError),
            ErrorKind.MESH: ("invalid mesh settings", ArgumentError),
            ErrorKind.RUN_DIR: ("invalid run directory", RunDirError),
            ErrorKind.ARGUMENT: ("invalid setup() argument", ArgumentError),
            ErrorKind.DEVICE: ("no GPU for the local rank", TopologyError),
        }[self]
        raise cls(f"{what} on {count} of {world_size} ranks; no rank was seeded:\n{lines}")


@dataclass(frozen=True)
class Proposal:
    """What one rank brings to the agreement; every field travels as one int64 (None as -1)."""

    source: Source = Source.NONE
    seed: int | None = None
    fallback: int | None = None  # rank 0 only: the record or fresh entropy if nobody is explicit
    fallback_source: Source = Source.NONE
    world_size: int = 1
    run_dir: int = 0  # path_id of this rank's run directory, 0 for none
    explicit_dir: bool = False  # run_dir= or DDPSEED_RUN_DIR, not derived from a job id
    scheme: int = 0  # index into derivation.SCHEMES
    deterministic: bool = False
    mesh: int = 0  # MeshSpec.agreement_id() of this rank's mesh settings, 0 for no mesh
    error_kind: ErrorKind = ErrorKind.SEED  # what the error below is about
    error: str | None = None  # this rank's validation error, shown on every rank

    def values(self) -> tuple[int, ...]:
        return tuple(
            -1 if (v := getattr(self, f.name)) is None else int(v)
            for f in dataclasses.fields(self)
            if f.name != "error"
        )

    @classmethod
    def from_values(cls, values: Sequence[int], error: str | None = None) -> Proposal:
        names = [f.name for f in dataclasses.fields(cls) if f.name != "error"]
        raw = dict(zip(names, values, strict=True))
        return cls(
            source=Source(raw["source"]),
            seed=None if raw["seed"] < 0 else raw["seed"],
            fallback=None if raw["fallback"] < 0 else raw["fallback"],
            fallback_source=Source(raw["fallback_source"]),
            world_size=raw["world_size"],
            run_dir=raw["run_dir"],
            explicit_dir=bool(raw["explicit_dir"]),
            scheme=raw["scheme"],
            deterministic=bool(raw["deterministic"]),
            mesh=raw["mesh"],
            error_kind=ErrorKind(raw["error_kind"]),
            error=error,
        )


@dataclass(frozen=True)
class Agreement:
    base_seed: int
    source: Source
    # Only rank 0 touches the run record, so its run directory decides for every rank whether
    # the record step (a collective) happens; ranks given another directory are listed.
    record: bool = False
    other_run_dir: tuple[int, ...] = ()
    # Ranks sent different mesh settings: setup() then shows every rank's and stops them all.
    mesh_differs: bool = False


def path_id(path: str | None) -> int:
    """A stable nonzero 64-bit id of a path (0 for none).

    >>> path_id(None), path_id("/runs/a") == path_id("/runs/a") != 0
    (0, True)
    """
    return 0 if path is None else (call_id(path) or 1)


def _groups(values: Sequence[object]) -> str:
    by_value: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        by_value.setdefault(repr(value), []).append(rank)
    return "; ".join(f"{v} on ranks {ranks_text(rs)}" for v, rs in by_value.items())


def decide(records: Sequence[Proposal]) -> Agreement:
    """The verdict every rank reaches from the same records (pure; raises on conflict).

    >>> decide([Proposal(Source.ARGUMENT, 7, world_size=2)] * 2).base_seed
    7
    """
    world_size = len(records)
    if {r.world_size for r in records} != {world_size}:
        raise TopologyError(
            f"ranks disagree on the world size ({_groups([r.world_size for r in records])}); "
            "every rank must come from the same launch"
        )
    errors = [(rank, r.error) for rank, r in enumerate(records) if r.error]
    if errors:
        lines = "\n".join(f"  rank {rank}: {strip_rank(msg, rank)}" for rank, msg in errors)
        kinds = {records[rank].error_kind for rank, _ in errors}
        kind = kinds.pop() if len(kinds) == 1 else ErrorKind.SEED
        kind.raise_for(lines, len(errors), world_size)
    for what, fix in (
        ("scheme", "pass the same scheme= to setup() on every rank"),
        ("deterministic", "pass the same deterministic= (or DDPSEED_DETERMINISTIC) everywhere"),
    ):
        seen = [getattr(r, what) for r in records]
        if len(set(seen)) > 1:
            shown = [SCHEMES[s] for s in seen] if what == "scheme" else seen
            raise SeedMismatchError(
                f"ranks were given different {what} settings: {_groups(shown)}; {fix}"
            )
    explicit: dict[tuple[int, Source], list[int]] = {}
    missing: list[int] = []
    for rank, r in enumerate(records):
        if r.seed is not None:
            explicit.setdefault((r.seed, r.source), []).append(rank)
        else:
            missing.append(rank)
    if explicit and (missing or len({seed for seed, _ in explicit}) > 1):
        groups = [
            f"  seed {seed} (from {src.label}) on ranks {ranks_text(rs)}"
            for (seed, src), rs in sorted(explicit.items(), key=lambda kv: kv[1][0])
        ]
        if missing:
            groups.append(f"  no seed on ranks {ranks_text(missing)}")
        raise SeedMismatchError(
            "ranks were given different seeds; ddpseed will not pick one silently:\n"
            + "\n".join(groups)
            + "\nfix: pass the same seed= on every rank, or set DDPSEED_SEED identically on "
            "every node (or unset it everywhere to draw one on rank 0)"
        )
    first = records[0]
    if explicit:
        (seed, src), _ = next(iter(explicit.items()))
    elif first.fallback is not None:
        seed, src = first.fallback, first.fallback_source
    else:
        raise CoordinationError("rank 0 sent no seed; this is a ddpseed bug, please report it")
    # An explicit directory always gets the record and manifest; a job-id one only when the
    # seed needs remembering (drawn from entropy, or already taken from a record).
    record = bool(first.run_dir) and (first.explicit_dir or src in (Source.ENTROPY, Source.RECORD))
    other = tuple(rank for rank, r in enumerate(records) if r.run_dir != first.run_dir)
    return Agreement(seed, src, record, other, len({r.mesh for r in records}) > 1)


def agree(proposal: Proposal, topo: Topology, timeout: float) -> Agreement:
    """Exchange every rank's record and return the common verdict (raises on every rank)."""
    hint = (
        "A rank that crashed or was killed before ddpseed.setup stops the whole job."
        + loopback_hint(topo)
    )
    reports = exchange(
        "seed agreement (ddpseed.setup)",
        proposal.values(),
        proposal.error,
        topo,
        timeout,
        hint=hint,
    )
    return decide(
        [
            Proposal.from_values(values, reports.messages.get(rank))
            for rank, values in enumerate(reports.values)
        ]
    )


def share_errors(error: str | None, topo: Topology, timeout: float, what: str) -> list[str]:
    """Every rank's error from a per-rank step (``None`` for success), seen on every rank.

    Returns ``["rank r: message", ...]`` for the ranks that failed; empty when all succeeded.
    """
    return exchange(what, (), error, topo, timeout).lines()
