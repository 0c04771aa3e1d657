"""The ``ddpseed`` command: plan, env, verify, demo, bench."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import meshcli, verify
from .derivation import SCHEMES, seed_table, validate_seed
from .errors import DDPSeedError
from .topology import choose, detect, outranked


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _count_arg(minimum: int) -> Any:
    """An argparse type: an int of at least ``minimum``, else a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    return parse


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a finite positive number of seconds")
    return value


def _seed_arg(text: str) -> int:
    try:
        return validate_seed(text, source="--seed")
    except DDPSeedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- plan ---------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    if args.mesh is not None or args.world_size is None:
        return meshcli.plan_table(args, out)
    table = seed_table(
        args.seed, args.world_size, args.num_workers, args.epochs, scheme=args.scheme
    )
    collisions = table.collisions()
    if args.json:
        out(
            json.dumps(
                {
                    "base_seed": table.base,
                    "world_size": table.world_size,
                    "num_workers": table.num_workers,
                    "epochs": table.epochs,
                    "scheme": table.scheme,
                    "process_seeds": list(table.process),
                    "worker_seeds": [[list(ws) for ws in ranks] for ranks in table.workers],
                    "collisions": [{"seed": s, "users": who} for s, who in collisions],
                }
            )
        )
        return 0
    out(
        f"base seed {table.base}, world size {table.world_size}, {table.num_workers} workers "
        f"per rank, {table.epochs} epoch(s), scheme {table.scheme}"
    )
    # Every seed fits 10 digits (< 2**32), so fixed widths keep the columns aligned.
    width = max(1, table.num_workers) * 11 - 1
    head = f"{'rank':>5} {'process seed':>12}"
    for e in range(table.epochs):
        head += f"  {f'worker seeds epoch {e}':<{width}}"
    out(head.rstrip())
    for rank in range(table.world_size):
        row = f"{rank:>5} {table.process[rank]:>12}"
        for e in range(table.epochs):
            row += "  " + f"{' '.join(f'{s:>10}' for s in table.workers[e][rank]):<{width}}"
        out(row.rstrip())
    if not collisions:
        out("collisions: none")
    else:
        out(f"collisions: {len(collisions)} seeds are used more than once")
        for seed, who in collisions[: args.show]:
            out(f"  {seed}: {', '.join(who)}")
        if len(collisions) > args.show:
            out(f"  ... {len(collisions) - args.show} more (--show N, or --json)")
        if table.scheme == "default":
            out(
                "  (process seeds and worker seeds share one range by design of the default rule;"
                " --scheme disjoint gives collision-free seeds)"
            )
    return 0


# -- env ----------------------------------------------------------------------------------------
def cmd_env(args: argparse.Namespace) -> int:
    topo = detect()
    if args.json:
        out(json.dumps(dataclasses.asdict(topo)))
        return 0
    out(repr(topo))
    chosen = choose()
    out(f"  launcher: {chosen.name} ({type(chosen).__name__}): {chosen.why()}")
    outer = outranked()
    if outer:
        names = ", ".join(f"{o.name} ({o.why()})" for o in outer)
        out(f"  outranked (an outer launch): {names}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    status, lines = verify.run(args)
    for line in lines:
        out(line)
    return status


# -- demo ---------------------------------------------------------------------------------------
def _torchrun(nproc: int, out_file: Path, extra: list[str], timeout: float) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "ddpseed.demo",
        "--out",
        str(out_file),
        *extra,
    ]
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    env.pop("DDPSEED_SEED", None)
    # Its own session, so a timeout stops torchrun's ranks and their DataLoader workers too.
    with subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_session(proc)
            _, stderr = proc.communicate()
            raise DDPSeedError(
                f"demo run did not finish within --timeout={timeout:g}s; its processes were "
                f"stopped. Raise --timeout on a slow machine. Last output:\n{stderr[-3000:]}"
            ) from None
    if proc.returncode != 0:
        raise DDPSeedError(f"demo run failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out_file.read_text())
    return result


def _stop_session(proc: subprocess.Popen[str], grace: float = 10.0) -> None:
    """SIGTERM the session ``proc`` leads (torchrun forwards it to its ranks), then SIGKILL
    whatever is left of it once the leader is gone or ``grace`` seconds have passed."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def cmd_demo(args: argparse.Namespace) -> int:
    common = ["--num-workers", str(args.num_workers), "--epochs", str(args.epochs)]
    with tempfile.TemporaryDirectory(prefix="ddpseed-demo-") as tmp:
        first_args = [*common] + (["--seed", str(args.seed)] if args.seed is not None else [])
        out(
            f"run 1: torchrun --nproc_per_node={args.nproc}, {args.num_workers} DataLoader "
            f"workers per rank, {args.epochs} epochs, seed "
            f"{args.seed if args.seed is not None else 'from entropy'}"
        )
        first = _torchrun(args.nproc, Path(tmp) / "run1.json", first_args, args.timeout)
        out(f"  base seed {first['base_seed']} ({first['seed_source']}), {first['steps']} steps")
        out(f"run 2: the same job again with seed {first['base_seed']} (as recorded by run 1)")
        second = _torchrun(
            args.nproc,
            Path(tmp) / "run2.json",
            [*common, "--seed", str(first["base_seed"])],
            args.timeout,
        )
    out("")
    out(f"{'rank':>4} {'process seed':>12}  worker seeds (epoch 0)")
    for rank, ps in enumerate(first["process_seeds"]):
        workers = first["worker_seeds"][rank] if first["worker_seeds"] else []
        out(f"{rank:>4} {ps:>12}  {' '.join(map(str, workers))}")
    out("")
    out(f"run 1 weights sha256: {first['weights_sha256']}")
    out(f"run 2 weights sha256: {second['weights_sha256']}")
    same = first["weights_sha256"] == second["weights_sha256"]
    out("bitwise identical: yes" if same else "bitwise identical: NO (please report this)")
    return 0 if same else 1


# -- main ---------------------------------------------------------------------------------------
DESCRIPTION = """Reproducible seeding for multi-process PyTorch (DDP) training.
"ddpseed COMMAND --help" describes each command.

Logging: DDPSEED_LOG=INFO (or the "ddpseed" logger). Library: import ddpseed; ddpseed.setup()."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ddpseed", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"ddpseed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="table of every process and worker seed, and collisions")
    p.add_argument("--seed", type=_seed_arg, required=True, help="base seed, in [0, 2**32)")
    p.add_argument("--world-size", type=_count_arg(1), default=None, help="ranks (>= 1)")
    p.add_argument("--num-workers", type=_count_arg(0), default=0, help="workers per rank")
    p.add_argument("--epochs", type=_count_arg(1), default=1, help="epochs to list (>= 1)")
    p.add_argument("--scheme", choices=SCHEMES, default="default", help="derivation rule")
    p.add_argument("--show", type=_count_arg(0), default=20, help="collisions to list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    meshcli.add_arguments(p, plan=True)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("env", help="the topology detected from the launcher's environment")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("verify", help="run under torchrun/srun: check every rank agrees")
    p.add_argument("--seed", type=_seed_arg, default=None, help="base seed (default: entropy)")
    p.add_argument("--timeout", type=_seconds_arg, default=120.0, help="collective timeout, s")
    p.add_argument("--num-workers", type=_count_arg(0), default=2, help="workers to check")
    p.add_argument("--dataset-size", type=_count_arg(1), default=64, help="samples to shard")
    p.add_argument("--json", action="store_true", help="print one JSON line on rank 0")
    meshcli.add_arguments(p, plan=False)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "demo",
        help="train a small DDP model twice on CPU; compare weights",
        description="Run a small DDP training twice under torchrun on CPU (gloo): first with "
        "the given seed or one from entropy, then again with the seed the first run recorded, "
        "and compare the final weights bitwise. Exit 0 when identical.",
    )
    p.add_argument("--nproc", type=_count_arg(1), default=2, help="ranks per run (default 2)")
    p.add_argument(
        "--num-workers", type=_count_arg(0), default=2, help="DataLoader workers per rank"
    )
    p.add_argument("--epochs", type=_count_arg(1), default=2, help="epochs per run (default 2)")
    p.add_argument("--seed", type=_seed_arg, default=None, help="base seed (default: entropy)")
    p.add_argument(
        "--timeout", type=_seconds_arg, default=600.0, help="seconds per run before it is stopped"
    )
    p.set_defaults(func=cmd_demo)

    from . import bench

    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(
        level=os.environ.get("DDPSEED_LOG", "WARNING").upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except DDPSeedError as exc:
        sys.stderr.write(f"ddpseed: error: {exc}\n")
        return 2
    return code
