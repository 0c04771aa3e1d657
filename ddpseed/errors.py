"""Every error ddpseed raises names the value, the rank and the fix.

All of them derive from :class:`DDPSeedError`, so one ``except`` catches any of them.
"""

from __future__ import annotations


class DDPSeedError(RuntimeError):
    """Base class of every ddpseed error."""


class SeedValueError(DDPSeedError, ValueError):
    """A seed that is not an integer in ``[0, 2**32)``."""


class TopologyError(DDPSeedError):
    """Launcher variables that contradict each other or the machine."""


class SeedMismatchError(DDPSeedError):
    """Ranks were given different explicit seeds (or only some ranks were given one)."""


class CoordinationError(DDPSeedError):
    """A collective did not complete: a rank never arrived, died, or timed out."""


class StateError(DDPSeedError):
    """A state file that is missing, torn, corrupted, or from another run."""


class RunDirError(DDPSeedError, ValueError):
    """A ``run_dir`` argument that names no directory."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, for one-line summaries of a lower-level error.

    >>> first_line(OSError("connection refused\\ndetails"))
    'connection refused'
    """
    lines = str(exc).splitlines()
    return lines[0] if lines else ""
