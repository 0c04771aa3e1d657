"""Distributed samplers that shard one permutation chosen by the shared base seed.

:class:`SeededDistributedSampler` is torch's ``DistributedSampler`` (torch's exact order at
every epoch) plus what exact resume needs: a one-shot start position
(:meth:`~ResumableSampler.seek`), and for an elastic resume an *origin*
(:meth:`~ResumableSampler.set_origin`): the global position the shards of the resumed epoch
start from (see :mod:`ddpseed.elastic`).
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DistributedSampler

from .elastic import shard_length, shard_positions


class ResumableSampler:
    """Epoch bookkeeping shared by ddpseed's samplers.

    Subclasses provide ``_indices(start)`` yielding this rank's shard from position ``start``
    and ``__len__``; this mixin owns ``epoch``, the one-shot seek and the origin.
    """

    epoch: int
    num_replicas: int
    drop_last: bool
    origin: int = 0
    _start: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``; a new epoch drops any pending seek and origin."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self.epoch:
            self._start = 0
            if self.origin:
                self.set_origin(0)
        self.epoch = epoch

    def set_origin(self, origin: int) -> None:
        """Deal this epoch's shards from global position ``origin`` (0: torch's shards)."""
        n = self._items()
        if not 0 <= origin <= n:
            raise ValueError(f"origin {origin} is outside the epoch's positions [0, {n}]")
        self.origin, self._start = origin, 0

    def length_at(self, origin: int) -> int:
        """This rank's shard length if the shards started at ``origin``."""
        return shard_length(self._items(), self.num_replicas, origin, self.drop_last)

    def _items(self) -> int:
        return len(self.dataset)  # type: ignore[attr-defined]

    def seek(self, position: int) -> None:
        """Make the next iteration start at ``position`` of this rank's shard (0-based)."""
        length = len(self)  # type: ignore[arg-type]
        if not 0 <= position <= length:
            raise ValueError(f"position {position} is outside this rank's shard [0, {length}]")
        self._start = position

    @property
    def pending_start(self) -> int:
        """Where the next iteration starts (the last :meth:`seek`, else 0)."""
        return self._start

    def __iter__(self) -> Iterator[int]:
        # Lazy, so nothing happens until the first index is asked for (DataLoader creates and
        # drops one extra sampler iterator per multi-worker iterator); chain then hands out
        # the indices at C speed instead of through a Python generator frame per index.
        return itertools.chain.from_iterable(self._begin())

    def _begin(self) -> Iterator[Iterator[int]]:
        start, self._start = self._start, 0
        yield self._indices(start)

    def _indices(self, start: int) -> Iterator[int]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch}


class SeededDistributedSampler(ResumableSampler, DistributedSampler[int]):
    """``torch.utils.data.DistributedSampler`` with the same order, plus a one-shot seek.

    >>> s = SeededDistributedSampler(range(10), num_replicas=2, rank=1, seed=7)
    >>> list(s) == list(DistributedSampler(range(10), num_replicas=2, rank=1, seed=7))
    True
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        DistributedSampler.__init__(
            self,
            dataset,  # type: ignore[arg-type]  # torch only ever calls len() on it
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )

    def __len__(self) -> int:
        return self.length_at(self.origin) if self.origin else self.num_samples

    def _indices(self, start: int) -> Iterator[int]:
        if self.origin:
            return self._from_origin(start)
        # torch builds the whole shard list; skipping its head is a seek, not a data replay.
        # Advanced in place rather than wrapped in islice: no extra call per index after it.
        indices = DistributedSampler.__iter__(self)
        collections.deque(itertools.islice(indices, start), maxlen=0)
        return indices

    def _from_origin(self, start: int) -> Iterator[int]:
        # torch's global order of this epoch (the permutation its __iter__ draws), dealt from
        # the origin; position x holds order[x mod n], as torch's padding does.
        n = self._items()
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        positions = shard_positions(n, self.num_replicas, self.rank, self.origin, self.drop_last)
        return iter([order[x % n] for x in positions[start:]])
