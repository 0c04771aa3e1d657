"""torchrun (or any env:// launch that exports ``RANK``), and a plain process: a world of one."""

from __future__ import annotations

from ..errors import TopologyError
from .base import DEFAULT_PORT, LOOPBACK, LauncherEnvironment, Topology, int_var, safe_name
from .slurm import slurm_run_id


class TorchrunEnvironment(LauncherEnvironment):
    """``torchrun`` / ``torch.distributed.run``, or any env:// launch that sets ``RANK``.

    https://pytorch.org/docs/stable/elastic/run.html#environment-variables
    """

    name = "torchrun"
    variables = (
        *("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
        *("GROUP_RANK", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
        # set by torchrun, read by ddpseed.rundir / ddpseed.coordinator
        *("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE"),
    )

    def activated(self) -> bool:
        return "RANK" in self.env or "TORCHELASTIC_RUN_ID" in self.env

    def why(self) -> str:
        if "TORCHELASTIC_RUN_ID" in self.env:
            return "TORCHELASTIC_RUN_ID is set: a torchrun worker"
        return f"RANK={self.env.get('RANK')} is set: an env:// launch"

    def topology(self) -> Topology:
        env = self.env
        if "WORLD_SIZE" not in env:
            raise TopologyError(
                f"RANK={env.get('RANK')!r} is set but WORLD_SIZE is not; launch with torchrun "
                "or set WORLD_SIZE (and MASTER_ADDR/MASTER_PORT) on every rank"
            )
        rank = int_var(env, "RANK")
        world = int_var(env, "WORLD_SIZE")
        local_world = int_var(env, "LOCAL_WORLD_SIZE", world)
        num_nodes = int_var(env, "GROUP_WORLD_SIZE", -(-world // max(local_world, 1)))
        rdzv_id = env.get("TORCHELASTIC_RUN_ID")
        return Topology(
            launcher="torchrun",
            rank=rank,
            local_rank=int_var(env, "LOCAL_RANK", rank),
            world_size=world,
            local_world_size=local_world,
            node_rank=int_var(env, "GROUP_RANK", 0),
            num_nodes=num_nodes,
            master_addr=env.get("MASTER_ADDR", LOOPBACK),
            master_port=int_var(env, "MASTER_PORT", DEFAULT_PORT),
            run_id=_within(slurm_run_id(env), torchrun_run_id(rdzv_id)),
        )


def _within(step: str | None, launch: str | None) -> str | None:
    """A torchrun launch inside a Slurm step: both names. The step alone does not name the
    launch (a batch script may start several torchruns); ddpseed.rundir adds the launch key.

    >>> _within("slurm-7.0", "torchrun"), _within(None, "torchrun"), _within("slurm-7.0", None)
    ('slurm-7.0-torchrun', 'torchrun', 'slurm-7.0')
    """
    if step is None or launch is None:
        return step or launch
    return f"{step}-{launch}"


def names_torchrun_launch(run_id: str) -> bool:
    """Whether ``run_id`` (a :class:`Topology`'s) names a torchrun launch, which
    ``ddpseed.rundir`` completes with the launch key (a plain env:// launch's does not).

    >>> [names_torchrun_launch(r) for r in ("torchrun-x", "slurm-7.0-torchrun", "slurm-7.0")]
    [True, True, False]
    """
    return run_id.startswith("torchrun") or "-torchrun" in run_id


def torchrun_run_id(rdzv_id: str | None) -> str | None:
    """``torchrun[-<rdzv id>]`` for a torchrun worker (None outside torchrun).

    The rendezvous id alone names no launch: torchrun's default is the literal ``none``, and
    a script may pass the same ``--rdzv-id`` to every job. ``ddpseed.rundir`` appends a key
    that torchrun's agent store keeps for the launch's lifetime.

    >>> torchrun_run_id("none"), torchrun_run_id("exp/42"), torchrun_run_id(None)
    ('torchrun', 'torchrun-exp_42', None)
    """
    if rdzv_id is None:
        return None
    return "torchrun" if rdzv_id in ("", "none") else safe_name(f"torchrun-{rdzv_id}")


class SingleEnvironment(LauncherEnvironment):
    """A plain ``python train.py``: a world of one."""

    name = "single"
    variables = (
        *("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_JOBID", "SLURM_STEP_ID"),
        "SLURM_STEPID",
    )

    def activated(self) -> bool:
        return True

    def why(self) -> str:
        return "no launcher variables are set: one process"

    def topology(self) -> Topology:
        env = self.env
        return Topology(
            launcher="single",
            rank=0,
            local_rank=0,
            world_size=1,
            local_world_size=1,
            node_rank=0,
            num_nodes=1,
            master_addr=env.get("MASTER_ADDR", LOOPBACK),
            master_port=int_var(env, "MASTER_PORT", DEFAULT_PORT),
            run_id=slurm_run_id(env),
        )
