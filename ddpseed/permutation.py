"""A keyed bijection on ``[0, n)`` that is evaluated one position at a time.

:class:`FeistelPermutation` maps positions to items without ever building the permutation, so
shuffling a billion-sample dataset costs memory proportional to the positions asked for, not
to ``n``::

    >>> perm = FeistelPermutation(10, key=1234)
    >>> sorted(perm(np.arange(10)).tolist()) == list(range(10))
    True
    >>> int(perm(np.array([3]))[0]) == int(perm(np.arange(10))[3])
    True

The network works on the ``b = max(1, ceil(log2 n))`` bits covering ``n``. Each round splits
the state into a high and a low part (``b // 2`` and ``b - b // 2`` bits, sizes swapping every
round, so odd ``b`` works) and replaces ``(high, low)`` with ``(low, high ^ F(low, round_key))``.
Outputs ``>= n`` are pushed through the network again ("cycle walking"); since ``2**b < 2 * n``
that takes fewer than two passes on average and keeps the map an exact bijection on ``[0, n)``.

Only ``uint64`` numpy arithmetic with explicit masks is used (wrapping multiplication is defined
for numpy arrays), and round keys come from ``numpy.random.SeedSequence``, so the permutation of
a given ``(n, key, rounds)`` is the same on every platform and numpy version.
"""

from __future__ import annotations

import operator

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]

DEFAULT_ROUNDS = 8
MAX_N = 2**64
# Domain separation: these round keys never equal other SeedSequence draws of the same seed.
_KEY_TAG = 0x46454953  # "FEIS"
_M1_INT = 0xFF51AFD7ED558CCD  # murmur3 fmix64 multipliers
_M2_INT = 0xC4CEB9FE1A85EC53
_M1, _M2 = np.uint64(_M1_INT), np.uint64(_M2_INT)
_MASK64 = 2**64 - 1
# Cycle-walk in Python once this few values are left: numpy's per-call cost dominates there.
_SCALAR_TAIL = 16
_S33 = np.uint64(33)


def round_keys(key: int, rounds: int) -> tuple[int, ...]:
    """The 64-bit round keys of ``key``: ``SeedSequence(key)`` tagged for this module.

    >>> round_keys(0, 2) == round_keys(0, 3)[:2]
    True
    """
    seq = np.random.SeedSequence(key, spawn_key=(_KEY_TAG,))
    return tuple(int(k) for k in seq.generate_state(rounds, dtype=np.uint64))


def _mix_top(z: U64, tmp: U64, width: int) -> None:
    """Replace ``z`` by the top ``width`` bits (1..32) of murmur3's fmix64 of ``z``."""
    np.right_shift(z, _S33, out=tmp)
    z ^= tmp
    z *= _M1
    np.right_shift(z, _S33, out=tmp)
    z ^= tmp
    z *= _M2
    z >>= np.uint64(64 - width)


def feistel_round(
    x: U64, round_key: int, high_bits: int, low_bits: int, scratch: U64 | None = None
) -> None:
    """One round, in place, on ``high_bits + low_bits``-bit states: ``(hi, lo) -> (lo, hi ^ F(lo))``.

    Afterwards ``x`` has ``low_bits`` high bits and ``high_bits`` low bits. ``scratch`` is an
    optional ``(3, len(x))`` buffer, so that a pass of many rounds allocates once.

    >>> x = np.array([5, 6], dtype=np.uint64)
    >>> feistel_round(x, 7, 0, 3); x.tolist()  # no high half: the state moves up unchanged
    [5, 6]
    """
    if high_bits == 0:
        return
    low, z, tmp = np.empty((3, x.size), dtype=np.uint64) if scratch is None else scratch
    np.bitwise_and(x, np.uint64((1 << low_bits) - 1), out=low)
    x >>= np.uint64(low_bits)  # x is now the high half
    np.bitwise_xor(low, np.uint64(round_key), out=z)
    _mix_top(z, tmp, high_bits)
    x ^= z
    low <<= np.uint64(high_bits)
    x |= low


def feistel_round_int(x: int, round_key: int, high_bits: int, low_bits: int) -> int:
    """:func:`feistel_round` on one Python int (same arithmetic, for a handful of values).

    >>> x = np.array([1234], dtype=np.uint64)
    >>> feistel_round(x, 99, 6, 5); int(x[0]) == feistel_round_int(1234, 99, 6, 5)
    True
    """
    if high_bits == 0:
        return x
    low, high = x & ((1 << low_bits) - 1), x >> low_bits
    z = low ^ round_key
    z = ((z ^ (z >> 33)) * _M1_INT) & _MASK64
    z = ((z ^ (z >> 33)) * _M2_INT) & _MASK64
    return (low << high_bits) | (high ^ (z >> (64 - high_bits)))


class FeistelPermutation:
    """A keyed bijection of ``[0, n)``, vectorised over numpy arrays of positions.

    ``key`` is any non-negative integer (``SeedSequence`` entropy); distinct keys give
    unrelated permutations.

    >>> perm = FeistelPermutation(5, key=42)
    >>> len(perm), sorted(perm(np.arange(5)).tolist())
    (5, [0, 1, 2, 3, 4])
    >>> perm.index(2) == int(perm(np.array([2]))[0])
    True
    """

    def __init__(self, n: int, key: int, rounds: int = DEFAULT_ROUNDS) -> None:
        n, key, rounds = operator.index(n), operator.index(key), operator.index(rounds)
        if not 1 <= n <= MAX_N:
            raise ValueError(f"n={n}: a permutation needs 1 <= n <= 2**64")
        if key < 0:
            raise ValueError(f"key={key} must be >= 0")
        if rounds < 1:
            raise ValueError(f"rounds={rounds} must be >= 1")
        self.n, self.key, self.rounds = n, key, rounds
        self.bits = max(1, (n - 1).bit_length())
        self._keys = round_keys(key, rounds)
        self._rounds = self._schedule()

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"FeistelPermutation(n={self.n}, key={self.key}, rounds={self.rounds})"

    def _schedule(self) -> list[tuple[int, int, int]]:
        """``(round_key, high_bits, low_bits)`` of every round; the halves swap each round."""
        high, low = self.bits // 2, self.bits - self.bits // 2
        out = []
        for round_key in self._keys:
            out.append((round_key, high, low))
            high, low = low, high
        return out

    def _encrypt(self, x: U64) -> U64:
        """One pass of the network over ``[0, 2**bits)``, in place; returns ``x``."""
        scratch = np.empty((3, x.size), dtype=np.uint64)
        for round_key, high, low in self._rounds:
            feistel_round(x, round_key, high, low, scratch)
        return x

    def _walk_int(self, x: int) -> int:
        """Cycle-walk one value in ``[0, 2**bits)`` into ``[0, n)``."""
        while True:
            for round_key, high, low in self._rounds:
                x = feistel_round_int(x, round_key, high, low)
            if x < self.n:
                return x

    def __call__(self, positions: npt.ArrayLike) -> U64:
        """The items at ``positions`` (each in ``[0, n)``), as a new ``uint64`` array.

        >>> FeistelPermutation(1, key=0)(np.array([0])).tolist()
        [0]
        """
        x = np.array(positions, dtype=np.uint64, copy=True, ndmin=1)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"positions must be in [0, {self.n}); got {int(x.max())}")
        if self.n == 1:
            return x
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
        """The item at one ``position``.

        >>> FeistelPermutation(1000, key=7).index(999) < 1000
        True
        """
        position = operator.index(position)
        if not 0 <= position < self.n:
            raise IndexError(f"position {position} is outside [0, {self.n})")
        return position if self.n == 1 else self._walk_int(position)
