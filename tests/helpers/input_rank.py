"""One rank of a tests/test_inputs.py job; what it does comes from the environment.

INPUT_SETUP: JSON keyword arguments for ``ddpseed.setup`` (``Infinity``/``NaN`` allowed).
INPUT_OWN_GROUP: a timeout in seconds: the script makes its own gloo group with it first.
INPUT_DIE_IN_INIT: this rank is SIGKILLed inside ``init_process_group``, after the rendezvous.
INPUT_LOAD / INPUT_SAVE: a state path to ``ddpseed.load_state`` / ``save_state`` after setup.
INPUT_PATH_AS: ``bytes`` passes that path as bytes, ``nul`` with a NUL byte appended.

Prints ``PG_TIMEOUT <seconds>`` (the default group's timeout, read from its gloo backend's
options) and ``OK <base seed>`` on success; on a ddpseed error prints ``ELAPSED <s>`` (seconds
since setup, or since load_state/save_state once it is reached) and ``DDPSEED_ERROR <type>:
<msg>`` to stderr and exits 3.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

import ddpseed

kwargs = json.loads(os.environ.get("INPUT_SETUP", "{}"))
own_group = os.environ.get("INPUT_OWN_GROUP")
load = os.environ.get("INPUT_LOAD")
save = os.environ.get("INPUT_SAVE")
path_as = os.environ.get("INPUT_PATH_AS")


def state_path(text: str) -> object:
    if path_as == "bytes":
        return os.fsencode(text)
    return text + "\0" if path_as == "nul" else text


if own_group:
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(own_group)))
    dist.barrier()  # every rank's group is complete before rank 0 (hosting the store) may exit
if os.environ.get("INPUT_DIE_IN_INIT"):

    def die(*args: object, **kw: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    dist.init_process_group = die  # type: ignore[assignment]

started = time.monotonic()  # after imports: what follows is ddpseed's time, not Python's
try:
    plan = ddpseed.setup(**kwargs)
    started = time.monotonic()  # the call's own time from here on
    if load:
        ddpseed.load_state(state_path(load), plan)  # type: ignore[arg-type]
    if save:
        ddpseed.save_state(state_path(save), plan)  # type: ignore[arg-type]
    if dist.is_initialized():
        group = distributed_c10d._get_default_group()
        options = group._get_backend(torch.device("cpu")).options  # type: ignore[attr-defined]
        print(f"PG_TIMEOUT {options._timeout.total_seconds()}", flush=True)
    print(f"OK {plan.base_seed}", flush=True)
    sys.stderr.flush()
    os._exit(0)  # a live gloo group's teardown can abort at exit (torch's race, not ours)
except ddpseed.DDPSeedError as exc:
    print(f"ELAPSED {time.monotonic() - started:.2f}", file=sys.stderr)
    print(f"DDPSEED_ERROR {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(3)
