"""Atomic writes: a crash or a full disk never leaves a torn file in place of a good one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import StateError


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it over ``path``."""
    target = Path(path)
    tmp_name: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
        tmp_name = None
        with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        kept = "the previous version is untouched" if target.exists() else "nothing was written"
        raise StateError(
            f"could not write {what} {target}: {exc.strerror or exc} (errno {exc.errno}); "
            f"{kept}. Free space or fix permissions on {target.parent}, then save again"
        ) from exc
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, what: str = "file") -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), what=what)
