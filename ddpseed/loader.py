"""The loader ``plan.dataloader()`` returns: torch's DataLoader that owns its epoch and position.

It keeps torch's contract (``.dataset``, ``.sampler``, ``.batch_size``, ``.drop_last`` are what
the user passed or would get from torch; ``loader.sampler.set_epoch(e)`` works) and adds
torchdata's ``Stateful`` protocol: :meth:`~SeededDataLoader.state_dict` /
:meth:`~SeededDataLoader.load_state_dict`.

What one ``iter()`` does (the rule, in one place):

- The epoch is the sampler's (``loader.set_epoch``, ``plan.set_epoch`` and
  ``loader.sampler.set_epoch`` all set it). A new epoch starts at sample 0.
- Every ``iter(loader)`` starts at the *restore point* of the epoch: 0, or the position a
  ``load_state_dict`` restored. So a probe ``next(iter(loader))`` before the training loop does
  not lose a restored position: the training loop's own ``iter()`` starts there again.
- When a pass reaches the end of the shard (``StopIteration``), the restore point goes back to
  0: the next ``iter()`` is a full new pass, as with torch (a validation loader evaluated again).
- The position counts samples *handed to the caller* by the latest iterator, not samples
  prefetched by workers, so a checkpoint taken after step k resumes at the first sample of
  step k + 1. A state saved after the last batch but before ``StopIteration`` resumes with an
  empty rest of the epoch; one saved after ``StopIteration`` resumes with a new pass (as
  torchdata's ``StatefulDataLoader`` does).

- After ``load_state(..., elastic=True)`` the interrupted epoch's shards are dealt from the
  saved global position (the sampler's *origin*, see :mod:`ddpseed.elastic`); a pass that
  ends, or a new epoch, deals them from 0 again.

In a distributed job every ``iter()`` of a distributed loader is one small collective that
checks that every rank iterates the same loader at the same epoch and position.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .collective import call_id, disagreement, exchange
from .compat import (
    AUTO_NAME,
    CONTRACT,
    ELASTIC_FREE,
    LEGACY,
    LOADER_FIXES,
    epoch_move_problem,
    identity_problem,
)
from .derivation import loader_seed
from .elastic import EpochPoint, global_position, loader_key
from .errors import AgreementError, StateError
from .topology import Topology
from .workers import RANDOMNESS, Randomness, SeededBatchSampler, WorkerInitFn

_ONLY_SOME_RANKS = (
    "A loader that only some ranks iterate on purpose (evaluation on rank 0) needs "
    "plan.dataloader(..., distributed=False)."
)


class SeededDataLoader(DataLoader[Any]):
    """``torch.utils.data.DataLoader`` over a seeded shard that owns its epoch and position."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None,
        *,
        sampler: Any,
        drop_last: bool,
        shuffle: bool,
        seeds: WorkerInitFn,
        name: str,
        checks: Topology | None,
        check_timeout: float,
        randomness: Randomness = "batch",
        distributed: bool = True,
        **kwargs: Any,
    ) -> None:
        workers = int(kwargs.get("num_workers", 0))
        if randomness not in RANDOMNESS:
            raise ValueError(f"randomness={randomness!r}: choose one of {RANDOMNESS}")
        if batch_size is None and (workers or randomness == "sample"):
            raise TypeError(
                f"plan.dataloader(batch_size=None, num_workers={workers}, randomness="
                f"{randomness!r}) has no batch to carry the seeds, so it could not resume "
                "exactly; give a batch_size, or num_workers=0 and randomness='batch'"
            )
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            worker_init_fn=seeds,
            generator=torch.Generator(),
            **kwargs,
        )
        if batch_size is not None:
            # torch made a plain BatchSampler over the same sampler; ours numbers batches from
            # the sampler's seek and carries their seeds. torch guards the attribute against
            # users swapping it mid-run, which is not what happens here.
            batches = SeededBatchSampler(
                sampler, batch_size, drop_last, seeds, workers, randomness, owner=name
            )
            object.__setattr__(self, "batch_sampler", batches)
        self.name = name
        self.randomness: Randomness = randomness
        # Sharded over the job's ranks (the shards an elastic resume re-deals), or this rank's.
        self.distributed = distributed
        self._seeds = seeds
        self._shuffle = shuffle
        # The job whose ranks every iter() checks; None for a loader of this rank alone.
        self._topology = checks
        self._timeout = check_timeout  # of the iter() check; DataLoader's timeout= is torch's
        self._step = batch_size or 1
        self._shard_length = 0  # len(self.sampler), taken once per pass by __iter__
        self._epoch = int(sampler.epoch)  # the epoch the progress below belongs to
        self._resume_at = 0
        self._position = 0
        self._finished = False
        self._passes = 0
        # Which pass counts: a number, not a reference, so a finished pass's iterator (and the
        # shard's index list it holds) is freed when the caller's loop drops it, as with torch.
        self._latest = 0
        # Passes numbered below this began before a load_state_dict: they must not go on.
        self._restored = 0
        # How many states it took: compared at iter(), so a restore on some ranks alone (whose
        # RNGs then differ from the others') stops the job instead of going on half resumed.
        self._restores = 0
        # Restored from a state saved after its pass ended: a new pass of that epoch repeats it.
        self._restored_finished = False
        # The state restored last, until the epoch next changes (epoch_move_problem).
        self._restored_state: dict[str, Any] | None = None
        self._warned = False

    # -- epoch --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` (the same as ``loader.sampler.set_epoch(epoch)``)."""
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    @property
    def epoch(self) -> int:
        return int(self.sampler.epoch)  # type: ignore[attr-defined]

    def _sync_epoch(self) -> None:
        if self.epoch != self._epoch:
            self._epoch = self.epoch
            self._resume_at = self._position = self._passes = 0
            self._finished = self._restored_finished = False
            self._latest += 1

    # -- iteration ----------------------------------------------------------------------------
    def _check_epoch_move(self) -> None:
        problem = epoch_move_problem(self.name, self._restored_state, self.epoch)
        if problem:
            raise StateError(problem)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self._check_epoch_move()
        self._sync_epoch()
        start = self._resume_at
        self._check_ranks(start)
        self.sampler.seek(start)  # type: ignore[attr-defined]
        self._seeds.epoch = self._epoch
        # torch draws the workers' base seed (get_worker_info().seed) from this generator:
        # new each epoch and rank, a pure function of them, and the global RNG is not touched.
        self.generator.manual_seed(
            loader_seed(
                self._seeds.base_seed,
                self._seeds.rank,
                self._epoch,
                self._seeds.key,
                self._seeds.stream,
            )
        )
        self._position, self._finished = start, False
        self._shard_length = len(self.sampler)  # type: ignore[arg-type]
        self._latest += 1
        if self._restored_finished and self._shuffle and not self._warned:
            # Warned as the pass starts, not when it ends: by then a whole epoch is replayed.
            self._warned = True
            warnings.warn(
                f"loader {self.name!r} was restored from a state saved after its pass of epoch "
                f"{self._epoch} had ended, and a second full pass of epoch {self._epoch} starts "
                "now, in the same order. For a checkpoint taken at the end of an epoch, call "
                "plan.set_epoch(epoch + 1) before save_state, so that it resumes with the next "
                "epoch (README: Exact resume)",
                UserWarning,
                stacklevel=2,  # __iter__ <- the caller's for loop
            )
        self._restored_finished = False
        return _Pass(self._torch_iterator(), self, self._latest)

    def _torch_iterator(self) -> Iterator[Any]:
        batches = self.batch_sampler
        if not isinstance(batches, SeededBatchSampler):  # batch_size=None: no batches
            return super().__iter__()
        batches.armed = True  # torch calls iter() on it here (twice with workers), never later
        try:
            return super().__iter__()
        finally:
            batches.armed = False

    def _check_ranks(self, start: int) -> None:
        if self._topology is None:
            return
        reports = exchange(
            f"iter(loader {self.name!r})",
            (call_id(self.name), self._epoch, start, self._restores),
            None,
            self._topology,
            self._timeout,
            hint=_ONLY_SOME_RANKS,
        )
        differs = disagreement(reports, ("loader", "epoch", "start position", "states loaded"))
        if differs:
            raise AgreementError(
                f"rank {self._topology.rank}: ranks disagree at iter(loader {self.name!r}) "
                f"(loader = a hash of its name):\n{differs}\nfix: iterate the same loaders in "
                "the same order on every rank, call plan.set_epoch(epoch) with the same epoch "
                "everywhere, and resume every rank from the same checkpoint (load_state, "
                "plan.load_state_dict or loader.load_state_dict on every rank, not some)"
            )

    def _advance(self, run: _Pass) -> None:
        if run.number == self._latest:
            self._position = min(self._position + self._step, self._shard_length)
            self._restored_state = None  # it is being continued: the epoch may move on later

    def _end(self, run: _Pass) -> None:
        if run.number != self._latest:
            return
        self._finished, self._resume_at = True, 0
        self._restored_state = None  # the restored epoch is done: nothing left to lose
        self.sampler.set_origin(0)  # type: ignore[attr-defined]  # a new pass is a whole one
        self._passes += 1
        if self._passes == 2 and self._shuffle and not self._warned:
            self._warned = True
            warnings.warn(
                f"loader {self.name!r} completed a second full pass in epoch {self._epoch}: "
                "both passes saw the same order; call plan.set_epoch(epoch) (or "
                "loader.set_epoch) before each epoch",
                UserWarning,
                stacklevel=3,  # _end <- _Pass.__next__ <- the caller's for loop
            )

    # -- Stateful -----------------------------------------------------------------------------
    def contract(self) -> dict[str, int]:
        """What a saved state must match to continue this loader (see :data:`CONTRACT`)."""
        return {
            "dataset_length": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": self.batch_size or 0,
            "drop_last": int(self.drop_last),
            "shuffle": int(self._shuffle),
            "num_workers": self.num_workers,
            "num_replicas": int(self.sampler.num_replicas),  # type: ignore[attr-defined]
            "shard_length": len(self.sampler),  # type: ignore[arg-type]
            "randomness": RANDOMNESS.index(self.randomness),
            "sample_order": int(getattr(self.sampler, "sample_order", 0)),
            "stream": self._seeds.stream,
        }

    def state_dict(self) -> dict[str, Any]:
        """This loader's epoch and position (torchdata's ``Stateful`` protocol)."""
        self._check_epoch_move()  # a state that lost the restored one must not be saved
        return self.snapshot()

    def snapshot(self) -> dict[str, Any]:
        """:meth:`state_dict` without the restored-epoch check: what an undone restore puts
        back (:meth:`rewind`)."""
        self._sync_epoch()
        return {
            "name": self.name,
            "epoch": self._epoch,
            "position": self._position,
            "finished": self._finished,
            "origin": self.sampler.origin,  # type: ignore[attr-defined]
            "global_position": self.global_position(),
            "global_batch": (self.batch_size or 1) * self.sampler.num_replicas,  # type: ignore[attr-defined]
            "distributed": int(self.distributed),
            "seed_key": self._seeds.key,
            **self._identity(),
            **self.contract(),
        }

    def _identity(self) -> dict[str, Any]:
        # The seeds its order and worker draws come from: a position means nothing under others.
        return {"base_seed": self._seeds.base_seed, "scheme": self._seeds.scheme}

    def global_position(self) -> int:
        """Where this loader's epoch stands over all ranks: positions ``[0, result)`` of the
        epoch's global order are consumed (see :mod:`ddpseed.elastic`)."""
        sampler: Any = self.sampler
        if self._finished:
            return len(self.dataset)  # type: ignore[arg-type]
        return global_position(
            len(self.dataset),  # type: ignore[arg-type]
            sampler.num_replicas,
            sampler.origin,
            self._position,
            sampler.drop_last,
        )

    def mismatch(self, state: dict[str, Any]) -> str:
        """Why ``state`` cannot continue this loader ('' if it can); changes nothing."""
        keys = ("epoch", "position", "finished", "origin", "global_position", *CONTRACT)
        if not isinstance(state, dict) or any(k not in state and k not in LEGACY for k in keys):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            return f"loader {self.name!r}: {found} is not a ddpseed loader state"
        if state.get("name", self.name) != self.name and not (
            AUTO_NAME.fullmatch(self.name) and AUTO_NAME.fullmatch(str(state["name"]))
        ):  # two names of creation order: the registry judges those (registry.misplaced)
            return (
                f"loader {self.name!r}: the state is loader {state['name']!r}'s; give each "
                f"loader its own state (a loader renamed since: set state['name'] = "
                f"{self.name!r})"
            )
        # States of older releases lack the seeds: their plan state's identity checked them.
        saved_seeds = [key for key in self._identity() if key in state]
        seeds = identity_problem(state, self._identity(), saved_seeds)
        if seeds:
            return f"loader {self.name!r}: {seeds}"
        now = self.contract()
        for key in ("origin", "global_position"):
            if not (isinstance(state[key], int) and 0 <= state[key] <= now["dataset_length"]):
                return f"loader {self.name!r}: saved {key} {state[key]!r} is outside the epoch"
        seed_key = state.get("seed_key", 0)  # absent from states of older releases
        if isinstance(seed_key, bool) or not (isinstance(seed_key, int) and 0 <= seed_key < 2**32):
            return f"loader {self.name!r}: saved seed_key {seed_key!r} is not in [0, 2**32)"
        now["shard_length"] = self.sampler.length_at(state["origin"])  # type: ignore[attr-defined]
        free = ELASTIC_FREE if state.get("elastic") else frozenset()
        for key, label in CONTRACT.items():
            saved = state.get(key, LEGACY.get(key))
            if key not in free and saved != now[key]:
                fix = LOADER_FIXES.get(key, "resume with the same dataset and loader arguments")
                return (
                    f"loader {self.name!r} was saved with {label} {saved} but is now "
                    f"{label} {now[key]}; {fix}"
                )
        origin, position, _ = self._placement(state)
        length = self.sampler.length_at(origin)  # type: ignore[attr-defined]
        if not (isinstance(state["epoch"], int) and state["epoch"] >= 0) or not (
            isinstance(position, int) and 0 <= position <= length
        ):
            return (
                f"loader {self.name!r}: saved epoch {state['epoch']!r} / position "
                f"{position!r} is outside this shard of {length}"
            )
        return ""

    def _placement(self, state: dict[str, Any]) -> tuple[int, int, bool]:
        """(origin, position, dealt again) this loader continues ``state`` from. A state
        restored with ``load_state(..., elastic=True)`` whose shards were another world's,
        batch size or num_workers is dealt again from its global position (position 0 of the
        new shards); any other state continues where it was."""
        if state.get("elastic"):
            now = self.contract()
            now["shard_length"] = self.sampler.length_at(state["origin"])  # type: ignore[attr-defined]
            if any(state[key] != now[key] for key in ELASTIC_FREE):
                point = EpochPoint(state["epoch"], state["global_position"], state["finished"])
                return point.origin(), 0, True
        return state["origin"], state["position"], False

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` at the next ``iter()``; raises :class:`StateError` (and
        changes nothing) if it was saved by a loader this one cannot continue."""
        problem = self.mismatch(state)
        if problem:
            raise StateError(f"{problem}. Nothing was restored")
        origin = self._continue(state)
        self._restores += 1
        self._restored_state = {
            **{k: state[k] for k in ("epoch", "position", "finished")},
            "origin": origin,
        }

    def rewind(self, state: dict[str, Any]) -> None:
        """Go back to ``state`` (a :meth:`snapshot` of this loader) when a restore is undone:
        not a restore, so nothing is counted or guarded."""
        self._continue(state)
        self._restored_state = None

    def _continue(self, state: dict[str, Any]) -> int:
        """Take ``state``'s epoch and position (already checked); returns the origin."""
        self.set_epoch(int(state["epoch"]))
        self._sync_epoch()
        origin, position, dealt_again = self._placement(state)
        self._seeds.key = int(state.get("seed_key", 0))
        if dealt_again:  # new shards, batches numbered from 0: seeds of their own
            self._seeds.key = loader_key(
                self._seeds.base_seed, state["epoch"], state["global_position"], self._seeds.key
            )
        self.sampler.set_origin(origin)  # type: ignore[attr-defined]
        self._position, self._finished = position, bool(state["finished"])
        self._resume_at = 0 if self._finished else self._position
        self._passes = int(self._finished)
        self._restored_finished = self._finished
        self._latest += 1
        self._restored = self._latest
        return int(origin)

    def __repr__(self) -> str:
        return (
            f"SeededDataLoader(name={self.name!r}, epoch={self.epoch}, position={self._position}"
            f", batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"randomness={self.randomness!r})"
        )


class _Pass:
    """One pass over the shard: torch's iterator, counting what it hands to the caller."""

    def __init__(self, inner: Iterator[Any], loader: SeededDataLoader, number: int) -> None:
        self._inner = inner
        self._loader = loader
        self.number = number

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Any:
        if self.number < self._loader._restored:
            # Its batches would be counted nowhere: the loader now holds the restored position.
            raise StateError(
                f"loader {self._loader.name!r} was restored (load_state / load_state_dict) "
                "while this pass over it was running, so this pass cannot go on: its batches "
                "would not be counted in the restored position. Start a new pass (for batch in "
                "loader) after restoring"
            )
        try:
            item = next(self._inner)
        except StopIteration:
            self._loader._end(self)
            raise
        self._loader._advance(self)
        return item

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]
