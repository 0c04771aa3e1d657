"""DataLoader worker seeding: a picklable ``worker_init_fn`` and per-batch reseeding.

``WorkerInitFn`` seeds a worker with ``worker_seed(base, rank, W, worker_id, epoch, world)``,
W read from ``get_worker_info()`` inside the worker. It is a plain object, so it crosses the
``spawn`` and ``forkserver`` start methods.

Exact resume needs more than that: after a restart mid-epoch, batch ``b`` may be fetched by a
different worker with a different RNG history. :class:`SeededBatchSampler` therefore gives each
batch the seed of its position, ``batch_seed(worker seed of slot b % W, b // W)``, and the
worker reseeds from it right before fetching the batch: the first batch of each slot sees
exactly the worker seed, and every batch's randomness is a pure function of its position,
whichever process fetches it and whether workers are persistent.

The seed rides *with the indices*: a batch pickles as "reseed, then these indices", and a worker
unpickles each batch from its index queue immediately before fetching it. So the dataset, the
sampler and the batch size the user sees on the loader stay torch's own objects, and the
dataset receives a plain ``list`` of indices, as with torch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from torch.utils.data import BatchSampler, get_worker_info

from .derivation import Scheme, batch_seed, rekeyed, sample_seed, worker_seed
from .errors import StateError
from .sampler import ResumableSampler
from .seeding import capture_cpu_rngs, restore_cpu_rngs, seed_cpu, seed_worker_rngs

Randomness = Literal["batch", "sample"]
RANDOMNESS: tuple[Randomness, ...] = ("batch", "sample")


class WorkerInitFn:
    """Picklable ``worker_init_fn`` that applies ddpseed's worker seeds.

    ``epoch`` is set by the loader before its workers start, so non-persistent workers get the
    new epoch's seeds; a user ``then`` callback runs after seeding.
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
        stream: int = 0,
    ) -> None:
        self.base_seed = base_seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = epoch
        self.scheme: Scheme = scheme
        self.then = then
        # 0, or the key of a loader an elastic resume dealt again (derivation.rekeyed).
        self.key = 0
        # plan.dataloader(stream=): 0, or a family of seeds apart from other loaders'.
        self.stream = stream

    def seed_for(self, worker_id: int, num_workers: int, epoch: int | None = None) -> int:
        """The seed of worker ``worker_id`` in ``epoch`` (default: the current epoch)."""
        seed = worker_seed(
            self.base_seed,
            self.rank,
            num_workers,
            worker_id,
            self.epoch if epoch is None else epoch,
            self.world_size,
            scheme=self.scheme,
        )
        return rekeyed(rekeyed(seed, self.stream), self.key)

    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else worker_id + 1
        seed_worker_rngs(self.seed_for(worker_id, num_workers))
        if self.then is not None:
            self.then(worker_id)

    def __repr__(self) -> str:
        return (
            f"WorkerInitFn(base={self.base_seed}, rank={self.rank}/{self.world_size}, "
            f"epoch={self.epoch}, scheme={self.scheme}"
            + (f", stream={self.stream}" if self.stream else "")
            + (f", key={self.key})" if self.key else ")")
        )


def _reseeded(indices: list[int], slot_seed: int, ordinal: int) -> list[int]:
    # Called by pickle where a SeededBatch is unpickled: in a DataLoader worker, which does so
    # right before it fetches these indices. Nothing else unpickles index batches.
    if get_worker_info() is not None:
        seed_worker_rngs(batch_seed(slot_seed, ordinal))
    return indices


class SeededBatch(list[int]):
    """A batch of indices that reseeds the worker that unpickles it, then is a plain list."""

    __slots__ = ("ordinal", "slot_seed")

    def __init__(self, indices: Iterable[int], slot_seed: int, ordinal: int) -> None:
        super().__init__(indices)
        self.slot_seed = slot_seed
        self.ordinal = ordinal

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reseeded, (list(self), self.slot_seed, self.ordinal))


def _sample_keyed(indices: list[int], base: int, epoch: int, stream: int) -> list[int]:
    # Unpickled in the worker that fetches these indices (see _reseeded).
    return SampleKeyedBatch(indices, base, epoch, stream)


class SampleKeyedBatch(list[int]):
    """Indices that seed the fetching process from :func:`sample_seed` before each one.

    torch's fetcher runs ``[dataset[i] for i in batch]``, so iterating the batch is "about to
    fetch item i": each index is handed out right after ``random``, NumPy and torch (CPU) are
    seeded with ``sample_seed(base, epoch, i)`` (rekeyed by the loader's ``stream`` if not
    0). In the main process (``num_workers=0``) its
    own streams are put back when the batch is done, so dropout and model init do not see the
    samples' seeds. Everything else reads the batch as a plain list.
    """

    __slots__ = ("base", "epoch", "stream")

    def __init__(self, indices: Iterable[int], base: int, epoch: int, stream: int = 0) -> None:
        super().__init__(indices)
        self.base = base
        self.epoch = epoch
        self.stream = stream

    def __iter__(self) -> Iterator[int]:
        if get_worker_info() is not None:
            return self._seeding(seed_worker_rngs)
        return self._restoring()

    def _seeding(self, seed: Callable[[int], None]) -> Iterator[int]:
        base, epoch, stream = self.base, self.epoch, self.stream
        for index in list.__iter__(self):
            seed(rekeyed(sample_seed(base, epoch, index), stream))
            yield index

    def _restoring(self) -> Iterator[int]:
        # Saved once per batch, not per sample: capture + restore cost ~80 us, seeding ~7 us.
        saved = capture_cpu_rngs()
        try:
            yield from self._seeding(seed_cpu)
        finally:
            restore_cpu_rngs(saved)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_sample_keyed, (self[:], self.base, self.epoch, self.stream))


class SeededBatchSampler(BatchSampler):
    """torch's ``BatchSampler`` over the shard sampler, starting where the sampler was sought.

    With workers, batch ``b`` of the pass carries its seed (see the module docstring); the
    batch number continues from the sampler's pending start, so a resumed pass numbers its
    batches as the interrupted one did. With ``randomness="sample"`` every batch is a
    :class:`SampleKeyedBatch` instead, whatever the number of workers.
    """

    def __init__(
        self,
        sampler: ResumableSampler,
        batch_size: int,
        drop_last: bool,
        seeds: WorkerInitFn | None = None,
        workers: int = 0,
        randomness: Randomness = "batch",
        *,
        owner: str = "",
    ) -> None:
        if seeds is None:  # made again from (sampler, batch_size, drop_last), as torch's is
            raise TypeError(
                "a ddpseed loader's batch sampler is being made again by a framework that "
                "rebuilds the loader (Lightning's predict, or use_distributed_sampler=True with "
                "a sampler that is not a DistributedSampler, as scalable=True): pass "
                "Trainer(use_distributed_sampler=False), or give the framework a DataLoader of "
                "your own with plan.sampler(), plan.worker_init_fn and plan.generator() "
                "(README: Frameworks)"
            )
        super().__init__(sampler, batch_size, drop_last)
        self.shard: ResumableSampler = sampler
        self.seeds = seeds
        self.workers = workers
        self.randomness: Randomness = randomness
        # True only while its loader's iter() makes torch's iterator: whatever else iterates
        # it (accelerate's prepare or skip_first_batches) would go uncounted.
        self.armed = False
        self.owner = owner  # the loader's name

    def __iter__(self) -> Iterator[list[int]]:
        if not self.armed:
            raise StateError(
                f"the batch sampler of ddpseed loader {self.owner!r} was iterated by something "
                "other than that loader (accelerate's prepare or skip_first_batches, or a "
                "DataLoader built from loader.batch_sampler): the loader would not count those "
                "batches, so a save would resume at the wrong sample, and the batches of two "
                "shardings may mix. Iterate the ddpseed loader itself (move its batches to the "
                "device yourself); to build a DataLoader of your own use plan.sampler(), "
                "plan.worker_init_fn and plan.generator() (README: Frameworks)"
            )
        if self.randomness == "sample":
            return self._sample_keyed()
        return self._batch_keyed()

    def _sample_keyed(self) -> Iterator[list[int]]:
        size, base, epoch = self.batch_size, self.seeds.base_seed, self.shard.epoch
        indices = iter(self.shard)
        while True:
            batch = SampleKeyedBatch(
                itertools.islice(indices, size), base, epoch, self.seeds.stream
            )
            if not batch or (self.drop_last and len(batch) < size):
                return
            yield batch

    def _batch_keyed(self) -> Iterator[list[int]]:
        size, workers, sampler = self.batch_size, self.workers, self.shard
        batch_no = sampler.pending_start // size  # read before iter() consumes the seek
        epoch = sampler.epoch
        indices = iter(sampler)
        slot_seeds = [self.seeds.seed_for(w, workers, epoch) for w in range(workers)]
        while True:
            # islice fills each batch at C speed instead of one Python append per index.
            if workers:
                ordinal, slot = divmod(batch_no, workers)
                batch: list[int] = SeededBatch(
                    itertools.islice(indices, size), slot_seeds[slot], ordinal
                )
            else:
                batch = list(itertools.islice(indices, size))
            if not batch or (self.drop_last and len(batch) < size):
                return
            yield batch
            batch_no += 1
