"""DataLoader worker seeding: a picklable ``worker_init_fn`` and per-batch reseeding.

``WorkerInitFn`` seeds a worker with ``worker_seed(base, rank, W, worker_id, epoch, world)``,
W read from ``get_worker_info()`` inside the worker. It is a plain object, so it crosses the
``spawn`` and ``forkserver`` start methods.

Exact resume needs more than that: after a restart mid-epoch, batch ``b`` may be fetched by a
different worker with a different RNG history. :class:`ExactDataset` therefore reseeds the
worker at every batch with ``batch_seed(worker seed of slot b % W, b // W)``: the first batch
of each slot sees exactly the worker seed, and every batch's randomness is a pure function of
its position, whichever process fetches it and whether workers are persistent.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from .derivation import Scheme, batch_seed, worker_seed


def seed_worker_rngs(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed rather than the CPU generator alone: a worker that starts CUDA (rare,
    # but allowed) then draws from this seed too instead of torch's default one.
    torch.manual_seed(seed)


class WorkerInitFn:
    """Picklable ``worker_init_fn`` that applies ddpseed's worker seeds.

    ``epoch`` is updated by ``SeedPlan.set_epoch`` before workers start, so non-persistent
    workers get the new epoch's seeds; a user ``then`` callback runs after seeding.
    """

    def __init__(
        self,
        base_seed: int,
        rank: int,
        world_size: int,
        *,
        epoch: int = 0,
        scheme: Scheme = "default",
        then: Callable[[int], None] | None = None,
    ) -> None:
        self.base_seed = base_seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.scheme: Scheme = scheme
        self.then = then

    def seed_for(self, worker_id: int, num_workers: int, epoch: int | None = None) -> int:
        """The seed of worker ``worker_id`` in ``epoch`` (default: the current epoch)."""
        return worker_seed(
            self.base_seed,
            self.rank,
            num_workers,
            worker_id,
            self.epoch if epoch is None else epoch,
            self.world_size,
            scheme=self.scheme,
        )

    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else worker_id + 1
        seed_worker_rngs(self.seed_for(worker_id, num_workers))
        if self.then is not None:
            self.then(worker_id)

    def __repr__(self) -> str:
        return (
            f"WorkerInitFn(base={self.base_seed}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch}, scheme={self.scheme})"
        )


class TaggedBatch(list[int]):
    """A batch of indices that knows its epoch and its position in the epoch."""

    epoch: int
    batch_no: int

    def __init__(self, indices: Iterable[int], epoch: int, batch_no: int) -> None:
        super().__init__(indices)
        self.epoch = epoch
        self.batch_no = batch_no

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaggedBatch, (list(self), self.epoch, self.batch_no))


class ExactBatchSampler(Sampler[list[int]]):
    """``BatchSampler`` that tags each batch and can start at a batch number (after a seek)."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.first_batch = 0

    def __iter__(self) -> Iterator[list[int]]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        batch_no, self.first_batch = self.first_batch, 0
        indices = iter(self.sampler)
        while True:
            # islice fills each batch at C speed instead of one Python append per index.
            batch = TaggedBatch(itertools.islice(indices, self.batch_size), epoch, batch_no)
            if not batch or (self.drop_last and len(batch) < self.batch_size):
                return
            yield batch
            batch_no += 1

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


class ExactDataset(Dataset[Any]):
    """Wraps a map-style dataset so each batch fetched in a worker is reseeded by position."""

    def __init__(self, dataset: Any, init_fn: WorkerInitFn) -> None:
        self.dataset = dataset
        self.init_fn = init_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> Any:
        info = get_worker_info()
        if info is not None and isinstance(indices, TaggedBatch):
            # The batch's own epoch, not init_fn's: persistent workers outlive set_epoch.
            ordinal, slot = divmod(indices.batch_no, info.num_workers)
            base = self.init_fn.seed_for(slot, info.num_workers, indices.epoch)
            seed_worker_rngs(batch_seed(base, ordinal))
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems is not None:
            return getitems(list(indices))
        return [self.dataset[i] for i in indices]

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes the wrapper lacks: expose the user's dataset's own.
        if name in ("dataset", "init_fn"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
