"""Whether a saved plan state belongs to this run: pure comparisons of two records.

A plan state (``plan.state_dict()``) records the run that saved it: the *identity* below. A
resume compares it with this run's before anything is restored; the loaders' own contract is
:data:`ddpseed.loader.CONTRACT`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

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
