"""Pure arithmetic of elastic resume: where an epoch stands in *global* positions.

Both samplers deal one global order to the ranks as torch's ``DistributedSampler`` does: global
position ``x`` of an epoch holds item ``order[x mod N]`` (positions past ``N`` are torch's
padding, repeating the head of the order), and rank ``r`` of ``R`` takes ``x = r, r + R, ...``.
A loader that resumes an epoch on another world size starts its shards at an *origin* ``g``
instead of 0: rank ``r`` takes ``g + r, g + r + R, ...``. With every rank at shard position
``p`` (synchronous DDP), the positions consumed are exactly ``[g, g + p*R)``, so the global
position ``g + p*R`` is all a new world needs to deliver the rest of the epoch exactly once.

    >>> shard_length(1003, world=4, origin=0, drop_last=False)  # torch's ceil(1003 / 4)
    251
    >>> global_position(1003, world=4, origin=0, position=40, drop_last=False)
    160
    >>> list(shard_positions(1003, world=3, rank=1, origin=999, drop_last=False))  # 1003: padding
    [1000, 1003]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .derivation import _check_nonneg as _check

_RESUME_DOMAIN = 13  # SeedSequence spawn-key domain of resume seeds (loader seeds use 3)
_KEY_DOMAIN = 17  # ... and of loader keys


def shard_length(n: int, world: int, origin: int, drop_last: bool) -> int:
    """Positions per rank of an epoch of ``n`` items dealt from ``origin`` to ``world`` ranks.

    torch's rule on the ``n - origin`` positions left: ``ceil`` (padding to a multiple of the
    world) or, with ``drop_last``, ``floor`` (the tail dropped). At ``origin=0`` this is
    ``DistributedSampler.num_samples``.

    >>> shard_length(10, 4, 0, False), shard_length(10, 4, 0, True), shard_length(10, 4, 9, False)
    (3, 2, 1)
    """
    _check(n=n, world=world, origin=origin)
    if world < 1:
        raise ValueError(f"world={world} must be >= 1")
    left = max(0, n - origin)
    return left // world if drop_last else -(-left // world)


def global_position(n: int, world: int, origin: int, position: int, drop_last: bool) -> int:
    """Where the epoch stands when every rank is at shard ``position``: the positions
    ``[0, result)`` are consumed. A shard consumed to its end means the whole epoch (``n``):
    its padding repeats, or its ``drop_last`` tail is dropped, never owed.

    >>> global_position(10, 4, 0, 2, False), global_position(10, 4, 0, 3, False)
    (8, 10)
    """
    _check(position=position)
    if position >= shard_length(n, world, origin, drop_last):
        return n
    return origin + position * world


def shard_positions(n: int, world: int, rank: int, origin: int, drop_last: bool) -> range:
    """The global positions rank ``rank`` takes, in order (item ``order[x mod n]`` at ``x``)."""
    _check(rank=rank)
    if rank >= world:
        raise ValueError(f"rank={rank} is not in [0, world={world})")
    length = shard_length(n, world, origin, drop_last)
    return range(origin + rank, origin + length * world, world)


@dataclass(frozen=True)
class EpochPoint:
    """Where one distributed loader's epoch stands, the same on every rank of a job."""

    epoch: int
    global_position: int  # positions [0, global_position) of the epoch are consumed
    finished: bool  # the pass ended (StopIteration): the next iter() is a new pass

    def origin(self) -> int:
        """Where a new world's shards of this epoch start: the first unconsumed position,
        or 0 for a finished pass (a new pass of the epoch is a whole one)."""
        return 0 if self.finished else self.global_position


def loader_key(base: int, epoch: int, global_position: int, previous: int) -> int:
    """The key of a loader's seeds once an elastic resume deals its shards again (never 0;
    see :func:`ddpseed.derivation.rekeyed`): the same on every rank, from where the epoch
    stood and the key before, so every further resume of one checkpoint gets the same one.

    >>> loader_key(7, 0, 16, 0) != loader_key(7, 0, 24, 0) != 0
    True
    """
    _check(base=base, epoch=epoch, position=global_position, key=previous)
    spawn_key = (_KEY_DOMAIN, epoch, global_position, previous)
    return int(np.random.SeedSequence(base, spawn_key=spawn_key).generate_state(1)[0]) or 1


def resume_seed(base: int, rank: int, epoch: int, positions: tuple[int, ...]) -> int:
    """The seed of rank ``rank``'s main process after an elastic resume.

    An old rank's RNG streams cannot be mapped onto a new world's ranks, so every new rank
    starts new ones: ``SeedSequence(base, spawn_key=(13, rank, epoch, *positions))``, the
    positions being the global positions of the job's distributed loaders in name order.

    >>> resume_seed(7, 0, 1, (160,)) != resume_seed(7, 1, 1, (160,)) != resume_seed(7, 0, 1, (176,))
    True
    """
    _check(base=base, rank=rank, epoch=epoch)
    for position in positions:
        _check(position=position)
    seq = np.random.SeedSequence(base, spawn_key=(_RESUME_DOMAIN, rank, epoch, *positions))
    return int(seq.generate_state(1, dtype=np.uint32)[0])
