"""Mesh seeding rules, in one process: data coordinate, random-stream policy, collision-freedom.

The multi-process proofs (torchrun, init_device_mesh on gloo) are in test_mesh_ranks.py.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ddpseed
from ddpseed import cli
from ddpseed.errors import ArgumentError
from ddpseed.mesh import MAX_RANKS, MeshSpec, parse_mesh, spec_of_shape
from ddpseed.seeding import seed_process
from ddpseed.topology import Topology
from helpers.procs import without_launcher


def every_rank(names: tuple[str, ...], shape: tuple[int, ...], **kw: object) -> list[MeshSpec]:
    return [
        MeshSpec.build(names, shape, coord, **kw)  # type: ignore[arg-type]
        for coord in itertools.product(*(range(s) for s in shape))
    ]


def test_data_coordinate_follows_the_data_dims_only() -> None:
    specs = every_rank(("pp", "dp", "tp"), (2, 2, 2))
    assert [(s.data_rank, s.data_world_size) for s in specs] == [
        (c[1], 2) for c in itertools.product(range(2), range(2), range(2))
    ]
    hsdp = MeshSpec.build(("dp_replicate", "dp_shard", "cp", "tp"), (2, 3, 2, 2), (1, 2, 0, 1))
    assert hsdp.data_dims == ("dp_replicate", "dp_shard")
    assert (hsdp.data_rank, hsdp.data_world_size) == (1 * 3 + 2, 6)
    assert MeshSpec.build(("fsdp", "tp"), (4, 2), (3, 0)).data_dims == ("fsdp",)


def test_default_policy_shares_tp_and_cp_and_separates_pp_ep_and_data() -> None:
    spec = MeshSpec.build(("pp", "dp", "ep", "cp", "tp"), (2, 2, 2, 2, 2), (0,) * 5)
    assert spec.distinct_dims == ("pp", "dp", "ep")
    seeds = {s.coordinate: s.seed(7) for s in every_rank(spec.names, spec.shape)}
    for coord, seed in seeds.items():
        tp_peer = (*coord[:4], 1 - coord[4])
        cp_peer = (*coord[:3], 1 - coord[3], coord[4])
        assert seeds[tp_peer] == seed and seeds[cp_peer] == seed
        for axis in (0, 1, 2):  # pp, dp, ep peers
            peer = tuple(1 - c if i == axis else c for i, c in enumerate(coord))
            assert seeds[peer] != seed
    assert len(set(seeds.values())) == 8


def test_distinct_dims_overrides_the_policy_and_data_dims_may_be_empty() -> None:
    specs = every_rank(("dp", "tp"), (2, 2), distinct_dims=("tp",))
    assert {s.coordinate: s.seed(1) for s in specs}[(0, 0)] == specs[2].seed(1)  # dp peers
    assert specs[0].seed(1) != specs[1].seed(1)  # tp peers
    whole = MeshSpec.build(("tp",), (4,), (3,), data_dims=())
    assert (whole.data_rank, whole.data_world_size, whole.distinct_dims) == (0, 1, ())
    assert MeshSpec.build(("dp", "tp"), (2, 2), (1, 0), data_dims="dp").data_rank == 1


@pytest.mark.parametrize(
    ("names", "kw", "message"),
    [
        (("pp", "tp"), {}, r"no data-parallel dimension .*data_dims=\(\)"),
        (("dp", "foo"), {}, r"foo is neither a data dimension .*pass distinct_dims="),
        (("dp", "tp"), {"data_dims": ("dq",)}, r"data_dims=\('dq',\) names 'dq', not a dim"),
        (("dp", "tp"), {"distinct_dims": ("dp", "dp")}, r"names a dimension twice"),
        (("dp", "tp"), {"data_dims": (3,)}, r"must be strings"),
    ],
)
def test_mesh_arguments_that_cannot_be_right_are_refused_with_the_fix(
    names: tuple[str, ...], kw: dict[str, object], message: str
) -> None:
    with pytest.raises(ArgumentError, match=message):
        MeshSpec.build(names, (2, 2), (0, 0), **kw)  # type: ignore[arg-type]


def test_unknown_dims_are_fine_once_classified() -> None:
    spec = MeshSpec.build(("dp", "foo"), (2, 2), (1, 1), distinct_dims=("dp",))
    assert spec.distinct_dims == ("dp",)


def test_too_many_ranks_is_refused() -> None:
    with pytest.raises(ArgumentError, match="collision-free up to"):
        MeshSpec.build(("dp", "tp"), (MAX_RANKS, 2), (0, 0))


def test_fork_stream_differs_from_every_process_stream() -> None:
    spec = MeshSpec.build(("pp", "dp", "tp"), (2, 2, 2), (0, 0, 0))
    dims = spec.fork_dims(["tp"])
    assert dims == ("pp", "dp", "tp")
    process = spec.grid(3).ravel().tolist()
    forked = spec.grid(3, dims, fork=True).ravel().tolist()
    assert len(set(forked)) == 8 and not set(forked) & set(process)
    # Even a fork distinct along exactly the policy's dims is its own stream.
    same = spec.grid(3, spec.distinct_dims, fork=True).ravel().tolist()
    assert not set(same) & set(process)
    assert spec.fork_dims(exact=["pp"]) == ("pp",)
    with pytest.raises(ArgumentError, match="'xp' is not a dimension"):
        spec.fork_dims(["xp"])


def test_additive_offsets_alias_where_mesh_seeds_do_not() -> None:
    """Megatron's ``seed + 100*pp + 10*dp`` gives (pp 0, dp 10) and (pp 1, dp 0) one seed."""
    assert 100 * 0 + 10 * 10 == 100 * 1 + 10 * 0
    spec = MeshSpec.build(("pp", "dp"), (2, 16), (0, 0))
    grid = spec.grid(1234)
    assert grid[0, 10] != grid[1, 0]
    assert distinct_count(grid) == 32


def distinct_count(seeds: np.ndarray) -> int:  # type: ignore[type-arg]
    # Sort-and-compare: np.unique hashes uint64 in numpy 2.x, 15x slower at 2**20 values.
    ordered = np.sort(seeds, axis=None)
    return 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))


NAMES = ("pp", "dp", "dp_shard", "ep", "cp", "tp", "x1", "x2", "x3", "x4")


@st.composite
def meshes(draw: st.DrawFn) -> tuple[MeshSpec, int, tuple[str, ...]]:
    ndims = draw(st.integers(1, 10))
    names = tuple(draw(st.permutations(NAMES))[:ndims])
    budget = 20  # log2 of the largest mesh
    shape = []
    for _ in names:
        bits = draw(st.integers(0, budget))
        size = draw(st.integers(max(1, 2 ** (bits - 1)), 2**bits))
        budget -= max(0, math.ceil(math.log2(size)))
        shape.append(size)
    distinct = tuple(n for n in names if draw(st.booleans()))
    extra = tuple(n for n in names if draw(st.booleans()))
    coord = tuple(draw(st.integers(0, s - 1)) for s in shape)
    spec = MeshSpec.build(names, shape, coord, data_dims=(), distinct_dims=distinct)
    return spec, draw(st.integers(0, 2**32 - 1)), extra


FULL = ("pp", "dp", "ep", "tp")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(meshes())
@example((MeshSpec.build(FULL, (4, 64, 8, 512), (3, 63, 7, 511), distinct_dims=FULL), 0, ()))
@example((MeshSpec.build(FULL, (16, 4096, 4, 4), (1, 2, 3, 0)), 2**32 - 1, ("tp",)))
def test_mesh_seeds_never_collide_up_to_2_pow_20_ranks(
    case: tuple[MeshSpec, int, tuple[str, ...]],
) -> None:
    """Every rank of the mesh: the process stream takes exactly one seed per coordinate over
    the distinct dims (peers along the others share it), a fork takes one per coordinate over
    its own dims, and no seed of one stream appears in the other."""
    spec, base, extra = case
    assert spec.world_size <= MAX_RANKS
    dims = spec.fork_dims(extra)
    process, forked = spec.grid(base), spec.grid(base, dims, fork=True)
    count = math.prod(spec.shape[p] for p in spec.positions(spec.distinct_dims))
    assert distinct_count(process) == count
    assert distinct_count(forked) == math.prod(spec.shape[p] for p in spec.positions(dims))
    both = np.concatenate([process.ravel(), forked.ravel()])
    assert distinct_count(both) == distinct_count(process) + distinct_count(forked)
    # The vectorised table is the scalar rule: this rank's seeds sit at its coordinate.
    assert int(process[spec.coordinate]) == spec.seed(base)
    assert int(forked[spec.coordinate]) == spec.seed(base, dims, fork=True)
    assert int(process.max()) < 2**32


def test_parse_mesh() -> None:
    assert parse_mesh("dp=2,tp=2") == (("dp", "tp"), (2, 2))
    for bad in ("dp", "dp=0", "dp=x", ","):
        with pytest.raises(ArgumentError, match=r"NAME=SIZE|names no dimension"):
            parse_mesh(bad)


def mesh_plan(coord: tuple[int, int] = (0, 1), seed: int = 5) -> ddpseed.SeedPlan:
    """One rank of a (dp=2, tp=2) mesh, without a process group (collective=False)."""
    topo = Topology("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500)
    spec = MeshSpec.build(("dp", "tp"), (2, 2), coord)
    plan = ddpseed.SeedPlan(seed, topo, collective=False, mesh=spec)
    seed_process(plan.process_seed, cuda_device=None)
    return plan


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.random()), float(torch.rand(1))


def test_fork_restores_the_shared_streams_and_continues_its_own() -> None:
    plan = mesh_plan()
    seed_process(plan.process_seed, cuda_device=None)
    straight = [draws(), draws()]
    seed_process(plan.process_seed, cuda_device=None)
    first = draws()
    with plan.fork("tp") as dims:
        assert dims == ("dp", "tp")
        inside = draws()
    assert [first, draws()] == straight  # the fork consumed nothing of the shared streams
    with plan.fork("tp"):
        again = draws()
    seed_process(plan.mesh.seed(5, ("dp", "tp"), fork=True), cuda_device=None)  # type: ignore[union-attr]
    assert [draws(), draws()] == [inside, again]  # one stream across both regions


def test_fork_exits_cleanly_on_an_exception_and_refuses_what_would_be_wrong() -> None:
    plan = mesh_plan()
    before = torch.get_rng_state().clone()
    with pytest.raises(KeyError), plan.fork("tp"):
        torch.rand(3)
        raise KeyError("boom")
    assert torch.equal(before, torch.get_rng_state())
    with plan.fork("tp"):
        with pytest.raises(ArgumentError, match="already active"), plan.fork("tp"):
            pass
        with pytest.raises(ddpseed.StateError, match=r"inside plan\.fork"):
            plan.state_dict()
    no_mesh = ddpseed.SeedPlan(5, Topology("single", 0, 0, 1, 1, 0, 1, "127.0.0.1", 29500))
    with pytest.raises(ArgumentError, match=r"setup\(mesh=\.\.\.\)"), no_mesh.fork("tp"):
        pass


def test_forked_streams_resume_exactly_from_the_state() -> None:
    plan = mesh_plan()
    with plan.fork("tp"):
        draws()
    state = plan.state_dict()
    with plan.fork("tp"):
        expected = [draws()]
    expected.append(draws())
    again = mesh_plan()
    again.load_state_dict(state)
    with again.fork("tp"):
        got = [draws()]
    got.append(draws())
    assert got == expected
    other = ddpseed.SeedPlan(5, again.topology, collective=False)  # saved under a mesh
    with pytest.raises(ddpseed.StateError, match="saved with mesh"):
        other.load_state_dict(state)


def test_tp_peers_share_process_streams_and_split_in_a_fork() -> None:
    a, b = mesh_plan((1, 0)), mesh_plan((1, 1))
    assert a.process_seed == b.process_seed != mesh_plan((0, 0)).process_seed
    assert (a.data_rank, a.data_world_size) == (1, 2)
    assert a.worker_seed(1, 2) == b.worker_seed(1, 2) == ddpseed.worker_seed(5, 1, 2, 1)
    seeds = set()
    for plan in (a, b):
        with plan.fork("tp"):
            seeds.add(torch.initial_seed())
    assert len(seeds) == 2


def test_a_mapping_of_sizes_lays_ranks_out_row_major_like_init_device_mesh() -> None:
    spec = spec_of_shape({"pp": 2, "dp": 2, "tp": 2}, 6, 8)
    assert (spec.coordinate, spec.data_rank) == ((1, 1, 0), 1)
    with pytest.raises(ArgumentError, match="has 4 ranks but the job has 8"):
        spec_of_shape({"dp": 2, "tp": 2}, 0, 8)
    with pytest.raises(ArgumentError, match="neither a DeviceMesh nor a mapping"):
        spec_of_shape({"dp": "2"}, 0, 2)  # type: ignore[dict-item]


def test_plan_mesh_prints_every_coordinate_and_no_collisions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["plan", "--seed", "7", "--mesh", "pp=2,dp=2,tp=2", "--num-workers", "2"]
    assert cli.main([*argv, "--fork", "tp", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    rows = table["rows"]
    assert [r["coordinate"] for r in rows[:2]] == [[0, 0, 0], [0, 0, 1]]
    assert table["collisions"] == [] and table["distinct_dims"] == ["pp", "dp"]
    assert rows[0]["process_seed"] == rows[1]["process_seed"] != rows[2]["process_seed"]
    assert len({r["fork_seeds"]["pp,dp,tp"] for r in rows}) == 8
    assert rows[0]["worker_seeds"] == rows[4]["worker_seeds"] == [7, 8]  # pp peers, data rank 0
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "process streams shared along tp" in text and "collisions: none" in text
    assert cli.main([*argv, "--world-size", "4"]) == 2
    assert "has 8 ranks" in capsys.readouterr().err


@pytest.fixture
def alone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process as a job of one: no launcher variables, its run records under tmp_path."""
    for name in set(os.environ) - set(without_launcher(os.environ)):
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_setup_with_a_mesh_in_a_world_of_one_and_mesh_arguments_without_a_mesh(
    alone: Path,
) -> None:
    plan = ddpseed.setup(seed=3, mesh={"dp": 1, "tp": 1})
    assert (plan.data_rank, plan.data_world_size, plan.device_mesh) == (0, 1, None)
    assert plan.process_seed == MeshSpec.build(("dp", "tp"), (1, 1), (0, 0)).seed(3)
    assert random.random() == random.Random(plan.process_seed).random()
    with pytest.raises(ArgumentError, match=r"(?s)invalid mesh settings.*data_dims given without"):
        ddpseed.setup(seed=3, data_dims=("dp",))
    with pytest.raises(ArgumentError, match=r"mesh \(dp=2\) has 2 ranks but the job has 1"):
        ddpseed.setup(seed=3, mesh={"dp": 2})


def test_an_elastic_resume_under_a_mesh_is_refused_not_reseeded_by_rank(alone: Path) -> None:
    # Elastic resume re-derives streams per rank; under a mesh that would part tp peers.
    tmp_path = alone
    plan = ddpseed.setup(seed=3, mesh={"dp": 1, "tp": 1})
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plan.set_epoch(2)
    torch.rand(3)  # move the stream past the saved state
    before = (plan.epoch, torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    with pytest.raises(ArgumentError, match=r"elastic=True\) does not support a device mesh"):
        ddpseed.load_state(tmp_path / "rng.pt", plan, elastic=True)
    after = (plan.epoch, torch.get_rng_state(), random.getstate(), np.random.get_state()[1])
    assert after[0] == before[0] and after[2] == before[2]  # nothing was restored or reseeded
    assert torch.equal(after[1], before[1]) and (after[3] == before[3]).all()
    ddpseed.load_state(tmp_path / "rng.pt", plan)  # the exact resume still works


def test_a_mesh_checkpoint_is_refused_by_an_elastic_resume_without_a_mesh(alone: Path) -> None:
    # It used to be taken, dropping the forked streams without a word.
    tmp_path = alone
    plan = ddpseed.setup(seed=3, mesh={"dp": 1, "tp": 1})
    with plan.fork("tp"):
        torch.rand(1)
    ddpseed.save_state(tmp_path / "rng.pt", plan)
    plain = ddpseed.setup(seed=3)
    for elastic in (False, True):
        with pytest.raises(ddpseed.StateError, match="saved with mesh") as err:
            ddpseed.load_state(tmp_path / "rng.pt", plain, elastic=elastic)
        assert "nothing was restored" in str(err.value)
