"""One rank of a loader/checkpoint job: ACTIONS (comma-separated) say what it does, in order.

Settings come from the environment (per rank where a test gives ranks different values):
DATA_LEN, BATCH, WORKERS, SHUFFLE, DROP_LAST, SCALABLE, RANDOMNESS, EPOCH, SCHEME,
DETERMINISTIC, STATE (checkpoint path), TIMEOUT, PG_TIMEOUT, LOADER_NAME, MESH ("dp=1,tp=2":
setup(mesh=)).
Actions:

  loader        plan.dataloader(range(DATA_LEN), ...) named LOADER_NAME ("train")
  sampler       plan.sampler(range(DATA_LEN), ...)
  plan-save     torch.save(plan.state_dict(), STATE + ".rank<r>") (a per-rank checkpoint)
  plan-load     plan.load_state_dict of that file
  steps:N       consume N more batches of one iter(loader) (made first if needed)
  rand:N        draw N numbers from torch's RNG (a model's initialisation)
  save / load   ddpseed.save_state / load_state(STATE)
  load-elastic  ddpseed.load_state(STATE, elastic=True)
  destroy       dist.destroy_process_group()
  barrier       dist.barrier() (a rank busy elsewhere instead of making ddpseed's call)
  kill-rename   SIGKILL this rank when it renames its state file into place (fsync done)
  pos           print "POS <epoch> <position>" of the loader

Prints "OK" at the end; on a ddpseed error prints "DDPSEED_ERROR <type>: <msg>" to stderr and
exits 3 (like fault_rank.py), so a test can assert on what every rank said.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

import ddpseed

env = os.environ
timeout = float(env.get("TIMEOUT", "20"))
started = time.monotonic()
loader: Any = None
batches: Any = None  # the pass "steps:N" continues


def flag(name: str, default: str = "0") -> bool:
    return env.get(name, default) == "1"


def make_loader(plan: ddpseed.SeedPlan) -> Any:
    return plan.dataloader(
        range(int(env.get("DATA_LEN", "64"))),
        batch_size=int(env.get("BATCH", "4")),
        num_workers=int(env.get("WORKERS", "0")),
        shuffle=flag("SHUFFLE", "1"),
        drop_last=flag("DROP_LAST"),
        scalable=flag("SCALABLE"),
        randomness=env.get("RANDOMNESS", "batch"),  # type: ignore[arg-type]
        name=env.get("LOADER_NAME", "train") or None,  # "": named by creation order
    )


def kill_on_rename() -> None:
    real = os.replace

    def replace_then_die(src: Any, dst: Any) -> None:
        if str(dst).endswith(".pt"):  # the state file, written and fsynced, about to appear
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = replace_then_die  # type: ignore[assignment]


try:
    plan = ddpseed.setup(
        timeout=timeout,
        scheme=env.get("SCHEME", "default"),  # type: ignore[arg-type]
        deterministic=flag("DETERMINISTIC"),
        pg_timeout=float(env["PG_TIMEOUT"]) if env.get("PG_TIMEOUT") else None,
        mesh={d: int(n) for d, n in (kv.split("=") for kv in env["MESH"].split(","))}
        if env.get("MESH")
        else None,
    )
    plan.set_epoch(int(env.get("EPOCH", "0")))
    for action in filter(None, env.get("ACTIONS", "").split(",")):
        if action == "loader":
            loader = make_loader(plan)
        elif action == "sampler":
            plan.sampler(
                range(int(env.get("DATA_LEN", "64"))),
                shuffle=flag("SHUFFLE", "1"),
                drop_last=flag("DROP_LAST"),
                scalable=flag("SCALABLE"),
            )
        elif action == "plan-save":
            torch.save(plan.state_dict(), f"{env['STATE']}.rank{plan.rank}")
        elif action == "plan-load":
            plan.load_state_dict(torch.load(f"{env['STATE']}.rank{plan.rank}", weights_only=False))
        elif action.startswith("steps:"):
            loader = loader or make_loader(plan)
            batches = batches or iter(loader)
            for _ in range(int(action.split(":")[1])):
                next(batches)
        elif action.startswith("rand:"):
            torch.rand(int(action.split(":")[1]))
        elif action == "save":
            ddpseed.save_state(env["STATE"], plan)
        elif action == "load":
            ddpseed.load_state(env["STATE"], plan)
        elif action == "load-elastic":
            ddpseed.load_state(env["STATE"], plan, elastic=True)
        elif action == "destroy":
            dist.destroy_process_group()
        elif action == "barrier":
            dist.barrier()
        elif action == "kill-rename":
            kill_on_rename()
        elif action == "pos":
            state = loader.state_dict()
            print(f"POS {state['epoch']} {state['position']}", flush=True)
        else:
            raise SystemExit(f"unknown action {action!r}")
    print("OK", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
except ddpseed.DDPSeedError as exc:
    print(f"ELAPSED {time.monotonic() - started:.2f}", file=sys.stderr)
    print(f"DDPSEED_ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)  # peers may be gone: skip the process group's teardown
