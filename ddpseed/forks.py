"""``with plan.fork("tp"):``: regions with their own random streams, per mesh coordinate.

Megatron's ``CudaRNGStatesTracker`` for any mesh: inside ``plan.fork(*dims)`` the process's
streams (``random``, NumPy's global RNG, torch's CPU generator and this rank's CUDA generator)
are distinct along the policy's distinct dims *and* ``dims`` (dropout inside a tensor-parallel
region, where every tp rank holds a different shard of the activations); on exit the shared
streams are exactly where they were. A fork's streams continue from one region to the next, and
their states are part of ``plan.state_dict()``, so a resumed run draws the same values in them.

The seed of a fork's first region comes from :meth:`ddpseed.mesh.MeshSpec.seed` with the fork
bit set, so no fork stream equals any process stream or any other fork's stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from .errors import ArgumentError, StateError
from .mesh import MeshSpec
from .seeding import capture_rngs, restore_rngs, seed_process


class Forks:
    """The forked streams of one plan, by the dims they are distinct along."""

    def __init__(self, mesh: MeshSpec | None, base_seed: int, cuda_device: int | None) -> None:
        self._mesh = mesh
        self._base = base_seed
        self._cuda = cuda_device
        self._states: dict[str, dict[str, Any]] = {}  # streams of forks not active now
        self._active: list[str] = []
        self._before_load: dict[str, dict[str, Any]] | None = None

    @property
    def active(self) -> tuple[str, ...]:
        return tuple(self._active)

    def dims(self, extra: Iterable[str], distinct: Iterable[str] | None) -> tuple[str, ...]:
        if self._mesh is None:
            raise ArgumentError(
                "plan.fork() forks streams along mesh dimensions; pass the world DeviceMesh "
                "to ddpseed.setup(mesh=...)"
            )
        return self._mesh.fork_dims(tuple(extra), distinct)

    @contextlib.contextmanager
    def region(self, dims: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        key = ",".join(dims)
        if key in self._active:
            raise ArgumentError(
                f"plan.fork() distinct along ({key}) is already active; a fork cannot be "
                "entered again inside itself (its streams would be saved twice)"
            )
        assert self._mesh is not None  # dims() checked
        shared = capture_rngs(self._cuda)
        saved = self._states.pop(key, None)
        if saved is None:
            seed_process(self._mesh.seed(self._base, dims, fork=True), cuda_device=self._cuda)
        else:
            restore_rngs(saved, self._cuda)
        self._active.append(key)
        try:
            yield dims
        finally:
            self._states[key] = capture_rngs(self._cuda)
            self._active.remove(key)
            restore_rngs(shared, self._cuda)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, Any]]:
        if self._active:
            raise StateError(
                f"state_dict() inside plan.fork() (distinct along {self._active[-1]}): the "
                "shared streams are set aside there; save the state outside the fork region"
            )
        return dict(self._states)

    def problem(self, saved: object) -> str:
        """Why ``saved`` (a state's ``"forks"``) cannot be restored here ('' if it can)."""
        if self._active:
            return f"load inside plan.fork() (distinct along {self._active[-1]}); load outside it"
        if not isinstance(saved, dict) or not all(
            isinstance(v, dict) and "torch" in v for v in saved.values()
        ):
            return "its forked streams are not a ddpseed fork state"
        return ""

    def load_state_dict(self, saved: dict[str, dict[str, Any]]) -> None:
        self._before_load = dict(self._states)
        self._states = dict(saved)

    def undo_load(self) -> None:
        if self._before_load is not None:
            self._states, self._before_load = self._before_load, None
