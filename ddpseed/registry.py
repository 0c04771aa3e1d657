"""The loaders one plan made, by name, and restored loader states waiting for their loader.

A saved loader state is matched to a loader by its name, never by its place among the loaders
still alive: a loader that was dropped (a throwaway statistics loader) keeps its creation number,
so the loaders after it keep their names. States restored before their loader exists wait here
until ``plan.dataloader()`` makes it; until then the restore can be undone whole.

A name must say whose position a state is: two live loaders of one name are refused at a save
or a load, and so is an unnamed loader that gets no state while another unnamed loader's
restored state would continue it (creation order differed: :meth:`LoaderRegistry.misplaced`).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

from .compat import AUTO_NAME, epoch_move_problem
from .errors import StateError
from .loader import SeededDataLoader

# (RNG states, epoch, live loaders' states) as they were before a restore.
Before = tuple[dict[str, Any], int, dict[str, dict[str, Any]]]
# The names plan.dataloader() gives loaders made without name=: their creation order.


class LoaderRegistry:
    def __init__(self) -> None:
        self._live: dict[str, list[weakref.ref[SeededDataLoader]]] = {}
        self._made = 0
        self._pending: dict[str, dict[str, Any]] = {}
        self._before: Before | None = None
        # Loaders that took a waiting state, with their state before it, while undoable.
        self._claimed: list[tuple[weakref.ref[SeededDataLoader], dict[str, Any]]] = []

    def new_name(self, name: str | None) -> str:
        """``name``, or ``"loader<k>"`` with k the number of loaders made before this one."""
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name={name!r}: a loader's name must be a non-empty string")
        chosen = f"loader{self._made}" if name is None else name
        self._made += 1
        return chosen

    def add(self, loader: SeededDataLoader) -> None:
        # A newer loader of the same name (one remade every epoch) takes the name over; while
        # the older one is alive too, a checkpoint cannot tell them apart (see unique()).
        refs = [ref for ref in self._live.get(loader.name, []) if ref() is not None]
        self._live[loader.name] = [*refs, weakref.ref(loader)]
        if not self._pending:
            self._before, self._claimed = None, []

    def _alive(self) -> dict[str, list[SeededDataLoader]]:
        """Every live loader, by name, oldest first."""
        found = {n: [ld for r in refs if (ld := r()) is not None] for n, refs in self._live.items()}
        return {name: loaders for name, loaders in found.items() if loaders}

    def live(self) -> dict[str, SeededDataLoader]:
        """The newest live loader of each name."""
        return {name: loaders[-1] for name, loaders in self._alive().items()}

    def duplicate(self) -> str:
        """Why the live loaders cannot be told apart by name ('' if they can)."""
        twice = [(n, len(lds)) for n, lds in self._alive().items() if len(lds) > 1]
        if twice:
            gc.collect()  # a dropped loader still in a reference cycle is not alive
            twice = [(n, len(lds)) for n, lds in self._alive().items() if len(lds) > 1]
        if not twice:
            return ""
        return (
            f"{twice[0][1]} live loaders are named {twice[0][0]!r}, so a checkpoint "
            "cannot tell which position is whose; give each its own plan.dataloader(..., "
            "name=...), or drop the old one before saving or loading"
        )

    def unique(self) -> dict[str, SeededDataLoader]:
        """:meth:`live`, refusing two live loaders of one name."""
        problem = self.duplicate()
        if problem:
            raise StateError(problem)
        return self.live()

    def epoch_problem(self, epoch: int) -> str:
        """Why moving to ``epoch`` loses a restored state no loader has taken yet ('')."""
        for name, state in self._pending.items():
            problem = epoch_move_problem(name, state, epoch)
            if problem:
                return problem
        return ""

    def set_epoch(self, epoch: int) -> None:
        for loaders in self._alive().values():
            for loader in loaders:
                loader.set_epoch(epoch)
        # A state restored for another epoch than the one now starting has nothing to resume.
        self._pending = {n: s for n, s in self._pending.items() if s.get("epoch") == epoch}

    def pending_for(self, name: str) -> dict[str, Any] | None:
        """The restored state waiting for loader ``name``, if any. Its own epoch is kept: a
        loader's epoch may be its sampler's (``loader.sampler.set_epoch``), not the plan's."""
        return self._pending.get(name)

    def claim(self, loader: SeededDataLoader, state: dict[str, Any]) -> None:
        """Continue ``state`` (already checked) in the new ``loader`` that it waited for."""
        if self._before is not None:
            self._claimed.append((weakref.ref(loader), loader.snapshot()))
        del self._pending[loader.name]
        loader.load_state_dict(state)

    def misplaced(
        self, loader: SeededDataLoader, states: dict[str, dict[str, Any]] | None = None
    ) -> str:
        """Why ``loader``, made without a name and given no state, looks like the loader of
        another restored state in ``states`` (default: those waiting) ('' if it does not)."""
        states = self._pending if states is None else states
        if not AUTO_NAME.fullmatch(loader.name) or loader.name in states:
            return ""
        for other, state in states.items():
            renamed = {**state, "name": loader.name}  # would it continue, under its name
            if AUTO_NAME.fullmatch(other) and not loader.mismatch(renamed):
                return (
                    f"loader {loader.name!r} has no saved state, but the restored state of "
                    f"loader {other!r} (epoch {state['epoch']}, position {state['position']}) "
                    "would continue it and no loader has taken it. Loaders made without name= "
                    "are matched by creation order (dropped loaders count), and this run made "
                    "them in another order than the saved one (a loader made again every epoch "
                    f"does that). To continue this checkpoint pass name={other!r} to this "
                    "loader; from then on give loaders names (name='train')"
                )
        return ""

    def problem(self, saved: dict[str, dict[str, Any]]) -> str:
        """Why the saved loader states cannot continue the live loaders ('' if they can)."""
        live = self.live()
        waiting = {name: state for name, state in saved.items() if name not in live}
        for name, loader in live.items():
            if name in saved:
                problem = loader.mismatch(saved[name])
            else:
                problem = self.misplaced(loader, waiting)
            if problem:
                return problem
        return self.duplicate()

    def state_dict(self) -> dict[str, Any]:
        # Restored states no loader has claimed yet are carried on, not lost.
        loaders = {**self._pending, **{n: ld.state_dict() for n, ld in self.unique().items()}}
        return {"loaders": loaders, "loaders_made": self._made}

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every live loader's :meth:`SeededDataLoader.snapshot`, by name (before a restore)."""
        return {name: ld.snapshot() for name, ld in self.unique().items()}

    def restore(self, saved: dict[str, dict[str, Any]], before: Before) -> None:
        """Give live loaders their saved states (already checked) and keep the rest waiting;
        ``before`` is the plan's RNGs, epoch and :meth:`snapshot` before the restore, for
        :meth:`undo`."""
        live = self.unique()
        for name, loader in live.items():
            if name in saved:
                loader.load_state_dict(saved[name])
        self._pending = {n: s for n, s in saved.items() if n not in live}
        self._before = before if self._pending else None
        self._claimed = []

    def undo(self) -> tuple[Before, list[tuple[SeededDataLoader, dict[str, Any]]]] | None:
        """Forget the waiting states; return what was there before the restore, and the
        loaders that took a waiting state with their states before that, if undoable."""
        before, self._before, self._pending = self._before, None, {}
        claimed = [(ld, state) for ref, state in self._claimed if (ld := ref()) is not None]
        self._claimed = []
        return None if before is None else (before, claimed)

    def put_back(self, prior: dict[str, dict[str, Any]]) -> None:
        for name, loader in self.live().items():
            if name in prior:
                loader.rewind(prior[name])
