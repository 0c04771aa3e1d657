"""``setup()`` and the :class:`SeedPlan` it returns: the one call every rank makes."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import secrets
import socket
import time
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from . import coordinator, rundir
from .coordinator import Proposal, Source
from .derivation import Scheme, process_seed, rule, validate_seed, worker_seed
from .errors import DDPSeedError, StateError
from .files import atomic_write_json
from .loader import TrackedDataLoader
from .rundir import MANIFEST_FILE, SEED_FILE, Found, RunDir, SeedRecord
from .sampler import SeededDistributedSampler
from .scalable import ScalableDistributedSampler
from .seeding import enable_determinism, local_cuda_device, seed_process
from .state import FORMAT, capture_rngs, restore_rngs
from .topology import Topology, detect
from .workers import ExactBatchSampler, ExactDataset, WorkerInitFn

log = logging.getLogger(__name__)
# The local build suffix (+cpu, +cu124) does not change RNG streams; the release may.
_TORCH_RELEASE = torch.__version__.split("+")[0]

ENV_SEED = "DDPSEED_SEED"
ENV_DETERMINISTIC = "DDPSEED_DETERMINISTIC"
DEFAULT_TIMEOUT = 300.0


class SeedPlan:
    """Every seed of this rank, and the samplers and loaders that use them.

    Immutable apart from the epoch and the data position. Built by :func:`setup`.
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
    ) -> None:
        self.timeout = timeout
        self._base_seed = validate_seed(base_seed, source="base_seed")
        self._topology = topology
        self._source = source
        self._scheme: Scheme = scheme
        self._cuda_device = cuda_device
        self._deterministic = deterministic
        self._run_dir = run_dir
        self._epoch = 0
        self._samplers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._init_fns: weakref.WeakSet[WorkerInitFn] = weakref.WeakSet()
        self._loaders: list[weakref.ref[TrackedDataLoader]] = []
        self._pending_loaders: list[dict[str, Any]] = []
        self._worker_init_fn = self._new_init_fn()

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
    def process_seed(self) -> int:
        return process_seed(self._base_seed, self.rank, scheme=self._scheme)

    @property
    def epoch(self) -> int:
        return self._epoch

    def worker_seed(self, worker_id: int, num_workers: int, epoch: int = 0) -> int:
        """Seed of this rank's DataLoader worker ``worker_id`` of ``num_workers`` in ``epoch``."""
        return worker_seed(
            self._base_seed,
            self.rank,
            num_workers,
            worker_id,
            epoch,
            self.world_size,
            scheme=self._scheme,
        )

    def _new_init_fn(self, then: Any = None) -> WorkerInitFn:
        fn = WorkerInitFn(
            self._base_seed,
            self.rank,
            self.world_size,
            epoch=self._epoch,
            scheme=self._scheme,
            then=then,
        )
        self._init_fns.add(fn)
        return fn

    @property
    def worker_init_fn(self) -> WorkerInitFn:
        """Picklable ``worker_init_fn`` seeding each worker with its worker seed."""
        return self._worker_init_fn

    def generator(self) -> torch.Generator:
        """A ``torch.Generator`` seeded with the process seed, for a DataLoader."""
        gen = torch.Generator()
        gen.manual_seed(self.process_seed)
        return gen

    # -- data -------------------------------------------------------------------------------
    def sampler(
        self, dataset: Any, shuffle: bool = True, drop_last: bool = False, *, scalable: bool = False
    ) -> Sampler[int]:
        """This rank's shard of one permutation chosen by the shared base seed and the epoch.

        The default is torch's ``DistributedSampler`` order exactly; ``scalable=True`` gives
        :class:`ddpseed.ScalableDistributedSampler` (O(1) memory, any N).
        """
        cls: Any = ScalableDistributedSampler if scalable else SeededDistributedSampler
        sampler = cls(
            dataset,
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=shuffle,
            seed=self._base_seed,
            drop_last=drop_last,
        )
        sampler.set_epoch(self._epoch)
        self._samplers.add(sampler)
        return sampler  # type: ignore[no-any-return]

    def dataloader(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        scalable: bool = False,
        exact: bool = True,
        **kwargs: Any,
    ) -> DataLoader[Any]:
        """A DataLoader over this rank's shard, with seeded workers and a tracked position.

        ``drop_last`` drops the last partial batch (as in DataLoader); the sampler pads shards
        to equal length as torch's does. ``exact`` (default) reseeds workers at each batch so a
        resumed run reproduces in-flight batches bitwise; ``worker_init_fn`` you pass runs
        after ddpseed's seeding. Other keyword arguments go to ``DataLoader``.
        """
        for banned in ("sampler", "batch_sampler", "generator"):
            if banned in kwargs:
                raise TypeError(
                    f"plan.dataloader() chooses the {banned} itself; build your own DataLoader "
                    f"with plan.sampler(), plan.generator() and plan.worker_init_fn instead"
                )
        sampler = self.sampler(dataset, shuffle=shuffle, scalable=scalable)
        init_fn = self._new_init_fn(kwargs.pop("worker_init_fn", None))
        workers = int(kwargs.get("num_workers", 0))
        loader_kwargs: dict[str, Any] = {"worker_init_fn": init_fn, **kwargs}
        if exact and batch_size is not None and workers > 0:
            loader_kwargs["batch_sampler"] = ExactBatchSampler(sampler, batch_size, drop_last)
            data: Any = ExactDataset(dataset, init_fn)
        else:
            loader_kwargs.update(sampler=sampler, batch_size=batch_size, drop_last=drop_last)
            data = dataset
        loader = TrackedDataLoader(
            data,
            shard_sampler=sampler,
            seed=self.process_seed,
            step_size=batch_size or 1,
            generator=self.generator(),
            **loader_kwargs,
        )
        index = len(self._loaders)
        self._loaders.append(weakref.ref(loader))
        if index < len(self._pending_loaders):
            self._restore_loader(loader, self._pending_loaders[index], index)
        return loader

    def set_epoch(self, epoch: int) -> None:
        """Move samplers and workers to ``epoch``; the restored epoch keeps its position."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if epoch != self._epoch:
            for loader in self._live_loaders():
                loader.progress.pending = None
                loader.progress.position = 0
            self._pending_loaders = []
        self._epoch = epoch
        for sampler in list(self._samplers):
            sampler.set_epoch(epoch)
        for fn in list(self._init_fns):
            fn.epoch = epoch

    def _live_loaders(self) -> list[TrackedDataLoader]:
        return [ld for ref in self._loaders if (ld := ref()) is not None]

    # -- records ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        """Everything that determined this run's randomness, as JSON-able values."""
        return {
            "base_seed": self._base_seed,
            "seed_source": self._source,
            "scheme": self._scheme,
            "rule": rule(self._scheme),
            "topology": dataclasses.asdict(self._topology),
            "process_seed": self.process_seed,
            "cuda_device": self._cuda_device,
            "deterministic": list(self._deterministic),
            "run_dir": str(self._run_dir) if self._run_dir else None,
            "versions": {
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def state_dict(self) -> dict[str, Any]:
        """What this rank needs to continue its random streams and data exactly."""
        return {
            "base_seed": self._base_seed,
            "scheme": self._scheme,
            "rank": self.rank,
            "world_size": self.world_size,
            "epoch": self._epoch,
            "torch_version": _TORCH_RELEASE,
            "loaders": [ld.state_dict() for ld in self._live_loaders()],
            "rng": capture_rngs(self._cuda_device),
        }

    def load_state_dict(self, state: dict[str, Any], *, source: str = "state dict") -> None:
        """Restore RNGs, epoch and data positions; checks first, so a bad state changes nothing."""
        self.check_state(state, source=source)
        restore_rngs(state["rng"], self._cuda_device)
        self._epoch = -1  # force set_epoch to treat the restored epoch as new, then restore
        self.set_epoch(int(state["epoch"]))
        self._pending_loaders = list(state["loaders"])
        for index, loader in enumerate(self._live_loaders()):
            if index < len(self._pending_loaders):
                self._restore_loader(loader, self._pending_loaders[index], index)

    def _restore_loader(self, loader: TrackedDataLoader, saved: dict[str, Any], i: int) -> None:
        problem = self._loader_mismatch(loader, saved, i)
        if problem:
            raise StateError(problem)
        loader.progress.pending = int(saved["position"])

    def _loader_mismatch(self, loader: TrackedDataLoader, saved: dict[str, Any], i: int) -> str:
        now = {"step": loader.step_size, "shard": len(loader.shard_sampler)}
        if {k: saved.get(k) for k in now} == now:
            return ""
        return (
            f"rank {self.rank}: loader #{i} was saved with batch size {saved.get('step')} over a "
            f"shard of {saved.get('shard')} samples, but is now batch size {now['step']} over "
            f"{now['shard']}; resume with the same dataset and batch size. Nothing was restored"
        )

    def check_state(self, state: dict[str, Any], *, source: str = "state dict") -> None:
        """Raise :class:`StateError` if ``state`` cannot continue this run; changes nothing."""

        def mismatch(what: str, saved: object, now: object, fix: str) -> StateError:
            return StateError(
                f"rank {self.rank}: {source} was saved with {what} {saved!r} but this run has "
                f"{now!r}; {fix}. Nothing was restored"
            )

        required = ("base_seed", "scheme", "rank", "world_size", "epoch", "loaders", "rng")
        missing = [k for k in required if k not in state]
        if missing:
            raise StateError(f"rank {self.rank}: {source} lacks {missing}; not a {FORMAT} state")
        if state["base_seed"] != self._base_seed:
            raise mismatch(
                "base seed",
                state["base_seed"],
                self._base_seed,
                "pass seed=<saved seed>, or the run_dir of the first attempt, to setup()",
            )
        if state["world_size"] != self.world_size:
            raise mismatch(
                "world size",
                state["world_size"],
                self.world_size,
                "resume with the saved number of ranks (its shards differ from this one's)",
            )
        if state["rank"] != self.rank:
            raise mismatch("rank", state["rank"], self.rank, "load each rank's own file")
        if state["scheme"] != self._scheme:
            raise mismatch("scheme", state["scheme"], self._scheme, "use the saved scheme")
        if state.get("torch_version") != _TORCH_RELEASE:
            raise mismatch(
                "torch",
                state.get("torch_version"),
                _TORCH_RELEASE,
                "RNG state layouts differ between torch releases; resume with the saved one",
            )
        if state["rng"].get("cuda") is not None and self._cuda_device is None:
            raise mismatch("a CUDA generator", "present", "no GPU", "resume on a GPU machine")
        pairs = zip(self._live_loaders(), state["loaders"], strict=False)
        for i, (loader, saved) in enumerate(pairs):
            problem = self._loader_mismatch(loader, saved, i)
            if problem:
                raise StateError(problem)

    def __repr__(self) -> str:
        return (
            f"SeedPlan(base_seed={self._base_seed}, rank={self.rank}/{self.world_size}, "
            f"process_seed={self.process_seed}, epoch={self._epoch}, scheme={self._scheme})"
        )


def _explicit_proposal(seed: object) -> Proposal:
    env = os.environ.get(ENV_SEED)
    try:
        if seed is not None:
            value = validate_seed(seed, source="seed")
            if env is not None and env.strip() != str(value):
                log.warning("seed=%d given; ignoring %s=%r", value, ENV_SEED, env)
            return Proposal(Source.ARGUMENT, value)
        if env is not None:
            return Proposal(Source.ENVIRONMENT, validate_seed(env, source=ENV_SEED))
    except DDPSeedError as exc:
        return Proposal(error=str(exc))
    return Proposal()


def _fallback(
    proposal: Proposal, where: RunDir | None, timeout: float
) -> tuple[Proposal, Found | None, str]:
    """Rank 0: this launch's run record, and the seed to use when nobody is explicit.

    Returns the proposal, what rank 0 found (None when it did not look) and the error it hit
    reading the record. An error, or an explicit seed meeting a record, asks for the record
    step, where rank 0 checks the agreed seed against the record and every rank learns the
    outcome (a :class:`StateError` on every rank).
    """
    found: Found | None = None
    error = ""
    if where is not None and (proposal.seed is None or where.explicit or where.restart):
        try:
            found = rundir.find_record(where, timeout)
        except DDPSeedError as exc:
            error = str(exc)
    recorded = found.record if found is not None else None
    if error or (recorded is not None and proposal.seed is not None):
        proposal = dataclasses.replace(proposal, explicit_dir=True)
    if proposal.seed is not None:
        return proposal, found, error
    if error or recorded is not None:
        # Source.RECORD takes the record step; on an error nobody is seeded with the placeholder.
        seed = recorded.base_seed if recorded is not None else 0
        return (
            dataclasses.replace(proposal, fallback=seed, fallback_source=Source.RECORD),
            found,
            error,
        )
    if where is not None and where.restart:
        log.warning(
            "%s of this launch, but %s holds no run record (the first attempt never reached "
            "ddpseed.setup, or its record was removed): drawing a new seed, so a checkpoint "
            "of an earlier attempt will not load; pass its seed= to resume it",
            where.restart,
            found.dir if found is not None else where.path,
        )
    fresh = secrets.randbits(32)
    return (
        dataclasses.replace(proposal, fallback=fresh, fallback_source=Source.ENTROPY),
        found,
        error,
    )


def _persist(
    plan: SeedPlan, where: RunDir | None, found: Found | None, error: str, timeout: float
) -> None:
    """The record step: rank 0 checks or writes the seed record (and in a directory the user
    named, the manifest); every rank learns whether that worked.

    Called on every rank when the agreement says rank 0 keeps a record, whatever directory
    (if any) the other ranks were given: the decision is rank 0's, made from agreed inputs.
    The record is never rewritten: a seed that contradicts it stops every rank.
    """
    reused: SeedRecord | None = None
    if plan.rank == 0 and not error:
        try:
            error, reused = _check_or_write(plan, found)
            if not error and where is not None and where.explicit and found is not None:
                atomic_write_json(found.dir / MANIFEST_FILE, plan.manifest(), what="manifest")
        except StateError as exc:
            error = str(exc)
    if plan.rank != 0:
        error = ""
    failures = coordinator.share_errors(error or None, plan.topology, timeout, "the run record")
    if failures:
        shown = found.dir if found is not None else (where.path if where else "rank 0's run dir")
        raise StateError(
            f"rank 0 could not use the run record in {shown}; no rank continues:\n"
            + "\n".join(f"  {line}" for line in failures)
        )
    if plan.seed_source == Source.RECORD.label:
        # Once per job, not once per rank: rank 0 warns, the others note it at INFO.
        if reused is not None:
            log.warning(
                "base seed %d reused from the run record (source: %s, created %s by %s): %s "
                "continues it%s. A new launch draws its own seed; pass run_dir= or seed= to "
                "continue a record explicitly",
                reused.base_seed,
                reused.source,
                reused.created,
                reused.launch,
                reused.path,
                f" ({where.restart})" if where is not None and where.restart else "",
            )
        else:
            log.info(
                "rank %d: base seed %d reused from rank 0's run record", plan.rank, plan.base_seed
            )


def _check_or_write(plan: SeedPlan, found: Found | None) -> tuple[str, SeedRecord | None]:
    """Rank 0: the error of this record step ("" if none) and the record it continues."""
    if found is None:
        return "", None
    record = found.record
    if record is None:
        record = rundir.create_seed_record(found, plan.base_seed, plan.seed_source)
        if record.base_seed == plan.base_seed:
            return "", None
    if record.base_seed != plan.base_seed:
        log.error("refusing to overwrite %s with base seed %d", record.describe(), plan.base_seed)
        # Short: the record step carries each rank's message in 256 bytes.
        return (
            f"{SEED_FILE} holds base seed {record.base_seed} (source: {record.source}), never "
            f"overwritten; this run's is {plan.base_seed} (from {plan.seed_source}): pass "
            f"seed={record.base_seed} or no seed to continue that run, or a new run_dir=",
            None,
        )
    rundir.mark_used(record)
    return "", record if plan.seed_source == Source.RECORD.label else None


def setup(
    seed: int | str | None = None,
    *,
    deterministic: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    scheme: Scheme = "default",
) -> SeedPlan:
    """Agree on one base seed across the job and seed this rank; call it on every rank.

    ``seed`` (else ``DDPSEED_SEED``, else a seed recorded in the run directory, else fresh
    entropy on rank 0) becomes the base seed. ``timeout`` bounds every collective, in seconds.
    """
    topo = detect()
    if deterministic is None:
        deterministic = os.environ.get(ENV_DETERMINISTIC, "").lower() in ("1", "true", "yes", "on")
    flags = tuple(enable_determinism()) if deterministic else ()
    cuda_device = local_cuda_device(topo.local_rank)
    if cuda_device is not None:
        # Before any collective: on nccl the agreement's tensors go to the current device, and
        # without this every rank of a node would put them on cuda:0.
        torch.cuda.set_device(cuda_device)
    where = rundir.resolve_run_dir(run_dir, topo)
    coordinator.ensure_process_group(topo, backend, timeout)
    proposal = dataclasses.replace(
        _explicit_proposal(seed),
        run_dir=str(where.path) if where is not None else None,
        explicit_dir=where is not None and where.explicit,
    )
    found: Found | None = None
    record_error = ""
    if topo.rank == 0 and proposal.error is None:
        proposal, found, record_error = _fallback(proposal, where, timeout)
    chosen_dir = (
        found.dir if found is not None else (where.path if where and where.explicit else None)
    )
    agreement = coordinator.agree(proposal, topo, timeout)
    if topo.rank in agreement.other_run_dir:
        log.warning(
            "rank %d: run directory %s differs from rank 0's; only rank 0 reads and writes the "
            "run record, so this rank's is unused (give every rank the same run_dir= or "
            "DDPSEED_RUN_DIR)",
            topo.rank,
            where.path if where is not None else None,
        )
    if agreement.source == Source.ENTROPY:
        # Once per job, not once per rank: rank 0 warns, the others note it at INFO.
        log.log(
            logging.WARNING if topo.rank == 0 else logging.INFO,
            "base seed %d drawn from OS entropy; replay this run with DDPSEED_SEED=%d",
            agreement.base_seed,
            agreement.base_seed,
        )
    plan = SeedPlan(
        agreement.base_seed,
        topo,
        source=agreement.source.label,
        scheme=scheme,
        cuda_device=cuda_device,
        deterministic=flags,
        run_dir=chosen_dir,
        timeout=timeout,
    )
    if agreement.record:
        _persist(plan, where, found, record_error, timeout)
    seed_process(plan.process_seed, cuda_device=cuda_device)
    log.info("%r from %s; %r", plan, plan.seed_source, topo)
    return plan


def topology() -> Topology:
    """The detected topology of this process (see :func:`ddpseed.topology.detect`)."""
    return detect()
