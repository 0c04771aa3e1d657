"""The run directory: where a base seed drawn from entropy survives a restart of its launch.

Rank 0 keeps ``seed.json`` (the base seed, where it came from, when and by which launch) and,
in a directory the user named, ``manifest.json`` (everything that determined the run's
randomness). The rules (README, "Restarts"):

* ``run_dir=`` / ``DDPSEED_RUN_DIR``: the user's directory; a record found there is continued.
* Otherwise the launch names one under ``~/.cache/ddpseed/runs``: an ``srun`` step
  (``slurm-<job>.<step>``, which a requeue keeps); under torchrun the launch, by a key rank 0
  keeps in torchrun's agent store, which lives exactly as long as the launch
  (``[slurm-<job>.<step>-]torchrun[-<rdzv id>]-<key>``). A plain env:// launch has none, and
  neither has a program the Slurm batch script runs itself (step ``batch`` holds them all).
* Only a restart continues a derived record: ``TORCHELASTIC_RESTART_COUNT`` or
  ``SLURM_RESTART_COUNT`` above 0. A first attempt that finds one (a reused Slurm job id) moves
  it aside and draws a fresh seed.
* ``seed.json`` is written once and never rewritten: a seed that contradicts it is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .derivation import validate_seed
from .errors import RunDirError, SeedValueError, StateError, first_line
from .files import atomic_write_json, open_regular
from .launchers import names_torchrun_launch
from .topology import Topology

log = logging.getLogger(__name__)

SEED_FILE = "seed.json"
MANIFEST_FILE = "manifest.json"
ENV_RUN_DIR = "DDPSEED_RUN_DIR"
# A seed record is a few hundred bytes; anything far larger was not written by ddpseed.
MAX_RECORD_BYTES = 64 * 1024
# Derived run directories not used for this long are removed when a new one is created.
PRUNE_AFTER_DAYS = 30
# Where rank 0 keeps the launch key in torchrun's agent store.
LAUNCH_KEY = "ddpseed/launch"
_DERIVED_PREFIXES = ("torchrun", "slurm-")
_PROCESS = secrets.token_hex(8)  # names this process in the records it writes


def runs_root(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/ddpseed/runs`` (default ``~/.cache/ddpseed/runs``)."""
    env = os.environ if env is None else env
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ddpseed" / "runs"


def restart_of(env: Mapping[str, str] | None = None) -> str:
    """Which restart of its launch this process is (``""`` for the first attempt).

    >>> restart_of({"TORCHELASTIC_RESTART_COUNT": "0"}), restart_of({"SLURM_RESTART_COUNT": "2"})
    ('', 'Slurm requeue 2')
    """
    env = os.environ if env is None else env
    parts = []
    for var, what in (
        ("SLURM_RESTART_COUNT", "Slurm requeue"),
        ("TORCHELASTIC_RESTART_COUNT", "torchrun restart"),
    ):
        raw = env.get(var, "").strip()
        if raw.isdigit() and int(raw) > 0:
            parts.append(f"{what} {int(raw)}")
    return ", ".join(parts)


@dataclass(frozen=True)
class RunDir:
    """Where rank 0 keeps the run record, as every rank resolves it before the agreement.

    ``path`` is the user's directory, or for a derived one ``runs/<run id>``, which for torchrun
    rank 0 completes with the launch key (:func:`find_record`).
    """

    path: Path
    explicit: bool
    restart: str = ""  # "" on a first attempt, else e.g. "torchrun restart 1"
    agent_store: tuple[str, int] | None = None  # torchrun: where the launch key lives


@dataclass(frozen=True)
class SeedRecord:
    path: Path
    base_seed: int
    source: str
    created: str = "?"
    launch: str = "?"

    def describe(self) -> str:
        return (
            f"base seed {self.base_seed} (source: {self.source}, created {self.created} by "
            f"{self.launch}) in {self.path}"
        )


@dataclass(frozen=True)
class Found:
    """Rank 0's view of its launch's run directory: the directory and its record, if any."""

    where: RunDir
    dir: Path
    record: SeedRecord | None
    launch: str  # how this launch is named, for a record created now


def resolve_run_dir(
    run_dir: str | os.PathLike[str] | None, topo: Topology, env: Mapping[str, str] | None = None
) -> RunDir | None:
    """This rank's run directory: the argument, ``DDPSEED_RUN_DIR``, or one the launch names."""
    env = os.environ if env is None else env
    restart = restart_of(env)
    if run_dir is not None:
        if not str(os.fspath(run_dir)).strip():
            raise RunDirError(
                f"rank {topo.rank}: run_dir={os.fspath(run_dir)!r} names no directory (the run "
                "record would land in the current directory); pass a directory path, or "
                "run_dir=None to let the launcher name one"
            )
        return RunDir(Path(run_dir), explicit=True, restart=restart)
    if env.get(ENV_RUN_DIR, "").strip():
        return RunDir(Path(env[ENV_RUN_DIR]), explicit=True, restart=restart)
    if not topo.run_id:
        return None
    path = runs_root(env) / topo.run_id
    if not names_torchrun_launch(topo.run_id):
        if topo.run_id.startswith("slurm-") and not topo.run_id.endswith(".batch"):
            return RunDir(path, explicit=False, restart=restart)
        # Every program the batch script runs (step "batch") is one step, one after another
        # or at once, so a requeue could not tell whose record is whose; other schedulers'
        # job ids do not name a launch either.
        log.info(
            "rank %d: launch %s names no run directory of its own (start it with srun, or pass "
            "run_dir= or DDPSEED_RUN_DIR, to keep an entropy seed across a requeue)",
            topo.rank,
            topo.run_id,
        )
        return None
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        log.info(
            "rank %d: torchrun's agent store is not shared with the workers "
            "(TORCHELASTIC_USE_AGENT_STORE=%r), so this launch has no run directory; pass "
            "run_dir= or DDPSEED_RUN_DIR to keep an entropy seed across restarts",
            topo.rank,
            env.get("TORCHELASTIC_USE_AGENT_STORE"),
        )
        return None
    # A Slurm requeue of a torchrun is a new launch with its own key: only torchrun's own
    # restarts continue its record (and only their absence of one is worth a warning).
    restart = restart_of({"TORCHELASTIC_RESTART_COUNT": env.get("TORCHELASTIC_RESTART_COUNT", "")})
    return RunDir(
        path, explicit=False, restart=restart, agent_store=(topo.master_addr, topo.master_port)
    )


def launch_key(addr: str, port: int, timeout: float) -> str:
    """The key naming this torchrun launch, kept in its agent store (set by the first caller).

    The agent's store lives as long as the launch and survives its restart attempts, so every
    attempt gets the same key and another launch (even with the same rdzv id or port) another.
    """
    mine = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    try:
        import torch.distributed as dist

        store = dist.TCPStore(  # type: ignore[attr-defined]
            addr, port, is_master=False, timeout=timedelta(seconds=timeout)
        )
        try:
            key = store.compare_set(LAUNCH_KEY, "", mine).decode()
        finally:
            del store
    except Exception as exc:  # the store's client raises RuntimeError subclasses
        raise StateError(
            f"could not reach torchrun's agent store at {addr}:{port} to name this launch; pass "
            f"run_dir= or set DDPSEED_RUN_DIR ({type(exc).__name__}: {first_line(exc)})"
        ) from exc
    return key


def find_record(where: RunDir, timeout: float) -> Found:
    """Rank 0: this launch's run directory and the record in it (None if there is none yet).

    A derived directory is continued only by a restart: a first attempt that finds a record
    another process wrote (a Slurm job id used again, a second launch in one batch script)
    moves it aside, keeping it, and starts afresh.
    """
    if where.explicit:
        return Found(where, where.path, read_seed_record(where.path), "run_dir")
    directory, launch = where.path, f"launch {where.path.name}"
    if where.agent_store is not None:
        addr, port = where.agent_store
        key = launch_key(addr, port, timeout)
        directory = where.path.with_name(f"{where.path.name}-{key}")
        launch = f"torchrun launch {key} (agent store {addr}:{port})"
    record = read_seed_record(directory)
    if record is not None and not where.restart and not _written_by_me(record):
        stamp = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
        aside = directory.with_name(f"{directory.name}.stale-{stamp}")
        try:
            directory.rename(aside)
        except OSError as exc:
            raise StateError(
                f"could not move aside an earlier launch's run record ({exc.strerror or exc}); "
                f"remove it or pass run_dir=: {directory}"
            ) from exc
        log.warning(
            "%s is a first attempt, but %s already holds %s: an earlier job with the same "
            "name. Moved it to %s; this launch draws its own seed",
            launch,
            directory,
            record.describe(),
            aside,
        )
        record = None
    return Found(where, directory, record, launch)


def _written_by_me(record: SeedRecord) -> bool:
    # By a token drawn once per process: a pid is reused (containers start at 1).
    return record.launch.endswith(f" {_PROCESS}]")


def read_seed_record(run_dir: Path) -> SeedRecord | None:
    """The seed record in ``run_dir``, or None if there is none yet."""
    path = run_dir / SEED_FILE
    try:
        # Not a plain open(): a FIFO there would block rank 0 past every timeout.
        with open_regular(path, "seed record", "move it away, or pass another run_dir=") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(
            f"cannot read seed record ({exc.strerror or exc}); fix its permissions or pass "
            f"another run_dir=: {path}"
        ) from exc
    # Short, the path last: the record step carries each rank's message in 256 bytes.
    fix = f"restore it from a backup, or move it away to draw a new seed: {path}"
    if len(raw) > MAX_RECORD_BYTES:
        raise StateError(
            f"seed record over {MAX_RECORD_BYTES} bytes, not written by ddpseed; {fix}"
        )
    try:
        data = json.loads(raw)
    except RecursionError:
        raise StateError(f"corrupted seed record (nested too deeply); {fix}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError alike
        raise StateError(f"corrupted seed record ({exc}); {fix}") from None
    if not isinstance(data, dict):
        raise StateError(f"corrupted seed record (a JSON {type(data).__name__}); {fix}")
    try:
        seed = validate_seed(data.get("base_seed"), source="base_seed")
    except SeedValueError as exc:
        raise StateError(f"corrupted seed record ({exc}); {fix}") from None
    text = {k: str(data.get(k, "?")) for k in ("source", "created", "launch")}
    return SeedRecord(path, seed, text["source"], text["created"], text["launch"])


def create_seed_record(found: Found, base_seed: int, source: str) -> SeedRecord:
    """Write ``seed.json`` unless it exists; return what the directory then holds.

    Written once, atomically and exclusively (a temp file hard-linked into place), so two jobs
    given one directory cannot overwrite each other: the second gets the first one's record
    back, and the caller refuses a seed that contradicts it.
    """
    if not found.where.explicit:
        prune_runs(found.dir.parent, keep=found.dir.name)
    record = SeedRecord(
        found.dir / SEED_FILE,
        base_seed,
        source,
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        f"{found.launch} [{socket.gethostname()} pid {os.getpid()} {_PROCESS}]",
    )
    data = {
        "base_seed": base_seed,
        "source": source,
        "created": record.created,
        "launch": record.launch,
    }
    tmp = found.dir / f".{SEED_FILE}.{os.getpid()}.{secrets.token_hex(4)}.new"
    atomic_write_json(tmp, data, what="seed record")
    try:
        os.link(tmp, record.path)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: check, then rename (not exclusive)
        if not record.path.exists():
            os.replace(tmp, record.path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    kept = read_seed_record(found.dir)
    if kept is None:
        raise StateError(f"seed record {record.path} vanished right after it was written")
    return kept


def mark_used(record: SeedRecord) -> None:
    """Touch ``seed.json`` (its content is never rewritten), so pruning keeps runs in use."""
    with contextlib.suppress(OSError):
        os.utime(record.path)


def prune_runs(root: Path, *, keep: str = "", days: float = PRUNE_AFTER_DAYS) -> list[Path]:
    """Remove derived run directories under ``root`` unused for ``days``; return them.

    Only names ddpseed derives (``torchrun...``, ``slurm-...``) are touched; directories the
    user names with ``run_dir=`` never are.
    """
    removed: list[Path] = []
    cutoff = time.time() - days * 86400
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name == keep or not entry.name.startswith(_DERIVED_PREFIXES):
            continue
        try:
            seed = entry / SEED_FILE
            used = (seed if seed.exists() else entry).stat().st_mtime
            if not entry.is_dir() or entry.is_symlink() or used >= cutoff:
                continue
            shutil.rmtree(entry)
        except OSError as exc:
            log.info("could not prune old run directory %s: %s", entry, exc)
            continue
        removed.append(entry)
    if removed:
        log.info("pruned %d run directories unused for %g days under %s", len(removed), days, root)
    return removed
