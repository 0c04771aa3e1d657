"""``setup()``: the one call every rank makes, and its steps.

In order: check the arguments, bring up the process group, read the run record (rank 0), agree
on one base seed and on the settings that must match (:mod:`ddpseed.coordinator`), keep the
record, seed this process. The :class:`~ddpseed.plan.SeedPlan` it returns holds the result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import os
import secrets
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from . import coordinator, group, rundir
from .collective import exchange, ranks_text
from .coordinator import ErrorKind, Proposal, Source, path_id
from .derivation import SCHEMES, Scheme, validate_seed
from .errors import (
    ArgumentError,
    DDPSeedError,
    RunDirError,
    SeedMismatchError,
    StateError,
    shown,
)
from .files import atomic_write_json
from .mesh import MeshSpec, spec_of, spec_of_shape
from .plan import DEFAULT_TIMEOUT, SeedPlan
from .rundir import MANIFEST_FILE, SEED_FILE, Found, RunDir, SeedRecord
from .seeding import cuda_device_or_error, determinism_setting, enable_determinism, seed_process
from .topology import Topology, detect

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

log = logging.getLogger(__name__)

ENV_SEED = "DDPSEED_SEED"
# Far beyond any job, and clear of the timedelta and microsecond-counter overflows that larger
# values reach in torch.
MAX_TIMEOUT = 1e9


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
    raced = False
    if record is None:
        record = rundir.create_seed_record(found, plan.base_seed, plan.seed_source)
        if record.base_seed == plan.base_seed:
            return "", None
        raced = True  # another launch wrote the record since rank 0 looked
    if raced and plan.seed_source == Source.ENTROPY.label:
        # Not "pass no seed": this launch passed none. Its seed was agreed before the record
        # appeared, so it cannot continue the record now; another start of it can.
        return (
            f"another launch created {record.path} (base seed {record.base_seed}) while this "
            f"one started with its own entropy seed {plan.base_seed}, which is now unused; "
            "start this launch again to continue that run's seed, or give it its own run_dir=",
            None,
        )
    if record.base_seed != plan.base_seed:
        log.error("refusing to overwrite %s with base seed %d", record.describe(), plan.base_seed)
        return (
            f"{SEED_FILE} holds base seed {record.base_seed} (source: {record.source}), never "
            f"overwritten; this run's is {plan.base_seed} (from {plan.seed_source}): pass "
            f"seed={record.base_seed} or no seed to continue that run, or a new run_dir=",
            None,
        )
    rundir.mark_used(record)
    return "", record if plan.seed_source == Source.RECORD.label else None


def _check_seconds(name: str, value: object, rank: int) -> None:
    """Refuse a timeout that is not a finite number of seconds in ``(0, MAX_TIMEOUT]``.

    Called before any collective: torch reads 0 as "no timeout" in places and overflows on
    inf, so a bad value would otherwise hang or fail with a message blaming the network.
    """
    number = float(value) if isinstance(value, numbers.Real) else math.nan
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = " (pass timedelta.total_seconds())" if isinstance(value, timedelta) else ""
        reason = f"is a {type(value).__name__}, not a number of seconds{hint}"
    elif math.isnan(number):
        reason = "is not a number"
    elif math.isinf(number):
        reason = "is infinite: a lost peer would hang the job forever"
    elif number <= 0:
        reason = "is not positive"
    elif number > MAX_TIMEOUT:
        reason = f"exceeds {MAX_TIMEOUT:g} seconds (about 31 years)"
    else:
        return
    raise ArgumentError(
        f"rank {rank}: {name}={shown(value)} {reason}; {name} must be a finite number of "
        f"seconds in (0, {MAX_TIMEOUT:g}], e.g. {name}={DEFAULT_TIMEOUT:g}"
    )


def _mesh_spec(
    mesh: Any,
    data_dims: str | Iterable[str] | None,
    distinct_dims: str | Iterable[str] | None,
    rank: int,
    world_size: int,
) -> tuple[MeshSpec | None, str]:
    """This rank's mesh settings and the error they raise ("" if none), for the agreement."""
    if mesh is None:
        given = [
            n
            for n, v in (("data_dims", data_dims), ("distinct_dims", distinct_dims))
            if v is not None
        ]
        if given:
            return None, f"{' and '.join(given)} given without mesh=; pass the world DeviceMesh"
        return None, ""
    try:
        if isinstance(mesh, Mapping) or not hasattr(mesh, "get_coordinate"):
            return spec_of_shape(mesh, rank, world_size, data_dims, distinct_dims), ""
        return spec_of(mesh, rank, world_size, data_dims, distinct_dims), ""
    except DDPSeedError as exc:
        return None, str(exc)


def _refuse_other_meshes(spec: MeshSpec | None, topo: Topology, timeout: float) -> None:
    """Every rank: raise with each rank's mesh settings (they differ; every rank is here)."""
    mine = spec.describe() if spec is not None else "no mesh"
    texts = exchange("mesh settings (ddpseed.setup)", (), mine, topo, timeout).messages
    groups: dict[str, list[int]] = {}
    for rank in range(topo.world_size):
        groups.setdefault(texts.get(rank, "?"), []).append(rank)
    raise SeedMismatchError(
        "ranks were given different mesh settings; no rank was seeded:\n"
        + "\n".join(f"  ranks {ranks_text(rs)}: {text}" for text, rs in groups.items())
        + "\nfix: pass the same world mesh (init_device_mesh with the same shape and names), "
        "data_dims= and distinct_dims= to setup() on every rank"
    )


def _device_mesh(mesh: Any, spec: MeshSpec | None, cuda_device: int | None) -> Any:
    """The DeviceMesh of ``setup(mesh=...)``: the one given, or (for a mapping of sizes) one
    made now, once every rank has agreed on it, over the process group ddpseed made.

    Why make it here: a script that calls init_device_mesh before any process group exists gets
    torch's env:// group, whose store keys collide with an earlier attempt's after a torchrun
    restart (the restarted ranks dial the dead ranks' addresses)."""
    if spec is None or hasattr(mesh, "get_coordinate"):
        return mesh
    if not torch.distributed.is_initialized():  # a world of one: nothing to lay out
        return None
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if cuda_device is not None else "cpu"
    return init_device_mesh(device, spec.shape, mesh_dim_names=spec.names)


def setup(
    seed: int | str | None = None,
    *,
    deterministic: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    backend: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    scheme: Scheme = "default",
    pg_timeout: float | None = None,
    mesh: DeviceMesh | Mapping[str, int] | None = None,
    data_dims: str | Iterable[str] | None = None,
    distinct_dims: str | Iterable[str] | None = None,
) -> SeedPlan:
    """Agree on one base seed across the job and seed this rank; call it on every rank.

    ``seed`` (else ``DDPSEED_SEED``, else a seed recorded in the run directory, else fresh
    entropy on rank 0) becomes the base seed. ``timeout`` bounds ddpseed's own collectives
    (creating the process group, agreeing, checking loaders, saving and loading state), in
    seconds. ``pg_timeout`` is the process group's own timeout for the training's collectives,
    in seconds: ``None`` leaves torch's default on a group ddpseed creates, and leaves a group
    the script made as it is.

    ``mesh``: the job's world ``DeviceMesh`` with named dimensions (DP x TP x PP ...), or a
    mapping of names to sizes (``{"dp": 2, "tp": 2}``) from which ddpseed makes it once every
    rank agrees (``plan.device_mesh``; safe across torchrun restarts). The data
    shard and worker seeds then follow the rank's coordinate over ``data_dims`` (default: the
    names starting with "dp", and "fsdp"/"hsdp"), and the process streams are distinct along
    ``distinct_dims`` (default: pp, ep and the data dims; shared along tp, cp); see
    :mod:`ddpseed.mesh`. Every rank must pass the same settings.
    """
    topo = group.from_existing_group(detect())
    group.refuse_unknown_launch(topo, os.environ)
    _check_seconds("timeout", timeout, topo.rank)
    if pg_timeout is not None:
        _check_seconds("pg_timeout", pg_timeout, topo.rank)
    deterministic, argument_error = determinism_setting(deterministic, topo.rank)
    flags = tuple(enable_determinism()) if deterministic else ()
    cuda_device, device_error = cuda_device_or_error(topo.local_rank, topo.rank)
    if cuda_device is not None:
        # Before any collective: on nccl the agreement's tensors go to the current device, and
        # without this every rank of a node would put them on cuda:0.
        torch.cuda.set_device(cuda_device)
    try:
        where, run_dir_error = rundir.resolve_run_dir(run_dir, topo), ""
    except RunDirError as exc:  # every rank hears of it in the agreement, none waits on it
        where, run_dir_error = None, str(exc)
    group.ensure_process_group(
        topo,
        backend,
        timeout,
        pg_timeout=pg_timeout,
        cuda_device=cuda_device,
        startup_error=device_error,
    )
    proposal = dataclasses.replace(
        _explicit_proposal(seed),
        world_size=topo.world_size,
        run_dir=path_id(str(where.path) if where is not None else None),
        explicit_dir=where is not None and where.explicit,
        scheme=SCHEMES.index(scheme) if scheme in SCHEMES else 0,
        deterministic=bool(deterministic),
    )
    if scheme not in SCHEMES:  # every rank must hear of one rank's typo, not only that rank
        proposal = dataclasses.replace(
            proposal, error=f"scheme={scheme!r} is not one of {SCHEMES}; fix the setup() call"
        )
    spec, mesh_error = _mesh_spec(mesh, data_dims, distinct_dims, topo.rank, topo.world_size)
    if spec is not None:
        proposal = dataclasses.replace(proposal, mesh=spec.agreement_id())
    for error, kind in (
        (mesh_error, ErrorKind.MESH),
        (run_dir_error, ErrorKind.RUN_DIR),
        (argument_error, ErrorKind.ARGUMENT),
        (device_error, ErrorKind.DEVICE),  # the start-up check's, where the script made the group
    ):
        if error and proposal.error is None:
            proposal = dataclasses.replace(proposal, error=error, error_kind=kind)
    found: Found | None = None
    record_error = ""
    if topo.rank == 0 and proposal.error is None:
        proposal, found, record_error = _fallback(proposal, where, timeout)
    chosen_dir = (
        found.dir if found is not None else (where.path if where and where.explicit else None)
    )
    agreement = coordinator.agree(proposal, topo, timeout)
    if agreement.mesh_differs:
        _refuse_other_meshes(spec, topo, timeout)
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
        mesh=spec,
    )
    if agreement.record:
        _persist(plan, where, found, record_error, timeout)
    plan.device_mesh = _device_mesh(mesh, spec, cuda_device)
    if cuda_device is not None and getattr(plan.device_mesh, "device_type", "") == "cuda":
        # DTensor's first random op would otherwise make its RNG tracker with run_state_sync,
        # broadcasting rank 0's CUDA state over every rank's and erasing the policy's streams;
        # manual_seed makes the tracker without that broadcast (and seeds with our seed).
        from torch.distributed.tensor._random import manual_seed as dtensor_manual_seed

        dtensor_manual_seed(plan.process_seed, plan.device_mesh)
    seed_process(plan.process_seed, cuda_device=cuda_device)
    log.info("%r from %s; %r", plan, plan.seed_source, topo)
    return plan
