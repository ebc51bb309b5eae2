"""Compiled kernels (numba) on raw RNS residues: the hot loops of encrypted matching.

They release the GIL, so scoring runs on several threads while gRPC keeps serving.
Correctness is checked against exact Python integers and against TenSEAL/SEAL
decryption in ``tests/he/test_kernels.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# numba's cache goes beside the package by default, which a read-only install (a wheel in
# an image, a system site-packages) cannot write: keep it in the user's cache instead.
os.environ.setdefault("NUMBA_CACHE_DIR", str(
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vault-numba"))

from numba import njit  # noqa: E402 - reads NUMBA_CACHE_DIR when first imported

# score_block (score primes above 2^32, key versions from before issue 14): residues are
# split in halves of _SPLIT bits so that a signed probe scalar (at most 2^21) times a half
# fits in 47 bits and D <= 1024 of them sum below 2^63.
_SPLIT = np.uint64(26)
_MASK = np.uint64((1 << 26) - 1)


@njit(nogil=True, cache=True)
def mulmod(a: np.ndarray, b: np.ndarray, q: int, out: np.ndarray) -> None:
    """``out = a * b mod q`` element-wise, for residues below ``q < 2**52``.

    The quotient is estimated in float64 (exact inputs below 2^53, so it is off by at most
    one) and the remainder is computed exactly in wrapping 64-bit arithmetic.
    """
    qf = float(q)
    qi = np.int64(q)
    qu = np.uint64(q)
    for i in range(a.shape[0]):
        x = np.uint64(a[i])
        y = np.uint64(b[i])
        quotient = np.uint64(np.int64(float(x) * float(y) / qf))
        r = np.int64(x * y - quotient * qu)
        while r < 0:
            r += qi
        while r >= qi:
            r -= qi
        out[i] = np.uint64(r)


@njit(nogil=True, cache=True)
def _reduce_split(hi: np.ndarray, lo: np.ndarray, q: int, shift_mod_q: int, out: np.ndarray) -> None:
    """``out = (hi * 2^_SPLIT + lo) mod q`` for signed 64-bit accumulators."""
    qi = np.int64(q)
    tmp_h = np.empty(hi.shape[0], np.uint64)
    tmp_s = np.full(hi.shape[0], np.uint64(shift_mod_q))
    for i in range(hi.shape[0]):
        h = hi[i] % qi
        if h < 0:
            h += qi
        tmp_h[i] = np.uint64(h)
    mulmod(tmp_h, tmp_s, q, tmp_h)
    for i in range(hi.shape[0]):
        v = lo[i] % qi
        if v < 0:
            v += qi
        v += np.int64(tmp_h[i])
        if v >= qi:
            v -= qi
        out[i] = np.uint64(v)


@njit(nogil=True, cache=True)
def score_block(block: np.ndarray, scalars: np.ndarray, q: int, out: np.ndarray) -> None:
    """Encrypted scores of one dimension-major block: ``out = sum_j scalars[j] * block[j]``.

    ``block`` is (D, 2, N) residues mod ``q`` (ciphertext ``j`` holds dimension ``j`` of
    N templates), ``scalars`` the probe quantised to signed integers (|s| <= 2^21), ``out``
    the (2, N) score ciphertext: coefficient ``i`` of its plaintext is template ``i``'s
    score. Memory-bound: every residue is read once.
    """
    dim = block.shape[0]
    n = block.shape[2]
    lo = np.zeros((2, n), np.int64)
    hi = np.zeros((2, n), np.int64)
    for j in range(dim):
        s = np.int64(scalars[j])
        if s == 0:
            continue
        for k in range(2):
            row = block[j, k]
            acc_lo = lo[k]
            acc_hi = hi[k]
            for i in range(n):
                c = row[i]
                acc_lo[i] += s * np.int64(np.int32(c & _MASK))
                acc_hi[i] += s * np.int64(np.int32(c >> _SPLIT))
    shift = (1 << 26) % q
    for k in range(2):
        _reduce_split(hi[k], lo[k], q, shift, out[k])


@njit(nogil=True, cache=True, inline="always")
def _add_row(row: np.ndarray, digits: np.ndarray, j: int, acc: np.ndarray) -> None:
    """``acc[d] += digits[d, j] * row`` for every probe digit d, in int64 (the two-digit
    case in one pass over the row)."""
    n = row.shape[0]
    count = digits.shape[0]
    if count == 2:
        s0 = np.int64(digits[0, j])
        s1 = np.int64(digits[1, j])
        a0 = acc[0]
        a1 = acc[1]
        for i in range(n):
            c = np.int64(row[i])
            a0[i] += s0 * c
            a1[i] += s1 * c
    else:
        for d in range(count):
            s = np.int64(digits[d, j])
            a = acc[d]
            for i in range(n):
                a[i] += s * np.int64(row[i])


@njit(nogil=True, cache=True)
def score_block32(block: np.ndarray, digits: np.ndarray, q: int, out: np.ndarray) -> None:
    """:func:`score_block` for a score prime below 2^32, one score per probe digit in the
    same pass: ``block`` (D, 2, N) uint32, ``digits`` (k, D) signed integers
    (|s| <= 2^20), ``out`` (k, 2, N).

    Whole residues times scalars summed over D <= 1024 terms stay below 2^62: one int64
    multiply-add per residue and digit, no split, and each residue read once.
    """
    dim = block.shape[0]
    n = block.shape[2]
    count = digits.shape[0]
    acc = np.zeros((count, 2, n), np.int64)
    for j in range(dim):
        for k in range(2):
            _add_row(block[j, k], digits, j, acc[:, k])
    qi = np.int64(q)
    for d in range(count):
        for k in range(2):
            for i in range(n):
                v = acc[d, k, i] % qi
                if v < 0:
                    v += qi
                out[d, k, i] = np.uint64(v)


@njit(nogil=True, cache=True)
def accumulate32_at(block: np.ndarray, digits: np.ndarray, start: int, stop: int,
                    slots: np.ndarray, acc1: np.ndarray, acc0: np.ndarray) -> None:
    """The sums of :func:`score_block32` over dimensions ``[start, stop)``, unreduced, for
    a 1:1: c1 in full into ``acc1`` (k, N) and c0 only at ``slots`` into ``acc0`` (k, S),
    both int64 and added to.

    Decrypting coefficient i of ``c0 + c1*s`` needs all of c1 (the product with s is
    negacyclic) but only c0[i]: half the bytes of a full scan. Partial sums over disjoint
    ranges of D add up to the full one, within the same int64 bound (one term each).
    """
    count = digits.shape[0]
    for j in range(start, stop):
        _add_row(block[j, 1], digits, j, acc1)
        for t in range(slots.shape[0]):
            c = np.int64(block[j, 0, slots[t]])
            for d in range(count):
                acc0[d, t] += np.int64(digits[d, j]) * c
