"""The :class:`SeedPlan` that ``setup()`` returns: a small value, plus factories for samplers
and loaders."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from .collective import disagreement, exchange
from .compat import CONTRACT, TORCH_RELEASE, plan_state_problem, refuse_arguments
from .derivation import Scheme, process_seed, validate_seed, worker_seed
from .errors import AgreementError, StateError
from .forks import Forks
from .loader import SeededDataLoader
from .manifest import manifest as run_manifest
from .mesh import MeshSpec
from .registry import LoaderRegistry
from .sampler import SeededDistributedSampler
from .scalable import ScalableDistributedSampler
from .seeding import capture_rngs, restore_rngs
from .topology import Topology
from .workers import Randomness, WorkerInitFn

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 300.0


class SeedPlan:
    """Every seed of this rank, and factories for the samplers and loaders that use them.

    A small value (base seed, topology, scheme) plus the epoch; each loader it makes owns its
    own position (see :mod:`ddpseed.loader`). Built by :func:`setup`.
    """

    def __init__(
        self,
        base_seed: int,
        topology: Topology,
        *,
        source: str = "argument",
        scheme: Scheme = "default",
        cuda_device: int | None = None,
        deterministic: tuple[str, ...] = (),
        run_dir: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        collective: bool = True,
        mesh: MeshSpec | None = None,
    ) -> None:
        self.timeout = timeout
        # False: a plan made outside setup() to inspect one rank of a job without a process
        # group; its samplers and loaders then make no collectives.
        self._collective = collective
        self._base_seed = validate_seed(base_seed, source="base_seed")
        self._topology = topology
        self._source = source
        self._scheme: Scheme = scheme
        self._cuda_device = cuda_device
        self._deterministic = deterministic
        self._run_dir = run_dir
        self._mesh = mesh
        self.device_mesh: Any = None  # the DeviceMesh of setup(mesh=...), if any
        self._forks = Forks(mesh, self._base_seed, cuda_device)
        self._epoch = 0
        self._samplers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._worker_init_fn = self._init_fn()
        self._loaders = LoaderRegistry()

    # -- seeds ------------------------------------------------------------------------------
    @property
    def base_seed(self) -> int:
        return self._base_seed

    @property
    def topology(self) -> Topology:
        return self._topology

    @property
    def rank(self) -> int:
        return self._topology.rank

    @property
    def local_rank(self) -> int:
        return self._topology.local_rank

    @property
    def world_size(self) -> int:
        return self._topology.world_size

    @property
    def scheme(self) -> Scheme:
        return self._scheme

    @property
    def seed_source(self) -> str:
        return self._source

    @property
    def run_dir(self) -> Path | None:
        return self._run_dir

    @property
    def cuda_device(self) -> int | None:
        return self._cuda_device

    @property
    def deterministic(self) -> tuple[str, ...]:
        return self._deterministic

    @property
    def mesh(self) -> MeshSpec | None:
        return self._mesh

    @property
    def data_rank(self) -> int:
        """This rank's shard: its coordinate over the mesh's data dims (else its rank)."""
        return self._mesh.data_rank if self._mesh is not None else self.rank

    @property
    def data_world_size(self) -> int:
        return self._mesh.data_world_size if self._mesh is not None else self.world_size

    @property
    def process_seed(self) -> int:
        if self._mesh is not None:
            return self._mesh.seed(self._base_seed)
        return process_seed(self._base_seed, self.rank, scheme=self._scheme)

    @property
    def epoch(self) -> int:
        return self._epoch

    def fork(
        self, *dims: str, distinct: Iterable[str] | None = None
    ) -> AbstractContextManager[tuple[str, ...]]:
        """A region whose streams are also distinct along ``dims`` (or along exactly
        ``distinct``); the shared streams are restored on exit. See :mod:`ddpseed.forks`."""
        return self._forks.region(self._forks.dims(dims, distinct))

    def worker_seed(self, worker_id: int, num_workers: int, epoch: int = 0) -> int:
        """Seed of this rank's DataLoader worker ``worker_id`` of ``num_workers`` in ``epoch``."""
        return worker_seed(
            self._base_seed,
            self.data_rank,
            num_workers,
            worker_id,
            epoch,
            self.data_world_size,
            scheme=self._scheme,
        )

    def _init_fn(self, then: Any = None, stream: int = 0) -> WorkerInitFn:
        return WorkerInitFn(
            self._base_seed,
            self.data_rank,
            self.data_world_size,
            epoch=self._epoch,
            scheme=self._scheme,
            then=then,
            stream=stream,
        )

    @property
    def worker_init_fn(self) -> WorkerInitFn:
        """Picklable ``worker_init_fn`` for your own DataLoader (follows ``set_epoch``)."""
        return self._worker_init_fn

    def generator(self) -> torch.Generator:
        """A ``torch.Generator`` seeded with the process seed, for a DataLoader."""
        gen = torch.Generator()
        gen.manual_seed(self.process_seed)
        return gen

    # -- data -------------------------------------------------------------------------------
    def sampler(
        self,
        dataset: Any,
        shuffle: bool = True,
        drop_last: bool = False,
        *,
        scalable: bool = False,
        distributed: bool = True,
    ) -> Sampler[int]:
        """This rank's shard of one permutation chosen by the shared base seed and the epoch.

        The default is torch's ``DistributedSampler`` order exactly; ``scalable=True`` gives
        :class:`ddpseed.ScalableDistributedSampler` (O(1) memory, any N). In a distributed job
        this is collective: every rank must pass a dataset of the same length and the same
        shuffle, drop_last and scalable.
        ``distributed=False``: the whole dataset, for this rank alone (no collective).
        """
        sampler = self._sampler(dataset, shuffle, drop_last, scalable, distributed)
        if distributed and self._collective:
            fields = {
                "dataset length": len(dataset),
                "shuffle": int(shuffle),
                "drop_last": int(drop_last),
                "sample order": int(getattr(sampler, "sample_order", 0)),
            }
            self._agree("plan.sampler()", fields, None)
        self._samplers.add(sampler)
        return sampler  # type: ignore[no-any-return]

    def _sampler(
        self, dataset: Any, shuffle: bool, drop_last: bool, scalable: bool, distributed: bool
    ) -> Any:
        cls: Any = ScalableDistributedSampler if scalable else SeededDistributedSampler
        sampler = cls(
            dataset,
            num_replicas=self.data_world_size if distributed else 1,
            rank=self.data_rank if distributed else 0,
            shuffle=shuffle,
            seed=self._base_seed,
            drop_last=drop_last,
        )
        sampler.set_epoch(self._epoch)
        return sampler

    def dataloader(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        scalable: bool = False,
        name: str | None = None,
        distributed: bool = True,
        randomness: Randomness = "batch",
        stream: int = 0,
        **kwargs: Any,
    ) -> SeededDataLoader:
        """A DataLoader over this rank's shard, with seeded workers and an exact position.

        ``name`` identifies the loader in saved states (default: ``"loader<k>"``, k counting
        every loader this plan made, dropped ones included). In a distributed job, making the
        loader and each ``iter()`` are collective: every rank must make and iterate it, with
        the same dataset length, batch size, drop_last, shuffle and num_workers.
        ``distributed=False``: a loader over the whole dataset for this rank alone (evaluation
        on rank 0), with no collectives. ``worker_init_fn`` you pass runs after ddpseed's
        seeding; other keyword arguments go to ``DataLoader``. ``randomness="sample"`` seeds
        ``random``, NumPy and torch from ``ddpseed.sample_seed(base, epoch, index)`` before each
        item is fetched (the default ``"batch"`` reseeds workers per batch). ``stream=k``
        (k > 0) moves every seed of the loader's data into a family of its own: two loaders
        of one plan with the same stream draw alike (README: Several loaders share the seeds).
        """
        refuse_arguments(dataset, stream, kwargs)
        name = self._loaders.new_name(name)
        loader = SeededDataLoader(
            dataset,
            batch_size,
            sampler=self._sampler(dataset, shuffle, drop_last, scalable, distributed),
            drop_last=drop_last,
            shuffle=shuffle,
            seeds=self._init_fn(kwargs.pop("worker_init_fn", None), stream),
            name=name,
            checks=self._topology if distributed and self._collective else None,
            check_timeout=self.timeout,
            randomness=randomness,
            distributed=distributed,
            **kwargs,
        )
        saved = self._loaders.pending_for(name)
        problem = loader.mismatch(saved) if saved is not None else self._loaders.misplaced(loader)
        contract = {CONTRACT[k]: v for k, v in loader.contract().items()}
        if distributed and self._collective:
            self._agree(f"plan.dataloader(name={name!r})", contract, problem or None)
        elif problem:
            self._undo_restore([f"rank {self.rank}: {problem}"])
        if saved is not None:
            self._loaders.claim(loader, saved)
        self._loaders.add(loader)
        return loader

    def _agree(self, what: str, fields: dict[str, int], problem: str | None) -> None:
        """One collective: every rank's ``fields`` must match, and no rank may have a problem."""
        reports = exchange(
            what,
            list(fields.values()),
            problem,
            self._topology,
            self.timeout,
            hint="Every rank must make it; for a loader of one rank alone pass distributed=False.",
        )
        if reports.messages:
            self._undo_restore(reports.lines())
        differs = disagreement(reports, list(fields))
        if differs:
            raise AgreementError(
                f"rank {self.rank}: ranks disagree on {what}:\n{differs}\nfix: every rank must "
                "build it from the same dataset and arguments (shards would overlap or miss "
                "samples); for a loader of one rank alone pass distributed=False"
            )

    def _undo_restore(self, lines: list[str]) -> None:
        undone = self._loaders.undo()
        if undone is not None:
            (rng, epoch, prior), claimed = undone
            restore_rngs(rng, self._cuda_device)
            self._forks.undo_load()
            for loader, before in claimed:  # made after the restore: fresh again, then
                loader.rewind(before)  # moved to the epoch below like the others
            self._move_epoch(epoch)
            self._loaders.put_back(prior)
        raise StateError(
            "a restored state cannot continue this loader:\n"
            + "\n".join(f"  {line}" for line in lines)
            + (
                "\nload_state's restore was undone on every rank: RNGs, epoch and loader "
                "positions are as they were before it"
                if undone is not None
                else "\nNothing was restored"
            )
        )

    def set_epoch(self, epoch: int) -> None:
        """Move every sampler, loader and worker seed of this plan to ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be an int >= 0")
        problem = self._loaders.epoch_problem(epoch)
        if problem:
            raise StateError(f"rank {self.rank}: {problem}")
        self._move_epoch(epoch)

    def _move_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self._worker_init_fn.epoch = epoch
        for sampler in list(self._samplers):
            sampler.set_epoch(epoch)
        self._loaders.set_epoch(epoch)

    # -- records ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """Everything that determined this run's randomness, as JSON-able values."""
        return run_manifest(self)

    def state_dict(self) -> dict[str, Any]:
        """What this rank needs to continue its random streams and data exactly."""
        return {
            **self._identity(),
            "epoch": self._epoch,
            "rng": capture_rngs(self._cuda_device),
            "forks": self._forks.state_dict(),
            **self._loaders.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "state dict") -> None:
        """Restore RNGs, epoch and loader positions; checks first, so a bad state changes
        nothing. States of loaders not made yet are applied when they are made."""
        self.check_state(state, source=source)
        rng, epoch = capture_rngs(self._cuda_device), self._epoch
        loaders = self._loaders.snapshot()  # before the epoch moves: what an undo puts back
        try:
            restore_rngs(state["rng"], self._cuda_device)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            restore_rngs(rng, self._cuda_device)  # all or nothing: one stream may have moved
            raise StateError(
                f"rank {self.rank}: {source}: its RNG states cannot be restored ({exc!r}). "
                "Nothing was restored"
            ) from exc
        self._forks.load_state_dict(dict(state.get("forks", {})))
        self._move_epoch(int(state["epoch"]))  # a state waiting from an earlier restore is replaced
        self._loaders.restore(dict(state["loaders"]), (rng, epoch, loaders))

    def check_state(self, state: dict[str, Any], *, source: str = "state dict") -> None:
        """Raise :class:`StateError` if ``state`` cannot continue this run; changes nothing."""
        problem = self._state_problem(state)
        if problem:
            raise StateError(f"rank {self.rank}: {source}: {problem}. Nothing was restored")

    def _identity(self) -> dict[str, Any]:
        """What a state records of the run that saved it (see :mod:`ddpseed.compat`)."""
        return {
            "base_seed": self._base_seed,
            "scheme": self._scheme,
            "rank": self.rank,
            "world_size": self.world_size,
            "torch_version": TORCH_RELEASE,
            "mesh": self._mesh.record() if self._mesh is not None else None,
        }

    def _state_problem(self, state: dict[str, Any]) -> str:
        problem = plan_state_problem(state, self._identity())
        problem = problem or self._forks.problem(state.get("forks", {}))
        if problem:
            return problem
        if state["rng"].get("cuda") is not None and self._cuda_device is None:
            return "saved with a CUDA generator but this rank has no GPU; resume on a GPU machine"
        return self._loaders.problem(state["loaders"])

    def __repr__(self) -> str:
        return (
            f"SeedPlan(base_seed={self._base_seed}, rank={self.rank}/{self.world_size}, "
            f"process_seed={self.process_seed}, epoch={self._epoch}, scheme={self._scheme})"
        )
