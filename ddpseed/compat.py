"""Whether a saved state belongs to this run, and what a loader may be: pure rules.

A plan state (``plan.state_dict()``) records the run that saved it: the *identity* below. A
resume compares it with this run's before anything is restored. So does a loader's state with
the loader it would continue (:data:`CONTRACT`, asked by ``SeededDataLoader.mismatch``), and
a restored loader with the epochs it is then moved to (:func:`epoch_move_problem`).
:func:`refuse_arguments` is what ``plan.dataloader`` cannot take.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

# The local build suffix (+cpu, +cu124) does not change RNG streams; the release may.
TORCH_RELEASE = torch.__version__.split("+")[0]

REQUIRED = ("base_seed", "scheme", "rank", "world_size", "epoch", "loaders", "rng")
RNG_KEYS = ("python", "numpy", "torch")  # what ddpseed.seeding.capture_rngs records
# The way out when a resume changes the world, batch size or workers (README, Elastic).
ELASTIC = (
    "pass elastic=True to ddpseed.load_state to continue the interrupted epoch from the global "
    "position the old ranks reached (every unconsumed sample exactly once, RNGs re-derived; "
    "see README, Elastic)"
)
# What a plan state records of its run: key -> (how a message names it, the fix).
IDENTITY: dict[str, tuple[str, str]] = {
    "base_seed": (
        "base seed",
        "pass seed=<saved seed>, or the run_dir of the first attempt, to setup()",
    ),
    "world_size": (
        "world size",
        "resume with the saved number of ranks (its shards differ from this one's), or " + ELASTIC,
    ),
    "rank": ("rank", "load each rank's own file"),
    "scheme": ("scheme", "use the saved scheme"),
    "mesh": (
        "mesh",
        "resume with the saved mesh, data_dims and distinct_dims (streams follow them)",
    ),
    "torch_version": (
        "torch",
        "RNG state layouts differ between torch releases; resume with the saved one",
    ),
}
# What marks a checkpoint as another run's even when an elastic resume changes the world
# (an elastic resume under a mesh is refused, so a mesh checkpoint is another run's too).
RUN = ("base_seed", "scheme", "torch_version", "mesh")


def identity_problem(
    state: Mapping[str, Any], now: Mapping[str, Any], keys: Iterable[str] = IDENTITY
) -> str:
    """Why ``state`` was not saved by the run whose identity is ``now`` ('' if it was).

    >>> identity_problem({"rank": 1}, {"rank": 0}, ["rank"])
    "saved with rank 1 but this run has 0; load each rank's own file"
    """
    for key in keys:
        label, fix = IDENTITY[key]
        if state.get(key) != now[key]:
            return f"saved with {label} {state.get(key)!r} but this run has {now[key]!r}; {fix}"
    return ""


def plan_state_problem(state: Any, now: Mapping[str, Any]) -> str:
    """Why ``state`` is not a plan state of the run ``now`` ('' if it is); the loaders' and
    forks' states are checked by their owners."""
    missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state["loaders"], dict):
        return f"lacks {missing or ['loaders by name']}; not a ddpseed plan state"
    epoch, rng = state["epoch"], state["rng"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        return f"saved epoch {epoch!r} is not an epoch (an int >= 0); not a ddpseed plan state"
    if not isinstance(rng, dict) or any(k not in rng for k in RNG_KEYS):
        return f"its RNG states lack {list(RNG_KEYS)}; not a ddpseed plan state"
    return identity_problem(state, now)


# The names plan.dataloader gives loaders made without name=: creation order, not a choice.
AUTO_NAME = re.compile(r"loader[0-9]+")
# What a loader's state must match to continue it: state key -> how a message names it.
CONTRACT = {
    "dataset_length": "dataset length",
    "batch_size": "batch size",
    "drop_last": "drop_last",
    "shuffle": "shuffle",
    "num_workers": "num_workers",
    "num_replicas": "shards (ranks)",
    "shard_length": "shard length",
    "randomness": "randomness (0 'batch', 1 'sample')",
    "sample_order": "sample order",
    "stream": "stream",
}
_OR_ELASTIC = "; or " + ELASTIC
# What an elastic resume may change: the world, the per-rank batch and the workers.
ELASTIC_FREE = frozenset({"batch_size", "num_workers", "num_replicas", "shard_length"})
# States saved before a field existed read as this value: torch's order (sample order 0).
LEGACY = {"sample_order": 0, "stream": 0}
LOADER_FIXES = {
    "sample_order": "a position only means something in the order it was saved in (0: torch's "
    "DistributedSampler order, assumed for states that do not record one; 2 and up: "
    "ScalableDistributedSampler's order, ddpseed.permutation.ORDER_VERSION); resume with the "
    "saved sampler and the ddpseed release that saved it",
    "num_workers": "per-batch worker seeds depend on the number of workers, so the resumed "
    "batches would differ; resume with the saved num_workers" + _OR_ELASTIC,
    "num_replicas": "resume with the saved number of ranks" + _OR_ELASTIC,
    "batch_size": "resume with the saved batch size" + _OR_ELASTIC,
    "randomness": "its samples would draw from other seeds; resume with the saved mode",
    "stream": "its samples would draw from another stream's seeds; resume with the saved "
    "plan.dataloader(stream=...)",
}


def refuse_arguments(dataset: Any, stream: object, kwargs: dict[str, Any]) -> None:
    """What ``plan.dataloader`` cannot take: raises before anything is made."""
    for banned in ("sampler", "batch_sampler", "generator"):
        if banned in kwargs:
            raise TypeError(
                f"plan.dataloader() chooses the {banned} itself; build your own DataLoader "
                f"with plan.sampler(), plan.generator() and plan.worker_init_fn instead"
            )
    if not kwargs.get("in_order", True):
        raise ValueError(
            "plan.dataloader(in_order=False): batches out of order make a count of batches "
            "consumed say nothing of which, so a resume would repeat some samples and skip "
            "others; leave in_order=True"
        )
    if isinstance(dataset, IterableDataset):
        raise TypeError(
            f"plan.dataloader() needs a map-style dataset (__getitem__ and __len__), got "
            f"the IterableDataset {type(dataset).__name__}: an iterable dataset shards and "
            "seeds itself, so ddpseed cannot give it a position to resume from. Use "
            "torch's DataLoader with plan.worker_init_fn and plan.generator(), and shard "
            "by rank inside the dataset"
        )
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"plan.dataloader(stream={stream!r}): pass an int in [0, 2**32)")


def epoch_move_problem(name: str, restored: dict[str, Any] | None, epoch: int) -> str:
    """Why moving a loader restored from ``restored`` to ``epoch``, before any other epoch
    change, loses what the checkpoint held ('' if it does not, or nothing was restored).

    Back to an earlier epoch replays epochs the checkpoint had consumed (a loop restarted at
    a stale epoch count: plan.epoch when epochs moved with ``loader.sampler.set_epoch``, or a
    framework's own count); on past an epoch stopped mid-pass skips the rest of it. On from
    position 0 of an epoch is allowed: a loader not used every epoch (validation) follows
    ``plan.set_epoch`` that way.

    >>> epoch_move_problem("t", {"epoch": 3, "position": 8, "origin": 0, "finished": False}, 3)
    ''
    """
    if restored is None or epoch == restored["epoch"]:
        return ""
    finished = bool(restored["finished"])
    began = finished or restored["position"] > 0 or restored["origin"] > 0
    where = f"at position {restored['position']} of epoch {restored['epoch']}"
    if finished:
        where = f"after its pass of epoch {restored['epoch']} had ended"
    if epoch < restored["epoch"]:
        lost = f"back to epoch {epoch}: it would deal again epochs the checkpoint had consumed"
    elif not finished and began:
        lost = f"on to epoch {epoch} first: the rest of epoch {restored['epoch']} would be skipped"
    else:
        return ""
    return (
        f"loader {name!r} was restored {where} and its epoch is now moved {lost}. fix: continue "
        "the loop from the restored epoch, plan.epoch after load_state (epochs moved with "
        "loader.sampler.set_epoch alone do not move plan.epoch: use plan.set_epoch, or start "
        "from loader.epoch); do not let a framework count epochs for a ddpseed loader "
        "(Lightning Fabric's setup_dataloaders does)"
    )
