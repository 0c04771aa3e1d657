"""The loaders one plan made, by name, and restored loader states waiting for their loader.

A saved loader state is matched to a loader by its name, never by its place among the loaders
still alive: a loader that was dropped (a throwaway statistics loader) keeps its creation number,
so the loaders after it keep their names. States restored before their loader exists wait here
until ``plan.dataloader()`` makes it; until then the restore can be undone whole.
"""

from __future__ import annotations

import weakref
from typing import Any

from .loader import SeededDataLoader

# (RNG states, epoch, live loaders' states) as they were before a restore.
Before = tuple[dict[str, Any], int, dict[str, dict[str, Any]]]


class LoaderRegistry:
    def __init__(self) -> None:
        self._live: dict[str, weakref.ref[SeededDataLoader]] = {}
        self._made = 0
        self._pending: dict[str, dict[str, Any]] = {}
        self._before: Before | None = None

    def new_name(self, name: str | None) -> str:
        """``name``, or ``"loader<k>"`` with k the number of loaders made before this one."""
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name={name!r}: a loader's name must be a non-empty string")
        chosen = f"loader{self._made}" if name is None else name
        self._made += 1
        return chosen

    def add(self, loader: SeededDataLoader) -> None:
        # A newer loader of the same name (one remade every epoch) takes the name over.
        self._live[loader.name] = weakref.ref(loader)
        if not self._pending:
            self._before = None

    def live(self) -> dict[str, SeededDataLoader]:
        return {name: ld for name, ref in self._live.items() if (ld := ref()) is not None}

    def set_epoch(self, epoch: int) -> None:
        for loader in self.live().values():
            loader.set_epoch(epoch)
        # A state restored for another epoch than the one now starting has nothing to resume.
        self._pending = {n: s for n, s in self._pending.items() if s.get("epoch") == epoch}

    def pending_for(self, name: str, epoch: int) -> dict[str, Any] | None:
        """The restored state waiting for loader ``name`` at ``epoch``, if any (taken)."""
        state = self._pending.pop(name, None)
        return state if state is not None and state.get("epoch") == epoch else None

    def state_dict(self) -> dict[str, Any]:
        # Restored states no loader has claimed yet are carried on, not lost.
        loaders = {**self._pending, **{n: ld.state_dict() for n, ld in self.live().items()}}
        return {"loaders": loaders, "loaders_made": self._made}

    def restore(self, saved: dict[str, dict[str, Any]], rng: dict[str, Any], epoch: int) -> None:
        """Give live loaders their saved states (already checked) and keep the rest waiting;
        ``rng`` and ``epoch`` are the plan's before the restore, for :meth:`undo`."""
        live = self.live()
        prior = {name: ld.state_dict() for name, ld in live.items()}
        for name, loader in live.items():
            if name in saved:
                loader.load_state_dict(saved[name])
        self._pending = {n: s for n, s in saved.items() if n not in live}
        self._before = (rng, epoch, prior) if self._pending else None

    def undo(self) -> Before | None:
        """Forget the waiting states; return what was there before the restore, if undoable."""
        before, self._before, self._pending = self._before, None, {}
        return before

    def put_back(self, prior: dict[str, dict[str, Any]]) -> None:
        for name, loader in self.live().items():
            if name in prior:
                loader.load_state_dict(prior[name])
