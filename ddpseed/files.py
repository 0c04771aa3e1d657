"""Atomic writes: a crash or a full disk never leaves a torn file in place of a good one."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from .errors import StateError


def file_kind(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file is, for an error message.

    >>> file_kind(stat.S_IFIFO), file_kind(stat.S_IFDIR)
    ('a FIFO', 'a directory')
    """
    kinds = [
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISLNK, "a symbolic link"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


@contextlib.contextmanager
def open_regular(
    path: Path, what: str, fix: str = "pass the path of a file written by save_state"
) -> Iterator[BinaryIO]:
    """``path`` opened for reading, refused with :class:`StateError` unless a regular file.

    Opened non-blocking and checked on the descriptor, so a FIFO (whose plain open blocks until
    a writer comes) or a directory is refused without waiting, and nothing can be swapped in
    between the check and the read. Raises FileNotFoundError when there is nothing there.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise StateError(f"{what} {path} is not a regular file ({file_kind(mode)}); {fix}")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, what: str = "file") -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename it over ``path``.

    Refuses to replace anything at ``path`` but a regular file or a symbolic link (a FIFO, a
    device such as /dev/null, a directory): that is never a file the caller meant to save to.
    """
    target = Path(path)
    try:
        mode = os.lstat(target).st_mode
    except OSError:
        mode = stat.S_IFREG  # nothing there (or unreadable): the write below reports it
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise StateError(
            f"could not write {what}: {target} is not a regular file ({file_kind(mode)}); "
            "nothing was written. Save to a file path, not to a FIFO, device or directory"
        )
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
