"""Seeds over a device mesh (DP x TP x PP x ...): pure rules, no global state.

A :class:`MeshSpec` is what ddpseed needs of a ``DeviceMesh``: its dimension names and sizes,
this rank's coordinate, which dimensions are *data* dimensions (they split the dataset) and
which are *distinct* dimensions (peers along them draw different random streams).

Data: the data coordinate is the rank's mixed-radix index over the data dimensions, in mesh
order, so ranks that differ only in other dimensions read the same shard with the same
augmentations::

    >>> spec = MeshSpec.build(("pp", "dp", "tp"), (2, 2, 2), (1, 1, 0))
    >>> spec.data_rank, spec.data_world_size, spec.distinct_dims
    (1, 2, ('pp', 'dp'))

Random streams: by default identical along the dimensions that replicate computation (tp, cp,
sp, etp), distinct along pp, ep and the data dimensions; any other name must be classified
with ``distinct_dims=``. A stream's seed is ``K(base, 2*slot)`` where ``K`` is the ``disjoint``
scheme's keyed bijection on 32 bits and ``slot`` packs, in disjoint bit fields, whether it is a
forked stream (1 bit), which dimensions it is distinct along (a mask of mesh positions, 10 bits)
and the rank's mixed-radix index over those dimensions (20 bits). Distinct slots therefore never
give equal seeds: unlike additive offsets (``seed + 100*pp + 10*dp`` aliases at dp >= 10), no two
streams collide at any mesh of up to 2**20 ranks, and the even slots keep clear of the disjoint
scheme's (odd) worker seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .collective import call_id
from .derivation import _keyed_bijection
from .errors import ArgumentError

# Dimensions whose peers compute on the same replica (tensor, context, sequence, expert-tensor
# parallel): their dropout masks and noise must agree, so their streams are shared.
SHARED_DIMS = ("tp", "cp", "sp", "etp")
# Dimensions whose peers hold different layers (pp) or experts (ep): their streams differ.
DISTINCT_DIMS = ("pp", "ep")
DATA_NAMES = ("fsdp", "hsdp")  # data dimensions besides the names starting with "dp"
MAX_DIMS = 10
MAX_RANKS = 2**20
_FLAT_BITS = 20
_FORK_BIT = 1 << (_FLAT_BITS + MAX_DIMS)


def _names(value: str | Iterable[str] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ArgumentError(f"{what}={value!r}: dimension names must be strings, got {bad!r}")
    if len(set(names)) != len(names):
        raise ArgumentError(f"{what}={value!r} names a dimension twice")
    return names


def default_data_dims(names: Sequence[str]) -> tuple[str, ...]:
    """The data dimensions of a mesh with ``names`` when ``data_dims`` is not given.

    >>> default_data_dims(("dp_replicate", "dp_shard", "cp", "tp"))
    ('dp_replicate', 'dp_shard')
    """
    return tuple(n for n in names if n.startswith("dp") or n in DATA_NAMES)


def default_distinct_dims(names: Sequence[str], data_dims: Sequence[str]) -> tuple[str, ...]:
    """The dimensions whose peers draw distinct process streams by default (see the module).

    >>> default_distinct_dims(("pp", "dp", "cp", "tp", "ep"), ("dp",))
    ('pp', 'dp', 'ep')
    """
    unknown = [n for n in names if n not in (*data_dims, *SHARED_DIMS, *DISTINCT_DIMS)]
    if unknown:
        raise ArgumentError(
            f"mesh dimension{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"{'are' if len(unknown) > 1 else 'is'} neither a data dimension nor one whose "
            f"random policy ddpseed knows (shared along {', '.join(SHARED_DIMS)}; distinct "
            f"along {', '.join(DISTINCT_DIMS)}); pass distinct_dims= listing every dimension "
            "whose peers must draw different random streams (the others share them)"
        )
    return tuple(n for n in names if n in data_dims or n in DISTINCT_DIMS)


def flat_index(shape: Sequence[int], coordinate: Sequence[int], positions: Sequence[int]) -> int:
    """Mixed-radix index of ``coordinate`` over the mesh dimensions at ``positions``.

    >>> flat_index((2, 3, 4), (1, 2, 3), (0, 2))
    7
    """
    index = 0
    for p in positions:
        index = index * shape[p] + coordinate[p]
    return index


def stream_slot(
    shape: Sequence[int], coordinate: Sequence[int], positions: Sequence[int], *, fork: bool
) -> int:
    """The slot of the stream distinct along ``positions``: fork bit | mask | flat index."""
    mask = sum(1 << p for p in positions)
    return (
        (_FORK_BIT if fork else 0) | (mask << _FLAT_BITS) | flat_index(shape, coordinate, positions)
    )


def stream_seed(base: int, slot: int) -> int:
    """``K(base, 2*slot)``: distinct slots give distinct seeds (a bijection on 32 bits)."""
    return _keyed_bijection(base, 2 * slot)


@dataclass(frozen=True)
class MeshSpec:
    """What ddpseed knows of a mesh on one rank; build it with :meth:`build`."""

    names: tuple[str, ...]
    shape: tuple[int, ...]
    coordinate: tuple[int, ...]
    data_dims: tuple[str, ...]
    distinct_dims: tuple[str, ...]
    layout: int = 0  # a hash of which rank sits where, so ranks can compare meshes

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        shape: Sequence[int],
        coordinate: Sequence[int],
        data_dims: str | Iterable[str] | None = None,
        distinct_dims: str | Iterable[str] | None = None,
        *,
        layout: int = 0,
    ) -> MeshSpec:
        """Validate and apply the defaults; raises :class:`ArgumentError` naming the fix."""
        names, shape, coordinate = tuple(names), tuple(shape), tuple(coordinate)
        described = _shape_text(names, shape)
        if len(set(names)) != len(names) or not names:
            raise ArgumentError(f"mesh {described}: dimension names must be present and unique")
        if len(names) > MAX_DIMS:
            raise ArgumentError(f"mesh {described} has more than {MAX_DIMS} dimensions")
        if math.prod(shape) > MAX_RANKS:
            raise ArgumentError(
                f"mesh {described} has {math.prod(shape)} ranks; ddpseed's mesh seeds are "
                f"proven collision-free up to {MAX_RANKS} ranks"
            )
        if len(coordinate) != len(shape) or any(
            not 0 <= c < s for c, s in zip(coordinate, shape, strict=False)
        ):
            raise ArgumentError(f"coordinate {coordinate} is not inside mesh {described}")
        chosen: dict[str, tuple[str, ...]] = {}
        for what, value in (("data_dims", data_dims), ("distinct_dims", distinct_dims)):
            given = _names(value, what)
            if given is not None:
                strange = [n for n in given if n not in names]
                if strange:
                    raise ArgumentError(
                        f"{what}={value!r} names {', '.join(map(repr, strange))}, not a "
                        f"dimension of mesh {described}; use names of its dimensions"
                    )
                chosen[what] = tuple(n for n in names if n in given)  # mesh order
        data = chosen.get("data_dims")
        if data is None:
            data = default_data_dims(names)
            if not data:
                raise ArgumentError(
                    f"mesh {described} has no data-parallel dimension (a name starting with "
                    f"'dp', or {' or '.join(map(repr, DATA_NAMES))}); pass data_dims=(...) "
                    "naming the dimensions that split the dataset, or data_dims=() if every "
                    "rank reads all of it"
                )
        distinct = chosen.get("distinct_dims")
        if distinct is None:
            distinct = default_distinct_dims(names, data)
        return cls(names, shape, coordinate, data, distinct, layout)

    # -- data -------------------------------------------------------------------------------
    def positions(self, dims: Iterable[str]) -> tuple[int, ...]:
        wanted = set(dims)
        return tuple(p for p, n in enumerate(self.names) if n in wanted)

    @property
    def data_rank(self) -> int:
        return flat_index(self.shape, self.coordinate, self.positions(self.data_dims))

    @property
    def data_world_size(self) -> int:
        return math.prod(self.shape[p] for p in self.positions(self.data_dims))

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    # -- streams ----------------------------------------------------------------------------
    def fork_dims(
        self, extra: str | Iterable[str] = (), exact: str | Iterable[str] | None = None
    ) -> tuple[str, ...]:
        """The dimensions a fork is distinct along: the policy's plus ``extra``, or ``exact``."""
        added = _names(extra, "fork dims") or ()
        only = _names(exact, "distinct")
        strange = [n for n in (*added, *(only or ())) if n not in self.names]
        if strange:
            raise ArgumentError(
                f"fork: {', '.join(map(repr, strange))} is not a dimension of mesh "
                f"{_shape_text(self.names, self.shape)}"
            )
        chosen = set(only) if only is not None else {*self.distinct_dims, *added}
        return tuple(n for n in self.names if n in chosen)

    def seed(self, base: int, dims: Iterable[str] | None = None, *, fork: bool = False) -> int:
        """This rank's seed of the stream distinct along ``dims`` (default: the policy's)."""
        positions = self.positions(self.distinct_dims if dims is None else dims)
        return stream_seed(base, stream_slot(self.shape, self.coordinate, positions, fork=fork))

    def grid(self, base: int, dims: Iterable[str] | None = None, *, fork: bool = False) -> Any:
        """Every rank's seed of one stream, as an array of the mesh's shape (vectorised)."""
        positions = self.positions(self.distinct_dims if dims is None else dims)
        slot = np.zeros(self.shape, dtype=np.uint64)
        for p in positions:
            axis = np.arange(self.shape[p], dtype=np.uint64).reshape(
                [-1 if i == p else 1 for i in range(len(self.shape))]
            )
            slot = slot * np.uint64(self.shape[p]) + axis
        mask = sum(1 << p for p in positions)
        slot |= np.uint64((_FORK_BIT if fork else 0) | (mask << _FLAT_BITS))
        bijection: Any = _keyed_bijection  # written for ints; the same operators on uint64
        return bijection(base, np.uint64(2) * slot)

    # -- records ----------------------------------------------------------------------------
    def describe(self) -> str:
        """One line naming everything ranks must agree on (not the coordinate).

        >>> MeshSpec.build(("dp", "tp"), (2, 2), (0, 1)).describe()
        'mesh (dp=2, tp=2), data_dims (dp), distinct_dims (dp)'
        """
        return (
            f"mesh {_shape_text(self.names, self.shape)}, data_dims ({', '.join(self.data_dims)})"
            f", distinct_dims ({', '.join(self.distinct_dims)})"
        )

    def agreement_id(self) -> int:
        """A nonzero 64-bit id of :meth:`describe` and the rank layout."""
        return call_id(f"{self.describe()} layout {self.layout}") or 1

    def record(self) -> dict[str, Any]:
        """A JSON-able record (manifest, state files)."""
        return {
            "names": list(self.names),
            "shape": list(self.shape),
            "coordinate": list(self.coordinate),
            "data_dims": list(self.data_dims),
            "distinct_dims": list(self.distinct_dims),
        }


def _shape_text(names: Sequence[str], shape: Sequence[int]) -> str:
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, shape, strict=False)) + ")"


def parse_mesh(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``"dp=2,tp=2"`` -> ``(("dp", "tp"), (2, 2))``; raises :class:`ArgumentError`.

    >>> parse_mesh("pp=2, dp=2,tp=2")
    (('pp', 'dp', 'tp'), (2, 2, 2))
    """
    names, sizes = [], []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, size = part.partition("=")
        if not eq or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ArgumentError(f"mesh {text!r}: {part!r} is not NAME=SIZE (e.g. dp=2,tp=2)")
        names.append(name.strip())
        sizes.append(int(size))
    if not names:
        raise ArgumentError(f"mesh {text!r} names no dimension (e.g. dp=2,tp=2)")
    return tuple(names), tuple(sizes)


def spec_of(
    mesh: Any,
    rank: int,
    world_size: int,
    data_dims: str | Iterable[str] | None = None,
    distinct_dims: str | Iterable[str] | None = None,
) -> MeshSpec:
    """The :class:`MeshSpec` of this rank of a ``torch.distributed.device_mesh.DeviceMesh``.

    Reads the mesh only (its names, shape, rank layout and this rank's coordinate); raises
    :class:`ArgumentError` when the mesh cannot describe this job.
    """
    names = getattr(mesh, "mesh_dim_names", None)
    if not names:
        raise ArgumentError(
            f"mesh={mesh!r} has no dimension names; build it with "
            "init_device_mesh(device, shape, mesh_dim_names=('dp', 'tp', ...))"
        )
    shape = tuple(int(s) for s in mesh.shape)
    if math.prod(shape) != world_size:
        raise ArgumentError(
            f"mesh {_shape_text(names, shape)} has {math.prod(shape)} ranks but the job has "
            f"{world_size}; pass the world mesh (every rank of the job), not a sub-mesh"
        )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ArgumentError(f"rank {rank} is not in mesh {_shape_text(names, shape)}")
    layout = call_id(",".join(map(str, mesh.mesh.flatten().tolist())))
    return MeshSpec.build(names, shape, coordinate, data_dims, distinct_dims, layout=layout)


def spec_of_shape(
    dims: Mapping[str, int],
    rank: int,
    world_size: int,
    data_dims: str | Iterable[str] | None = None,
    distinct_dims: str | Iterable[str] | None = None,
) -> MeshSpec:
    """The :class:`MeshSpec` of ``rank`` in the mesh ``init_device_mesh`` makes of ``dims``
    (``{"dp": 2, "tp": 2}``: ranks laid out row-major, as torch does)."""
    if not isinstance(dims, Mapping) or not all(
        isinstance(n, str) and isinstance(s, int) and not isinstance(s, bool) and s >= 1
        for n, s in dims.items()
    ):
        raise ArgumentError(
            f"mesh={dims!r} is neither a DeviceMesh nor a mapping of dimension names to sizes "
            "(e.g. mesh={'dp': 2, 'tp': 2})"
        )
    names, shape = tuple(dims), tuple(dims.values())
    if math.prod(shape) != world_size:
        raise ArgumentError(
            f"mesh {_shape_text(names, shape)} has {math.prod(shape)} ranks but the job has "
            f"{world_size}; the sizes must multiply to the world size"
        )
    coordinate = tuple(int(c) for c in np.unravel_index(rank, shape))
    layout = call_id(",".join(map(str, range(world_size))))
    return MeshSpec.build(names, shape, coordinate, data_dims, distinct_dims, layout=layout)
