"""A DataLoader that knows how many samples it has handed to the user.

The position counts samples *returned by the iterator*, not samples prefetched by workers, so
a checkpoint taken after step k resumes at the first sample of step k + 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from .workers import ExactBatchSampler


@dataclass
class Progress:
    """Samples of this rank's shard consumed in the current pass of one loader."""

    position: int = 0
    pending: int | None = None  # a restored position, applied by the next iteration


class TrackedDataLoader(DataLoader[Any]):
    """``torch.utils.data.DataLoader`` that tracks and can restore its data position."""

    def __init__(
        self, *args: Any, shard_sampler: Any, seed: int, step_size: int, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shard_sampler = shard_sampler
        # Samples per item yielded; torch's own batch_size is None under a batch_sampler.
        self.step_size = step_size
        self.progress = Progress()
        self._seed = seed

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # torch draws the workers' base seed from this generator at each new iterator; making
        # that draw a function of the seed alone keeps the global RNG untouched and restorable.
        if isinstance(self.generator, torch.Generator):
            self.generator.manual_seed(self._seed)
        start = self.progress.pending or 0
        self.progress.pending = None
        self.progress.position = start
        if start:
            self.shard_sampler.seek(start)
            if isinstance(self.batch_sampler, ExactBatchSampler):
                self.batch_sampler.first_batch = start // self.step_size
        return _Counting(super().__iter__(), self.progress, self.step_size, len(self.shard_sampler))

    def state_dict(self) -> dict[str, int]:
        position = self.progress.pending
        return {
            "position": self.progress.position if position is None else position,
            "step": self.step_size,
            "shard": len(self.shard_sampler),
        }


class _Counting:
    def __init__(self, inner: Iterator[Any], progress: Progress, step: int, shard: int) -> None:
        self._inner = inner
        self._progress = progress
        self._step = step
        self._shard = shard

    def __iter__(self) -> _Counting:
        return self

    def __next__(self) -> Any:
        item = next(self._inner)
        self._progress.position = min(self._progress.position + self._step, self._shard)
        return item

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]
