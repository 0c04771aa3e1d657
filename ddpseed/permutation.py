"""A keyed bijection on ``[0, n)`` that is evaluated one position at a time.

:class:`FeistelPermutation` maps positions to items without ever building the permutation, so
shuffling a billion-sample dataset costs memory proportional to the positions asked for, not
to ``n``::

    >>> perm = FeistelPermutation(10, key=1234)
    >>> sorted(perm(np.arange(10)).tolist()) == list(range(10))
    True
    >>> perm.index(3) == int(perm(np.arange(10))[3])
    True

The network works on a rectangle ``[0, a) x [0, b)`` just covering ``n``: ``a = ceil(sqrt(n))``
and ``b = ceil(n / a)`` (each at least 4), position ``x`` being the pair ``(x // b, x % b)``.
Each round maps ``(L, R)`` to ``(R, (L + F(R)) mod m)``, ``m`` being the range of ``L``, so the
two halves trade ranges every round (an unbalanced, mixed-radix Feistel network), and after an
even number of rounds the pair is read back as ``L * b + R``. ``F`` hashes ``R ^ round_key``
with a multiply-xorshift-multiply (murmur3's finaliser constants) and scales the top half of
the hash onto ``[0, m)`` with one multiply and shift. ``a * b - n < a``, so fewer than one
output in ``sqrt(n)`` lands outside ``[0, n)``; those are pushed through the network again
("cycle walking"), which keeps the map an exact bijection on ``[0, n)``.

For ``n < 2**32`` everything is ``uint32`` (halves up to ``2**16``); above, ``uint64``.
Wrapping multiplication is defined for numpy's unsigned arrays, and round keys come from
``numpy.random.SeedSequence``, so the permutation of a given ``(n, key, rounds)`` is the same
on every platform and numpy version. :data:`ORDER_VERSION` names this construction: a saved
position is only meaningful in the order it was saved in.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from numpy.random import SeedSequence  # numpy imports np.random lazily; pay that at import

U64 = npt.NDArray[np.uint64]
Words = npt.NDArray[np.unsignedinteger]

# Version 2: the mixed-radix network above, 8 rounds, 32-bit below 2**32. (Version 1 was a
# balanced binary Feistel network of 8 rounds in 64-bit arithmetic.)
ORDER_VERSION = 2
DEFAULT_ROUNDS = 8
MAX_N = 2**63
NARROW_N = 2**32  # below it every value and product fits 32 bits
# Domain separation: these round keys never equal other SeedSequence draws of the same seed.
_KEY_TAG = 0x46454932  # "FEI2"
# Ranges of 1 to 3 values mix too little per round; walking up from 16 values costs nothing.
_MIN_RADIX = 4
# Cycle-walk in Python once this few values are left: numpy's per-call cost dominates there.
_SCALAR_TAIL = 16


@dataclass(frozen=True)
class Width:
    """The word size of the arithmetic: its dtype and the hash's constants."""

    bits: int
    dtype: type[np.unsignedinteger]
    m1: int  # the hash's multipliers and xorshift
    m2: int
    shift: int

    @property
    def half(self) -> int:
        return self.bits // 2


NARROW = Width(32, np.uint32, 0x85EBCA6B, 0xC2B2AE35, 16)  # murmur3 fmix32 multipliers
WIDE = Width(64, np.uint64, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 33)  # fmix64


def round_keys(key: int, rounds: int, width: Width = NARROW) -> tuple[int, ...]:
    """The round keys of ``key``: ``SeedSequence(key)`` tagged for this module, one word each.

    >>> round_keys(0, 2) == round_keys(0, 3)[:2]
    True
    """
    seq = SeedSequence(key, spawn_key=(_KEY_TAG,))
    return tuple(int(k) for k in seq.generate_state(rounds, dtype=width.dtype))


def split(n: int) -> tuple[int, int]:
    """The rectangle ``(a, b)`` of the network over ``[0, n)``: ``a * b >= n``, ``a * b - n < a``.

    >>> split(10), split(10**6), split(2**32)
    ((4, 4), (1000, 1000), (65536, 65536))
    """
    a = max(_MIN_RADIX, math.isqrt(n - 1) + 1)
    return a, max(_MIN_RADIX, -(-n // a))


class FeistelPermutation:
    """A keyed bijection of ``[0, n)``, vectorised over numpy arrays of positions.

    ``key`` is any non-negative integer (``SeedSequence`` entropy); distinct keys give
    unrelated permutations.

    >>> perm = FeistelPermutation(5, key=42)
    >>> len(perm), sorted(perm(np.arange(5)).tolist())
    (5, [0, 1, 2, 3, 4])
    >>> perm.index(2) == int(perm([2])[0])
    True
    """

    def __init__(self, n: int, key: int, rounds: int = DEFAULT_ROUNDS) -> None:
        n, key, rounds = operator.index(n), operator.index(key), operator.index(rounds)
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n={n}: a permutation needs 1 <= n <= 2**63")
        if key < 0:
            raise ValueError(f"key={key} must be >= 0")
        if rounds < 1:
            raise ValueError(f"rounds={rounds} must be >= 1")
        self.n, self.key, self.rounds = n, key, rounds
        self.width = NARROW if n < NARROW_N else WIDE
        self.dtype = self.width.dtype
        self.radices = split(n)
        self._keys = round_keys(key, rounds, self.width)
        w = self.width
        # numpy scalars made once: per-call conversions would cost more than small arrays do
        self._np = {
            name: w.dtype(value)
            for name, value in {
                "m1": w.m1,
                "m2": w.m2,
                "shift": w.shift,
                "half": w.half,
                "a": self.radices[0],
                "b": self.radices[1],
                "n": n,
            }.items()
        }
        self._np_keys = [w.dtype(k) for k in self._keys]

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeistelPermutation(n={self.n}, key={self.key}, rounds={self.rounds})"

    def _encrypt(self, x: Words) -> Words:
        """One pass of the network over ``[0, a * b)``, in place; returns ``x``."""
        c = self._np
        mods = (c["a"], c["b"])
        left = np.floor_divide(x, c["b"])
        right = np.multiply(left, c["b"])
        np.subtract(x, right, out=right)
        f, tmp = np.empty_like(x), np.empty_like(x)
        for i, round_key in enumerate(self._np_keys):
            m = mods[i % 2]  # the range of ``left`` this round
            np.bitwise_xor(right, round_key, out=f)
            f *= c["m1"]
            np.right_shift(f, c["shift"], out=tmp)
            f ^= tmp
            f *= c["m2"]
            f >>= c["half"]
            f *= m
            f >>= c["half"]  # the top half of the hash scaled onto [0, m)
            left += f
            np.subtract(left, m, out=tmp)
            np.minimum(left, tmp, out=left)  # mod m: below m, left - m wraps above it
            left, right = right, left
        np.multiply(left, mods[(self.rounds - 1) % 2], out=x)  # the range of ``right``
        x += right
        return x

    def _encrypt_int(self, x: int) -> int:
        w, (a, b) = self.width, self.radices
        mask = (1 << w.bits) - 1
        mods = (a, b)
        left, right = divmod(x, b)
        for i, round_key in enumerate(self._keys):
            m = mods[i % 2]
            h = ((right ^ round_key) * w.m1) & mask
            h = ((h ^ (h >> w.shift)) * w.m2) & mask
            left, right = right, (left + ((h >> w.half) * m >> w.half)) % m
        return left * mods[(self.rounds - 1) % 2] + right

    def _walk_int(self, x: int) -> int:
        """Cycle-walk one value of ``[0, n)`` through the network until it lands in ``[0, n)``."""
        x = self._encrypt_int(x)
        while x >= self.n:
            x = self._encrypt_int(x)
        return x

    def permute(self, x: Words) -> Words:
        """The items at positions ``x``, in place: ``x`` must be this permutation's own
        :attr:`dtype`, every value in ``[0, n)``, and the caller's to overwrite (unchecked:
        :meth:`__call__` is the checked form)."""
        if self.n == 1:
            return x
        if x.size <= _SCALAR_TAIL:
            x[:] = [self._walk_int(v) for v in x.tolist()]
            return x
        out = self._encrypt(x)
        pending = np.flatnonzero(out >= self._np["n"])
        # Cycle walking: re-encrypt only what landed outside [0, n), the last few in Python.
        while pending.size > _SCALAR_TAIL:
            walked = self._encrypt(out[pending])
            out[pending] = walked
            pending = pending[walked >= self._np["n"]]
        for i in pending.tolist():
            out[i] = self._walk_int(int(out[i]))
        return out

    def __call__(self, positions: npt.ArrayLike) -> U64:
        """The items at ``positions`` (each in ``[0, n)``), as a new ``uint64`` array.

        >>> FeistelPermutation(1, key=0)([0]).tolist()
        [0]
        """
        x = np.array(positions, dtype=np.uint64, copy=True, ndmin=1)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"positions must be in [0, {self.n}); got {int(x.max())}")
        return self.permute(x.astype(self.dtype, copy=False)).astype(np.uint64, copy=False)

    def index(self, position: int) -> int:
        """The item at one ``position`` (pure Python: no numpy call overhead).

        >>> FeistelPermutation(1000, key=7).index(999) < 1000
        True
        """
        position = operator.index(position)
        if not 0 <= position < self.n:
            raise IndexError(f"position {position} is outside [0, {self.n})")
        return position if self.n == 1 else self._walk_int(position)
