"""One rank of a fault-suite job. FAULT (what goes wrong) and FAULT_RANK (where) come from env.

Prints ``OK <base seed>`` on success; on a ddpseed error prints ``DDPSEED_ERROR <type>: <msg>``
to stderr and exits 3, so the suite can assert on what every rank said.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch.distributed as dist

import ddpseed
from ddpseed import group
from ddpseed.topology import detect

fault = os.environ.get("FAULT", "none")
me = int(os.environ["RANK"]) == int(os.environ.get("FAULT_RANK", "-1"))
timeout = float(os.environ.get("FAULT_TIMEOUT", "10"))
state = os.environ.get("FAULT_STATE")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


started = time.monotonic()  # after imports: what follows is ddpseed's time, not Python's
try:
    if me and fault == "raise":
        raise RuntimeError("user code failed before ddpseed.setup")
    if me and fault == "kill-before":
        group.ensure_process_group(detect(), None, timeout)  # joined, then dies
        die()
    if me and fault == "stall":  # joined the group, then stuck elsewhere: never calls setup
        group.ensure_process_group(detect(), None, timeout)
        dist.barrier()
        sys.exit(0)
    if me and fault == "kill-during":
        real = dist.gather

        def gather_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
            real(*args, **kwargs)  # the collective is under way when this rank dies
            die()

        dist.gather = gather_then_die
    plan = ddpseed.setup(timeout=timeout, run_dir=os.environ.get("FAULT_RUN_DIR"))
    if state and fault == "save":
        ddpseed.save_state(state, plan)
    if state and fault == "load":
        ddpseed.load_state(state, plan)
    print(f"OK {plan.base_seed}", flush=True)
    if dist.is_initialized():
        # Exiting with a live gloo group can abort in torch's teardown (SIGABRT, "terminate
        # called without an active exception"); that race is torch's, not what we test.
        dist.destroy_process_group()
except ddpseed.DDPSeedError as exc:
    print(f"ELAPSED {time.monotonic() - started:.2f}", file=sys.stderr)
    print(f"DDPSEED_ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)  # skip the same teardown race; peers may be gone
