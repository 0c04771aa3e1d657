"""A keyed bijection on ``[0, n)`` that is evaluated one position at a time.

:class:`FeistelPermutation` maps positions to items without ever building the permutation, so
shuffling a billion-sample dataset costs memory proportional to the positions asked for, not
to ``n``::

    >>> perm = FeistelPermutation(10, key=1234)
    >>> sorted(perm(np.arange(10)).tolist()) == list(range(10))
    True
    >>> perm.index(3) == int(perm(np.arange(10))[3])
    True

The network works on the ``b = max(4, ceil(log2 n))`` bits covering ``n``, split into a left
half of ``b // 2`` bits and a right half of ``b - b // 2``. Each round maps ``(L, R)`` to
``(R, L ^ F(R))``, so the halves trade widths every round and odd ``b`` works. ``F`` keeps the
top ``width(L)`` bits of a multiply-xorshift-multiply hash (murmur3's finaliser constants) of
``R ^ round_key``. Outputs ``>= n`` are pushed through the network again ("cycle walking"),
which keeps the map an exact bijection on ``[0, n)``; for ``n > 8``, ``2**b < 2 * n``, so that
takes under two passes on average.

Only ``uint64`` numpy arithmetic with explicit masks is used (wrapping multiplication is defined
for numpy arrays), and round keys come from ``numpy.random.SeedSequence``, so the permutation of
a given ``(n, key, rounds)`` is the same on every platform and numpy version.
"""

from __future__ import annotations

import operator

import numpy as np
import numpy.typing as npt
from numpy.random import SeedSequence  # numpy imports np.random lazily; pay that at import

U64 = npt.NDArray[np.uint64]

DEFAULT_ROUNDS = 8
MAX_N = 2**63
# Domain separation: these round keys never equal other SeedSequence draws of the same seed.
_KEY_TAG = 0x46454953  # "FEIS"
_M1_INT = 0xFF51AFD7ED558CCD  # murmur3 fmix64 multipliers
_M2_INT = 0xC4CEB9FE1A85EC53
_M1, _M2 = np.uint64(_M1_INT), np.uint64(_M2_INT)
_S33 = np.uint64(33)
_MASK64 = 2**64 - 1
# Halves of 1 or 2 bits mix too little per round; walking up from 16 values costs nothing.
_MIN_BITS = 4
# Cycle-walk in Python once this few values are left: numpy's per-call cost dominates there.
_SCALAR_TAIL = 16


def round_keys(key: int, rounds: int) -> tuple[int, ...]:
    """The 64-bit round keys of ``key``: ``SeedSequence(key)`` tagged for this module.

    >>> round_keys(0, 2) == round_keys(0, 3)[:2]
    True
    """
    seq = SeedSequence(key, spawn_key=(_KEY_TAG,))
    return tuple(int(k) for k in seq.generate_state(rounds, dtype=np.uint64))


def round_function(right: U64, round_key: int, width: int, out: U64, tmp: U64) -> U64:
    """``F(right)``: ``width`` (1..32) bits of ``right ^ round_key`` hashed, written to ``out``.

    >>> r = np.array([0, 1, 2], dtype=np.uint64)
    >>> f = round_function(r, 99, 5, np.empty(3, np.uint64), np.empty(3, np.uint64))
    >>> f.tolist() == [round_function_int(v, 99, 5) for v in range(3)]
    True
    """
    np.bitwise_xor(right, np.uint64(round_key), out=out)
    out *= _M1
    np.right_shift(out, _S33, out=tmp)
    out ^= tmp
    out *= _M2
    out >>= np.uint64(64 - width)
    return out


def round_function_int(right: int, round_key: int, width: int) -> int:
    """:func:`round_function` of one Python int (same arithmetic, for a handful of values).

    >>> 0 <= round_function_int(12, 34, 3) < 8
    True
    """
    z = ((right ^ round_key) * _M1_INT) & _MASK64
    z = ((z ^ (z >> 33)) * _M2_INT) & _MASK64
    return z >> (64 - width)


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
        self.bits = max(_MIN_BITS, (n - 1).bit_length())
        self._left_bits = self.bits // 2
        self._right_bits = self.bits - self._left_bits
        self._keys = round_keys(key, rounds)

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeistelPermutation(n={self.n}, key={self.key}, rounds={self.rounds})"

    def _encrypt(self, x: U64) -> U64:
        """One pass of the network over ``[0, 2**bits)``, in place; returns ``x``."""
        left = x >> np.uint64(self._right_bits)
        right = x & np.uint64((1 << self._right_bits) - 1)
        f, tmp = np.empty_like(x), np.empty_like(x)
        left_bits, right_bits = self._left_bits, self._right_bits
        for round_key in self._keys:
            left ^= round_function(right, round_key, left_bits, f, tmp)
            left, right = right, left
            left_bits, right_bits = right_bits, left_bits
        np.left_shift(left, np.uint64(right_bits), out=x)
        x |= right
        return x

    def _encrypt_int(self, x: int) -> int:
        left, right = x >> self._right_bits, x & ((1 << self._right_bits) - 1)
        left_bits, right_bits = self._left_bits, self._right_bits
        for round_key in self._keys:
            left, right = right, left ^ round_function_int(right, round_key, left_bits)
            left_bits, right_bits = right_bits, left_bits
        return (left << right_bits) | right

    def _walk_int(self, x: int) -> int:
        """Cycle-walk one value of ``[0, 2**bits)`` into ``[0, n)``."""
        x = self._encrypt_int(x)
        while x >= self.n:
            x = self._encrypt_int(x)
        return x

    def __call__(self, positions: npt.ArrayLike) -> U64:
        """The items at ``positions`` (each in ``[0, n)``), as a new ``uint64`` array.

        >>> FeistelPermutation(1, key=0)([0]).tolist()
        [0]
        """
        x = np.array(positions, dtype=np.uint64, copy=True, ndmin=1)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"positions must be in [0, {self.n}); got {int(x.max())}")
        if self.n == 1:
            return x
        if x.size <= _SCALAR_TAIL:
            return np.array([self._walk_int(v) for v in x.tolist()], dtype=np.uint64)
        out = self._encrypt(x)  # x is our own copy
        pending = np.flatnonzero(out >= np.uint64(self.n))
        # Cycle walking: re-encrypt only what landed outside [0, n), the last few in Python.
        while pending.size > _SCALAR_TAIL:
            walked = self._encrypt(out[pending])
            out[pending] = walked
            pending = pending[walked >= np.uint64(self.n)]
        for i in pending.tolist():
            out[i] = self._walk_int(int(out[i]))
        return out

    def index(self, position: int) -> int:
        """The item at one ``position`` (pure Python: no numpy call overhead).

        >>> FeistelPermutation(1000, key=7).index(999) < 1000
        True
        """
        position = operator.index(position)
        if not 0 <= position < self.n:
            raise IndexError(f"position {position} is outside [0, {self.n})")
        return position if self.n == 1 else self._walk_int(position)
