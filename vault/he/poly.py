"""Polynomials as RNS residue arrays: encoding, modular arithmetic, uniform masks.

A polynomial at a level with primes ``moduli`` is an array (levels, N) of uint64
residues. A ciphertext is (2, levels, N): c0 then c1.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def residues(values: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """Signed integers -> residues (levels, *values.shape) in [0, q)."""
    values = np.asarray(values, dtype=np.int64)
    return np.stack([np.mod(values, np.int64(q)).astype(np.uint64) for q in moduli])


def centered(residue: np.ndarray, q: int) -> np.ndarray:
    """Residues mod ``q`` -> signed integers in (-q/2, q/2] (as int64)."""
    x = residue.astype(np.int64)
    return np.where(x > q // 2, x - np.int64(q), x)


def add(a: np.ndarray, b: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """``a + b`` per level; the level axis is the second to last."""
    out = np.empty_like(a)
    for level, q in enumerate(moduli):
        s = a[..., level, :] + b[..., level, :]
        out[..., level, :] = np.where(s >= np.uint64(q), s - np.uint64(q), s)
    return out


def sub(a: np.ndarray, b: np.ndarray, moduli: Sequence[int]) -> np.ndarray:
    """``a - b`` per level; the level axis is the second to last."""
    out = np.empty_like(a)
    for level, q in enumerate(moduli):
        x, y = a[..., level, :], b[..., level, :]
        out[..., level, :] = np.where(x >= y, x - y, x + (np.uint64(q) - y))
    return out


def _random_u64(count: int) -> np.ndarray:
    """Cryptographically random 64-bit words: an AES-256-CTR keystream under a fresh key
    from the OS (the CTR-DRBG construction), much faster than os.urandom for megabytes."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), np.uint64)


def _uniform_below(count: int, bound: int) -> np.ndarray:
    """``count`` integers exactly uniform in [0, bound): rejection sampling, no modulo bias."""
    limit = np.uint64((2 ** 64 // bound) * bound)
    got = np.empty(0, np.uint64)
    while got.size < count:
        draw = _random_u64(count + count // 8 + 16)
        got = np.concatenate([got, draw[draw < limit]])
    return got[:count] % np.uint64(bound)


def uniform(shape: tuple[int, ...], moduli: Sequence[int]) -> np.ndarray:
    """Residues uniform in [0, q) per level, (*shape[:-1], levels, shape[-1]). Rejection
    sampling makes them exactly uniform: masks that hide a plaintext perfectly, as a
    one-time pad mod q."""
    out = np.empty((*shape[:-1], len(moduli), shape[-1]), np.uint64)
    count = int(np.prod(shape))
    for level, q in enumerate(moduli):
        out[..., level, :] = _uniform_below(count, q).reshape(shape)
    return out


def uniform_interior(shape: tuple[int, ...], q: int, margin: int) -> np.ndarray:
    """Integers uniform in [margin, q - margin): masks for re-encryption to more primes.

    Whoever decrypts ``m + R mod q`` for ``|m| < margin`` then holds the integer ``m + R``
    itself (no wrap-around), which it can reduce mod other primes. The price: ``m + R`` is
    uniform on a window that depends on ``m``, within statistical distance
    ``2 * margin / q`` of uniform per coefficient (2^-21 for the vault's parameters).
    """
    span = q - 2 * margin
    if span <= 0:
        raise ValueError("margin too large for the modulus")
    return (_uniform_below(int(np.prod(shape)), span) + np.uint64(margin)).reshape(shape)


def residue_dtype(q: int) -> np.dtype:
    """How residues mod ``q`` are stored: uint32 where the prime allows, else uint64."""
    return np.dtype(np.uint32) if q < 2 ** 32 else np.dtype(np.uint64)


def quantise(values: np.ndarray, scale: float) -> np.ndarray:
    """Real values -> nearest integers at ``scale`` (int64)."""
    return np.rint(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)


def probe_digits(probe: np.ndarray, scale_bits: int, low_bits: int) -> np.ndarray:
    """A probe as integer digits (k, D): ``hi = round(p * 2^scale_bits)`` and, when
    ``low_bits`` > 0, ``lo = round((p * 2^scale_bits - hi) * 2^low_bits)`` (|lo| <=
    2^(low_bits-1)): ``p ~ (hi + lo / 2^low_bits) / 2^scale_bits``. Each digit is scored
    on its own, so each score stays far below q/2 while the probe keeps
    scale_bits + low_bits bits (see vault/he/params.py)."""
    x = np.asarray(probe, dtype=np.float64) * 2.0 ** scale_bits
    hi = np.rint(x)
    if low_bits == 0:
        return hi.astype(np.int64)[None, :]
    lo = np.rint((x - hi) * 2.0 ** low_bits)
    return np.stack([hi, lo]).astype(np.int64)


def combine_digits(residues: list[np.ndarray], q: int, low_bits: int) -> np.ndarray:
    """Score numerators (at the template scale times 2^scale_bits) from the decrypted
    residues of each digit's score: ``hi + lo / 2^low_bits``, as float64."""
    value = centered(residues[0], q).astype(np.float64)
    if len(residues) > 1:
        value += centered(residues[1], q) / 2.0 ** low_bits
    return value


def negacyclic_reverse(scalars: np.ndarray, n: int) -> np.ndarray:
    """The polynomial ``sum_j s_j X^-j`` mod X^n + 1 (X^-j = -X^(n-j)), as int64 (n,).

    Multiplying a template-major page by it puts ``sum_j s_j t_kj`` at coefficient k*D.
    """
    out = np.zeros(n, np.int64)
    out[0] = scalars[0]
    out[n - np.arange(1, len(scalars))] = -scalars[1:]
    return out
