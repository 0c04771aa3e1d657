"""Every error ddpseed raises names the value, the rank and the fix.

All of them derive from :class:`DDPSeedError`, so one ``except`` catches any of them.
"""

from __future__ import annotations


class DDPSeedError(RuntimeError):
    """Base class of every ddpseed error."""


class SeedValueError(DDPSeedError, ValueError):
    """A seed that is not an integer in ``[0, 2**32)``."""


class ArgumentError(DDPSeedError, ValueError):
    """An argument outside its domain, e.g. a timeout that is not a finite positive number."""


class TopologyError(DDPSeedError):
    """Launcher variables that contradict each other or the machine."""


class AgreementError(DDPSeedError):
    """Ranks disagree on something that must be the same on every rank (dataset, epoch...)."""


class SeedMismatchError(AgreementError):
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


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` for an error message, abbreviated when it is huge.

    >>> shown("42"), shown("9" * 10_000), shown(10**5000)
    ("'42'", "'99999999999999999999'... (10000 characters)", '<an integer of 5001 digits>')
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        # repr() itself refuses ints over sys.get_int_max_str_digits() digits.
        return f"<an integer of {_digits(value)} digits>"
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:20]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _digits(value: int) -> int:
    """Decimal digits of ``abs(value)``, without converting it to a string."""
    n = abs(value)
    d = max(1, int((n.bit_length() - 1) * 0.30102999566398120))  # log10(2)
    while 10**d <= n:
        d += 1
    while d > 1 and 10 ** (d - 1) > n:
        d -= 1
    return d
