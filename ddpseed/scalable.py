"""A distributed sampler for datasets too large to shuffle in memory.

:class:`ScalableDistributedSampler` shards exactly like torch's ``DistributedSampler`` (same
``num_samples``, ``total_size``, padding and ``drop_last`` rules, rank ``r`` taking global
positions ``r, r + R, r + 2R, ...``), but its global order is a keyed Feistel bijection
(:class:`~ddpseed.permutation.FeistelPermutation`) selected by ``(seed, epoch)`` and evaluated
lazily, chunk by chunk. Nothing of size ``len(dataset)`` is ever built: memory is a few MB at
any dataset size, the first index arrives in about a millisecond, and :meth:`seek` is O(1).

The order differs from torch's (it is a different permutation), so switching sampler class
mid-run changes which samples a resumed epoch visits::

    >>> s = ScalableDistributedSampler(range(10), num_replicas=4, rank=1, seed=7)
    >>> len(s), s.total_size  # torch's rule: ceil(10 / 4) per rank, 2 positions padded
    (3, 12)
    >>> list(s) == [s.index_at(p) for p in range(3)]
    True
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Sized

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from .derivation import validate_seed
from .errors import DDPSeedError
from .permutation import DEFAULT_ROUNDS, MAX_N, NARROW_N, ORDER_VERSION, FeistelPermutation
from .sampler import ResumableSampler

# Chunks grow from _FIRST_CHUNK to _CHUNK positions: a quick first index, then a steady rate.
_FIRST_CHUNK = 256
_CHUNK = 32768


def _world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill in ``num_replicas``/``rank`` from the default process group, as torch does."""
    if num_replicas is None or rank is None:
        if not (dist.is_available() and dist.is_initialized()):
            missing = "num_replicas" if num_replicas is None else "rank"
            raise DDPSeedError(
                f"{missing}=None needs an initialised torch.distributed process group; call "
                "ddpseed.setup() (or init_process_group) first, or pass num_replicas and rank"
            )
        num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
        rank = dist.get_rank() if rank is None else rank
    num_replicas, rank = operator.index(num_replicas), operator.index(rank)
    if num_replicas < 1:
        raise ValueError(f"num_replicas={num_replicas} must be >= 1")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank={rank} is not in [0, num_replicas={num_replicas})")
    return num_replicas, rank


def shard_sizes(n: int, num_replicas: int, drop_last: bool) -> tuple[int, int]:
    """``(num_samples, total_size)`` by torch's rule, in exact integer arithmetic.

    Without ``drop_last`` every rank gets ``ceil(n / R)`` positions (the global order is padded
    by repeating its head); with it, ``ceil((n - R) / R)`` when ``R`` does not divide ``n``.

    >>> shard_sizes(10, 4, drop_last=False), shard_sizes(10, 4, drop_last=True)
    ((3, 12), (2, 8))
    """
    if drop_last and n % num_replicas:
        num_samples = max(0, -(-(n - num_replicas) // num_replicas))
    else:
        num_samples = -(-n // num_replicas)
    return num_samples, num_samples * num_replicas


class ScalableDistributedSampler(ResumableSampler, Sampler[int]):
    """torch's sharding contract over a lazily evaluated, keyed permutation.

    Global position ``g`` of epoch ``e`` holds item ``perm(g mod N)``, ``perm`` being the
    Feistel bijection keyed by ``(seed, e)`` (the identity when ``shuffle=False``); rank ``r``
    iterates positions ``r, r + R, ...`` below ``total_size``.

    >>> a = ScalableDistributedSampler(range(5), num_replicas=2, rank=0, seed=3)
    >>> b = ScalableDistributedSampler(range(5), num_replicas=2, rank=1, seed=3)
    >>> both = list(a) + list(b)
    >>> len(both), sorted(set(both))  # every item once, plus one padded repeat
    (6, [0, 1, 2, 3, 4])
    """

    # Which order a saved position refers to (a loader's state records it; torch's is 0).
    sample_order = ORDER_VERSION

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.num_replicas, self.rank = _world(num_replicas, rank)
        self.seed = validate_seed(seed)
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.num_items = len(dataset)
        if self.num_items > MAX_N:
            raise ValueError(f"len(dataset)={self.num_items} is above the supported 2**63")
        self.num_samples, self.total_size = shard_sizes(
            self.num_items, self.num_replicas, self.drop_last
        )
        self._perm: FeistelPermutation | None = None

    def __len__(self) -> int:
        return self.num_samples

    def set_origin(self, origin: int) -> None:
        super().set_origin(origin)
        self.num_samples = self.length_at(origin)

    def permutation(self) -> FeistelPermutation | None:
        """This epoch's bijection (``None`` when not shuffling or the dataset is empty)."""
        if not self.shuffle or self.num_items == 0:
            return None
        key = self.seed | (self.epoch << 32)  # seeds are < 2**32: (seed, epoch) -> distinct keys
        if self._perm is None or self._perm.key != key:
            self._perm = FeistelPermutation(self.num_items, key, DEFAULT_ROUNDS)
        return self._perm

    def index_at(self, position: int) -> int:
        """The dataset index at ``position`` of this rank's shard in the current epoch.

        >>> s = ScalableDistributedSampler(range(100), num_replicas=3, rank=2, shuffle=False)
        >>> s.index_at(0), s.index_at(33)  # position 33 is global 101, a repeat of global 1
        (2, 1)
        """
        position = operator.index(position)
        if not 0 <= position < self.num_samples:
            raise IndexError(f"position {position} is outside this rank's shard [0, {len(self)})")
        source = (self.origin + self.rank + position * self.num_replicas) % self.num_items
        perm = self.permutation()
        return source if perm is None else perm.index(source)

    def _chunk(self, perm: FeistelPermutation | None, start: int, stop: int) -> list[int]:
        """Dataset indices of shard positions ``[start, stop)``."""
        first = self.origin + self.rank + start * self.num_replicas
        last = first + (stop - 1 - start) * self.num_replicas
        # Positions past N repeat the head of the order (padding); 32-bit words where they fit.
        dtype = np.uint32 if last < NARROW_N else np.uint64
        sources = np.arange(stop - start, dtype=dtype)
        sources *= dtype(self.num_replicas)
        sources += dtype(first)
        if last >= self.num_items:
            sources %= dtype(self.num_items)
        if perm is None:
            return sources.tolist()  # type: ignore[no-any-return]
        return perm.permute(sources.astype(perm.dtype, copy=False)).tolist()  # type: ignore[no-any-return]

    def _chunks(self, perm: FeistelPermutation | None, start: int) -> Iterator[list[int]]:
        size = _FIRST_CHUNK
        while start < self.num_samples:
            stop = min(start + size, self.num_samples)
            yield self._chunk(perm, start, stop)
            start, size = stop, min(size * 4, _CHUNK)

    def _indices(self, start: int) -> Iterator[int]:
        # The epoch is fixed when iteration starts, as in torch (a later set_epoch can't leak in).
        # chain() hands out each chunk's ints at C speed, which a generator's yield would not.
        return itertools.chain.from_iterable(self._chunks(self.permutation(), start))
