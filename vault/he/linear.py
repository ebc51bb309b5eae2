"""Linear maps across the D ciphertexts of a block, and the CKKS rescale.

A transform rotation (:mod:`vault.ops.rotation`) multiplies a block's D ciphertexts by a
D x D matrix of signed integers (the orthogonal change of transform, scaled by the
rotation prime) and then divides by that prime (rescale), keeping the templates' scale.

The product is computed exactly mod each prime with float64 matrix products (BLAS):
residues are split into limbs of 17 bits and the matrix into a low limb of 16 bits and a
signed high limb (below 2^20 for entries below 2^36), so every partial product and every
sum over D <= 1,024 terms stays below 2^47, where float64 integers are exact.
"""

from __future__ import annotations

import numpy as np

from vault.he import kernels, poly

_RES_LIMB = 17
_MAT_LIMB = 16


def _limbs(x: np.ndarray, bits: int, count: int) -> list[np.ndarray]:
    mask = np.uint64((1 << bits) - 1)
    return [((x >> np.uint64(bits * i)) & mask).astype(np.float64) for i in range(count)]


def _mulmod_scalar(x: np.ndarray, factor: int, q: int) -> np.ndarray:
    if q < 2 ** 32:  # exact in uint64, and no compiled kernel (the first enrollment's page)
        return (x % np.uint64(q)) * np.uint64(factor % q) % np.uint64(q)
    out = np.empty_like(x)
    kernels.mulmod(x.reshape(-1), np.full(x.size, factor % q, np.uint64), q, out.reshape(-1))
    return out


def matmul_mod(matrix: np.ndarray, x: np.ndarray, q: int) -> np.ndarray:
    """``matrix @ x mod q`` exactly: ``matrix`` (R, D) signed integers below 2^36 in
    magnitude (a rotation's change of transform takes up to q1 times the ratio of its
    template scales), ``x`` (D, M) residues mod ``q < 2^52``; returns (R, M) residues."""
    if matrix.shape[1] > 1024 or np.abs(matrix).max(initial=0) >= 2 ** 36:
        raise ValueError("matrix too large for an exact product")
    res_limbs = -(-int(q - 1).bit_length() // _RES_LIMB)
    xs = _limbs(np.ascontiguousarray(x, np.uint64), _RES_LIMB, res_limbs)
    m = np.asarray(matrix, np.int64)
    low = (m & ((1 << _MAT_LIMB) - 1)).astype(np.float64)  # in [0, 2^16)
    high = (m >> _MAT_LIMB).astype(np.float64)  # signed, |high| <= 2^20
    acc = np.zeros((m.shape[0], x.shape[1]), np.uint64)
    for mi, mat in enumerate((low, high)):
        for xi, limb in enumerate(xs):
            part = np.rint(mat @ limb).astype(np.int64)  # exact: |part| < 2^20 * 2^17 * 2^10
            residue = np.mod(part, np.int64(q)).astype(np.uint64)
            shift = _MAT_LIMB * mi + _RES_LIMB * xi
            if shift:
                residue = _mulmod_scalar(residue, pow(2, shift, q), q)
            total = acc + residue
            acc = np.where(total >= np.uint64(q), total - np.uint64(q), total)
    return acc


def linear_map(cts: np.ndarray, matrix: np.ndarray, moduli: tuple[int, ...]) -> np.ndarray:
    """``out[i] = sum_j matrix[i, j] * cts[j]`` for ciphertexts (D, 2, levels, N)."""
    dim, _, levels, n = cts.shape
    out = np.empty((matrix.shape[0], 2, levels, n), np.uint64)
    for level, q in enumerate(moduli[:levels]):
        x = np.ascontiguousarray(cts[:, :, level, :]).reshape(dim, 2 * n)
        out[:, :, level, :] = matmul_mod(matrix, x, q).reshape(matrix.shape[0], 2, n)
    return out


def rescale(cts: np.ndarray, moduli: tuple[int, ...]) -> np.ndarray:
    """Divide by the last prime and drop it (CKKS rescale), (..., 2, 2, N) -> (..., 2, 1, N).

    In RNS: ``c' = (c_0 - [c_1]) * q_1^-1 mod q_0`` with ``[c_1]`` the centred residue mod
    the dropped prime: the plaintext is divided by q_1 with a rounding error of a few units.
    """
    q0, q1 = moduli[0], moduli[1]
    low = cts[..., 0, :]
    top = poly.centered(cts[..., 1, :], q1)
    diff = np.mod(low.astype(np.int64) - top, np.int64(q0))  # low < 2^52, |top| < 2^31
    out = _mulmod_scalar(diff.astype(np.uint64), pow(q1, -1, q0), q0)
    return out[..., None, :]
