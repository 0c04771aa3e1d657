"""Pure seed arithmetic: no global state is read or written here.

The default scheme is the one users can compute by hand::

    >>> process_seed(1234, rank=3)
    1237
    >>> worker_seed(1234, rank=3, num_workers=4, worker_id=1)
    1247
    >>> worker_seed(1234, rank=3, num_workers=4, worker_id=1, epoch=1, world_size=8)
    1279

The opt-in ``"disjoint"`` scheme gives every process and worker its own slot (even numbers for
processes, odd for workers) and maps slots through a bijection on 32 bits keyed by the base
seed. Distinct slots give distinct seeds, so no seed repeats anywhere in a run (up to 2**31
slots), at the cost of seeds nobody can compute mentally.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .errors import SeedValueError, shown

SEED_SPACE = 2**32
Scheme = Literal["default", "disjoint"]
SCHEMES: tuple[Scheme, ...] = ("default", "disjoint")
_MASK = SEED_SPACE - 1
_DECIMAL = re.compile(r"[+-]?[0-9]+")
_SEED_DIGITS = len(str(SEED_SPACE - 1))


def validate_seed(value: object, *, source: str = "seed") -> int:
    """Return ``value`` as an int in ``[0, 2**32)`` or raise :class:`SeedValueError`.

    Strings (from the environment) must be plain decimal integers.

    >>> validate_seed("42", source="DDPSEED_SEED")
    42
    """
    if isinstance(value, bool | float):
        raise SeedValueError(
            f"{source}={shown(value)} is a {type(value).__name__}; "
            f"pass an integer in [0, 2**32), e.g. {source}=1234"
        )
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only: str.isdigit() also takes '\u00b2' (which int() refuses) and
        # '\u0663' (which int() reads as 3).
        if not _DECIMAL.fullmatch(text):
            raise SeedValueError(
                f"{source}={shown(value)} is not a decimal integer (ASCII digits 0-9); "
                f"set an integer in [0, 2**32), e.g. {source}=1234, or unset it"
            )
        significant = text.lstrip("+-").lstrip("0")
        if len(significant) > _SEED_DIGITS:  # out of range, and int() may refuse the length
            raise SeedValueError(
                f"{source}={shown(value)} has {len(significant)} significant digits, outside "
                f"[0, 2**32) = [0, {SEED_SPACE}); set an integer in range, e.g. {source}=1234"
            )
        seed = int(significant or "0") * (-1 if text.startswith("-") else 1)
    else:
        try:
            seed = operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            raise SeedValueError(
                f"{source}={shown(value)} is a {type(value).__name__}, not an integer; "
                f"pass an integer in [0, 2**32)"
            ) from None
    if not 0 <= seed < SEED_SPACE:
        raise SeedValueError(
            f"{source}={shown(seed)} is outside [0, 2**32) = [0, {SEED_SPACE}); "
            f"pass a value in range (for example {seed % SEED_SPACE})"
        )
    return seed


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown seed scheme {scheme!r}; choose one of {SCHEMES}")


_RULES: dict[Scheme, dict[str, str]] = {
    "default": {
        "process_seed": "(base + rank) mod 2**32",
        "worker_seed": "(base + (epoch*world_size + rank)*W + worker_id) mod 2**32",
    },
    "disjoint": {
        "process_seed": "K(base, 2*rank)",
        "worker_seed": "K(base, 2*((epoch*world_size + rank)*W + worker_id) + 1)",
        "K(b, s)": "F((F((s ^ b) mod 2**32) + F(b ^ 0x9E3779B9)) mod 2**32)",
        "F": "murmur3's 32-bit finaliser (fmix32)",
    },
}


def rule(scheme: Scheme = "default") -> dict[str, str]:
    """The formulas of ``scheme``, as written in the run's manifest.

    >>> rule()["process_seed"]
    '(base + rank) mod 2**32'
    >>> rule("disjoint")["process_seed"]
    'K(base, 2*rank)'
    """
    _check_scheme(scheme)
    return dict(_RULES[scheme])


def _fmix32(x: int) -> int:
    # murmur3's finaliser: each step (xor-shift, odd multiply) is invertible on 32 bits.
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _MASK
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def _keyed_bijection(base: int, slot: int) -> int:
    """A bijection of ``slot`` on [0, 2**32) chosen by ``base``; distinct slots never collide."""
    x = _fmix32((slot ^ base) & _MASK)
    return _fmix32((x + _fmix32(base ^ 0x9E3779B9)) & _MASK)


def process_seed(base: int, rank: int, *, scheme: Scheme = "default") -> int:
    """The seed of rank ``rank``'s main process: ``(base + rank) mod 2**32``.

    >>> process_seed(2**32 - 1, rank=1)
    0
    """
    _check_scheme(scheme)
    _check_base(base)
    _check_nonneg(rank=rank)
    if scheme == "disjoint":
        return _keyed_bijection(base, 2 * rank)
    return (base + rank) % SEED_SPACE


def worker_seed(
    base: int,
    rank: int,
    num_workers: int,
    worker_id: int,
    epoch: int = 0,
    world_size: int | None = None,
    *,
    scheme: Scheme = "default",
) -> int:
    """The seed of DataLoader worker ``worker_id`` of rank ``rank`` in ``epoch``.

    ``(base + (epoch * world_size + rank) * num_workers + worker_id) mod 2**32``; at epoch 0 that
    is ``base + rank * num_workers + worker_id``. Each epoch moves every worker to a block of
    seeds no other worker of the run has used, so non-persistent workers do not replay last
    epoch's augmentations. ``world_size`` may be left out at epoch 0 only (it does not enter).

    >>> worker_seed(100, rank=1, num_workers=2, worker_id=1)
    103
    """
    _check_scheme(scheme)
    _check_base(base)
    _check_nonneg(rank=rank, epoch=epoch, worker_id=worker_id, num_workers=num_workers)
    if num_workers < 1:
        raise ValueError(f"num_workers={num_workers}: worker seeds need at least one worker")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id={worker_id} is not in [0, num_workers={num_workers})")
    if world_size is None:
        if epoch > 0:
            raise ValueError(f"epoch={epoch}: worker seeds past epoch 0 need world_size")
        world_size = rank + 1
    _check_nonneg(world_size=world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    slot = (epoch * world_size + rank) * num_workers + worker_id
    if scheme == "disjoint":
        return _keyed_bijection(base, 2 * slot + 1)
    return (base + slot) % SEED_SPACE


def _check_nonneg(**values: int) -> None:
    for name, value in values.items():
        # bool is an int subclass, and a float would make the seed a float: both are mistakes.
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name}={value!r} must be an int, not {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")


def _check_base(base: int) -> None:
    _check_nonneg(base=base)
    if base >= SEED_SPACE:
        raise ValueError(f"base={base} must be below 2**32")


@dataclass(frozen=True)
class SeedTable:
    """Every seed of a run: ``process[rank]`` and ``workers[epoch][rank][worker_id]``."""

    base: int
    world_size: int
    num_workers: int
    epochs: int
    scheme: Scheme
    process: tuple[int, ...]
    workers: tuple[tuple[tuple[int, ...], ...], ...]

    def collisions(self) -> list[tuple[int, list[str]]]:
        """Seeds used by more than one process or worker, with who uses them.

        >>> seed_table(0, world_size=2, num_workers=2).collisions()[0]
        (0, ['process rank 0', 'worker rank 0 id 0 epoch 0'])
        """
        users: dict[int, list[str]] = {}
        for rank, seed in enumerate(self.process):
            users.setdefault(seed, []).append(f"process rank {rank}")
        for epoch, ranks in enumerate(self.workers):
            for rank, seeds in enumerate(ranks):
                for wid, seed in enumerate(seeds):
                    users.setdefault(seed, []).append(f"worker rank {rank} id {wid} epoch {epoch}")
        return sorted((s, who) for s, who in users.items() if len(who) > 1)


def seed_table(
    base: int,
    world_size: int,
    num_workers: int,
    epochs: int = 1,
    *,
    scheme: Scheme = "default",
) -> SeedTable:
    """All seeds of a run of ``epochs`` epochs, for display and collision checks."""
    base = validate_seed(base)
    ranks = range(world_size)
    process = tuple(process_seed(base, r, scheme=scheme) for r in ranks)
    workers = tuple(
        tuple(
            tuple(
                worker_seed(base, r, num_workers, w, e, world_size, scheme=scheme)
                for w in range(num_workers)
            )
            for r in ranks
        )
        for e in range(epochs)
    )
    return SeedTable(base, world_size, num_workers, epochs, scheme, process, workers)


def batch_seed(worker_seed_value: int, ordinal: int) -> int:
    """The seed a worker slot uses for its ``ordinal``-th batch of an epoch.

    Ordinal 0 is the worker seed itself, so the first batch draws exactly what a worker seeded
    once with ``worker_init_fn`` draws; later batches get the top 32 bits of splitmix64's
    finaliser over a weighted sum of the pair. Making each batch's randomness a pure function
    of its position is what lets a resumed run reproduce batches whose worker was killed
    mid-epoch. (Not a ``SeedSequence``: a worker computes one per batch, and this costs 1 us
    against 11.)

    >>> batch_seed(1234, 0), batch_seed(1234, 1)
    (1234, 1413821488)
    """
    if ordinal == 0:
        return worker_seed_value
    return _top32(worker_seed_value * _GOLDEN + ordinal * _ORDINAL_WEIGHT + _BATCH_DOMAIN)


def rekeyed(seed: int, key: int) -> int:
    """``seed`` moved by ``key`` into a family of its own; key 0 leaves it as it is.

    After an elastic resume deals a loader's shards again, its batches are numbered from 0 in
    the new shards, and on another world size or ``num_workers`` its worker slots land on slots
    earlier epochs used: the same seeds would come back, and items would replay draws other
    items made before the resume. So that loader's worker seeds (and the batch seeds made from
    them) pass through this with the loader's key (:func:`ddpseed.elastic.loader_key`, kept in
    its state): they meet earlier seeds only by chance (32 bits), not by construction.

    >>> rekeyed(1234, 0), rekeyed(1234, 7) == rekeyed(1235, 7)
    (1234, False)
    """
    if key == 0:
        return seed
    return _top32(seed * _GOLDEN + key * _EPOCH_WEIGHT + _REKEY_DOMAIN)


def _top32(z: int) -> int:
    """The top 32 bits of splitmix64's finaliser of ``z`` mod 2**64."""
    z &= _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return (z ^ (z >> 31)) >> 32


_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: odd, so the weighted sum is a bijection
_ORDINAL_WEIGHT = 0xD1B54A32D192ED03
_BATCH_DOMAIN = 0x2545F4914F6CDD1D  # keeps batch seeds apart from other uses of the same mixer


def loader_seed(base: int, rank: int, epoch: int, key: int = 0, stream: int = 0) -> int:
    """The seed of a ddpseed loader's ``generator`` when it starts a pass in ``epoch``.

    torch draws the workers' base seed from that generator, so ``get_worker_info().seed`` is
    :func:`worker_info_seed`: a pure function of (base, rank, epoch, worker), new each epoch.
    ``key``: the loader's key after an elastic resume dealt its shards again (see
    :func:`rekeyed`); 0 before. ``stream``: the loader's ``stream=``.

    >>> loader_seed(1, 0, 0) != loader_seed(1, 0, 1) != loader_seed(1, 1, 1)
    True
    """
    _check_nonneg(base=base, rank=rank, epoch=epoch, key=key, stream=stream)
    keyed = (key, stream) if key or stream else ()  # none: the seeds of earlier releases
    seq = np.random.SeedSequence(base, spawn_key=(3, rank, epoch, *keyed))
    return int(seq.generate_state(1, dtype=np.uint64)[0])


def worker_info_seed(
    base: int, rank: int, epoch: int, worker_id: int, key: int = 0, stream: int = 0
) -> int:
    """``get_worker_info().seed`` in worker ``worker_id`` of a ddpseed loader in ``epoch``:
    torch's first int64 draw from a generator seeded with :func:`loader_seed`, plus the id."""
    import torch  # only here: the rest of this module is plain arithmetic

    gen = torch.Generator().manual_seed(loader_seed(base, rank, epoch, key, stream))
    return int(torch.empty((), dtype=torch.int64).random_(generator=gen).item()) + worker_id


def sample_seed(base: int, epoch: int, index: int) -> int:
    """The seed of dataset item ``index`` in ``epoch`` under ``randomness="sample"``.

    The top 32 bits of splitmix64's finaliser over a weighted sum of the three, so a sample's
    augmentation depends on nothing but (base, epoch, index): not the rank, the world size, the
    batch it lands in or the worker that fetches it. It is a hash, not a bijection: two items
    of one epoch share a seed with probability 2**-32 per pair (about n**2 / 2**33 pairs in
    an epoch of n items), which makes their random draws equal, not their data.

    >>> sample_seed(1234, 0, 0) != sample_seed(1234, 0, 1) != sample_seed(1234, 1, 1)
    True
    """
    _check_base(base)
    _check_nonneg(epoch=epoch, index=index)
    return _top32(base * _GOLDEN + epoch * _EPOCH_WEIGHT + index * _ORDINAL_WEIGHT + _SAMPLE_DOMAIN)


_EPOCH_WEIGHT = 0xF1357AEA2E62A9C5
_SAMPLE_DOMAIN = 0x6A09E667F3BCC909  # apart from batch seeds, which share the mixer
_REKEY_DOMAIN = 0x3C6EF372FE94F82B  # and rekeyed seeds apart from both
