"""``load_state(path, plan, elastic=True)``: continue a checkpoint on another world.

A job of ``W`` ranks saved ``W`` files; the new job has ``R`` ranks. New rank ``r`` verifies
the old files ``r, r + R, r + 2R, ...`` (so every old file is read once, and ranks ``>= W``
read none), and every rank sees every old file's *summary*: the epoch and the states of the
distributed loaders, which synchronous DDP ranks share exactly. If they differ, every rank
raises naming the old ranks and their global positions. Otherwise each distributed loader
continues its epoch from the agreed global position (:mod:`ddpseed.elastic`), rank-local
loaders (``distributed=False``) continue from the rank's own old file if it has one, and the
main process's RNGs are re-derived by :func:`~ddpseed.elastic.resume_seed`: old ranks'
streams cannot be mapped onto new ranks.

When the world size is the same and every rank's own file continues this run exactly (same
batch size, num_workers...), the ordinary exact resume is done instead, RNGs included.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from .collective import exchange, ranks_text
from .compat import RUN, identity_problem
from .elastic import resume_seed
from .errors import AgreementError, StateError
from .seeding import capture_rngs, restore_rngs, seed_process

if TYPE_CHECKING:
    from .plan import SeedPlan


def load_elastic(
    path: str | os.PathLike[str], plan: SeedPlan, save: int, world: int, token: int | None
) -> Any:
    """Restore save ``save`` of ``path``, written by ``world`` ranks, onto ``plan``'s world
    (``token``: the save's token from its commit record, None for a record without one).
    Returns the ``extra=`` of the old rank with this rank's number (ranks beyond the old world:
    of old rank ``rank % world``; under DDP every rank's model is the same)."""
    from .commit import state_path
    from .payload import read_state
    from .state import raise_failures

    what = f"load_state({os.fspath(path)!r}, elastic=True)"
    states: dict[int, dict[str, Any]] = {}
    error, exact, extra = None, False, None
    try:
        for old in range(plan.rank, world, plan.world_size):
            states[old], kept = read_state(path, old, save, token)
            extra = kept if old == plan.rank else extra
            problem = _foreign(states[old], plan)
            if problem:
                raise StateError(f"{state_path(path, old, save)}: {problem}")
        if plan.rank >= world:  # a new rank: the extra of the old rank it wraps onto
            extra = read_state(path, plan.rank % world, save, token).extra
        if world == plan.world_size:
            try:
                plan.check_state(states[plan.rank])
                exact = True
            except StateError:
                exact = False  # another batch size or num_workers: continue elastically
    except StateError as exc:
        error = str(exc)
    read = exchange(what, (int(exact),), error, plan.topology, plan.timeout)
    raise_failures(read.lines(), what, plan, "nothing was restored")
    # Asked of the exact resume too: old ranks at different places are refused here, on every
    # rank, before anything is restored (not at the first iter()).
    agreed = _agreed(states, plan, what, save)
    if all(v[0] for v in read.values):
        # Exact; a loader made after this call with another batch size or num_workers is
        # still dealt again from its global position (loader.SeededDataLoader._placement).
        own = states[plan.rank]
        own["loaders"] = {n: _elastic(s) for n, s in own["loaders"].items()}
        plan.load_state_dict(own, source=str(state_path(path, plan.rank, save)))
        return extra
    error = None
    state: dict[str, Any] = {}
    try:
        state = _new_state(agreed, states.get(plan.rank), plan)
        plan.check_state(state, source=what)
    except StateError as exc:
        error = str(exc)
    checked = exchange(what + " (check)", (), error, plan.topology, plan.timeout)
    raise_failures(checked.lines(), what, plan, "nothing was restored")
    plan.load_state_dict(state, source=what)
    return extra


def _foreign(state: dict[str, Any], plan: SeedPlan) -> str:
    """Why ``state`` is not a checkpoint of this run at all ('' if it is)."""
    problem = identity_problem(state, plan._identity(), RUN)
    if problem:
        return problem
    if not isinstance(state.get("loaders"), dict) or not isinstance(state.get("epoch"), int):
        return "not a ddpseed plan state"
    for name, loader in state["loaders"].items():
        if not isinstance(loader, dict) or "global_position" not in loader:
            return f"loader {name!r} has no global position (saved by an older ddpseed)"
    return ""


def summary(state: dict[str, Any]) -> dict[str, Any]:
    """What every old rank's file must share: the epoch and its distributed loaders' states."""
    shared = {n: s for n, s in state["loaders"].items() if s.get("distributed")}
    return {"epoch": state["epoch"], "loaders": shared}


def _agreed(
    states: dict[int, dict[str, Any]], plan: SeedPlan, what: str, save: int
) -> dict[str, Any]:
    """The summary every old rank's file shares; raises on every rank if they differ."""
    mine = json.dumps({old: summary(s) for old, s in states.items()}, sort_keys=True)
    shown = exchange(what + " (positions)", (), mine, plan.topology, plan.timeout)
    every: dict[int, dict[str, Any]] = {}
    for r in range(plan.world_size):
        text = shown.messages.get(r, "{}")
        every.update({int(old): s for old, s in json.loads(text).items()})
    groups: dict[str, list[int]] = {}
    for old, s in sorted(every.items()):
        groups.setdefault(json.dumps(s, sort_keys=True), []).append(old)
    if len(groups) > 1:
        lines = [
            f"  old ranks {ranks_text(olds)}: {_where(json.loads(text))}"
            for text, olds in groups.items()
        ]
        raise AgreementError(
            f"{what}: the {len(every)} old ranks' files of save {save} stand at different "
            "places, so no global position continues all of them; nothing was restored:\n"
            + "\n".join(lines)
            + "\nfix: restore every rank's files from one save_state (the ranks of a "
            "synchronous DDP job always agree)"
        )
    return every[0]


def _where(s: dict[str, Any]) -> str:
    loaders = ", ".join(
        f"loader {name!r} at global position {ld['global_position']}"
        + (" (pass finished)" if ld["finished"] else "")
        + f" of epoch {ld['epoch']}"
        for name, ld in sorted(s["loaders"].items())
    )
    return f"epoch {s['epoch']}" + (f", {loaders}" if loaders else "")


def _new_state(
    agreed: dict[str, Any], own: dict[str, Any] | None, plan: SeedPlan
) -> dict[str, Any]:
    """This rank's plan state on the new world (see the module docstring)."""
    # Each loader continues from the agreed global position where its shards are another
    # world's (SeededDataLoader._placement); the old ranks agree on all of it.
    loaders = {name: _elastic(old) for name, old in agreed["loaders"].items()}
    if own is not None:
        loaders.update({n: s for n, s in own["loaders"].items() if not s.get("distributed")})
    positions = tuple(ld["global_position"] for _, ld in sorted(agreed["loaders"].items()))
    seed = resume_seed(plan.base_seed, plan.rank, agreed["epoch"], positions)
    return {
        **plan._identity(),
        "epoch": agreed["epoch"],
        "rng": _seeded_rngs(seed, plan.cuda_device),
        "loaders": loaders,
    }


def _elastic(loader_state: dict[str, Any]) -> dict[str, Any]:
    """A distributed loader's state, marked to be dealt again if its shards differ."""
    return {**loader_state, "elastic": True} if loader_state.get("distributed") else loader_state


def _seeded_rngs(seed: int, cuda_device: int | None) -> dict[str, Any]:
    """The RNG states ``seed_process(seed)`` gives, computed without keeping them."""
    before = capture_rngs(cuda_device)
    seed_process(seed, cuda_device=cuda_device)
    seeded = capture_rngs(cuda_device)
    restore_rngs(before, cuda_device)
    return seeded
