"""Dimension-major blocks: ciphertext ``j`` of a block holds dimension ``j`` of N templates,
template ``i`` in coefficient ``i`` of each plaintext.

Scoring a probe against a block is ``sum_j s_j * ct_j`` with the probe quantised to small
integers ``s_j``: D scalar multiply-adds per coefficient, no rotation, no relinearisation,
and one score ciphertext per N = 4,096 templates, every coefficient of which is a score.
Imports and journal checkpoints write blocks; single enrollments do not (they would
rewrite D ciphertexts each), they go to journal pages (:mod:`vault.gallery.pages`).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vault.he import HeParams, PublicContext, kernels, poly


@dataclass
class Block:
    """One block as matched: its score-prime residues, held in private memory, and who
    owns each slot. The other primes stay in its file (read, and checked against
    ``digest``, by the jobs that rewrite the block)."""

    block_no: int
    kind: int
    generation: int
    fill: int
    levels: int
    residues: np.ndarray = field(repr=False)  # (D, 2, N) mod the score prime, see held()
    digest: bytes = field(repr=False)  # SHA-256 of the block file
    groups: np.ndarray = field(repr=False)  # (N,) int32: subject group of a live slot, else -1
    centroid: np.ndarray | None = field(default=None, repr=False)  # pre-filter sketch


def held_bytes(dimension: int, params: HeParams) -> int:
    """Memory one block takes as held (c0 and c1 at the score prime, in the residue type
    :func:`vault.he.poly.residue_dtype` gives any prime of that many bits)."""
    itemsize = poly.residue_dtype((1 << params.coeff_mod_bit_sizes[0]) - 1).itemsize
    return dimension * 2 * params.slots * itemsize


def dimension_major_plaintexts(templates: np.ndarray, first_slot: int, n: int, scale: float,
                               moduli: tuple[int, ...]) -> np.ndarray:
    """Plaintexts (D, levels, N): polynomial ``j`` holds ``templates[k, j]`` at
    coefficient ``first_slot + k``."""
    count, dimension = templates.shape
    values = np.zeros((dimension, n), np.int64)
    values[:, first_slot:first_slot + count] = poly.quantise(templates.T, scale)
    return np.moveaxis(poly.residues(values, moduli), 0, 1)


def encrypt_plaintexts(ctx: PublicContext, plaintexts: np.ndarray) -> np.ndarray:
    """Fresh encryptions (k, 2, levels, N), coefficient form, of plaintexts (k, levels, N).

    Each is a fresh public-key encryption of zero plus the plaintext: the noise of one
    fresh encryption (a few dozen units against a scale of 2^27).
    """
    levels = plaintexts.shape[1]
    moduli = ctx.level_moduli(levels)
    out = np.empty((plaintexts.shape[0], 2, levels, plaintexts.shape[2]), np.uint64)
    for k in range(plaintexts.shape[0]):
        zero = ctx.ciphertext_from_ntt(ctx.encrypt_zero())[:, :levels]
        out[k, 0] = poly.add(zero[0], plaintexts[k], moduli)
        out[k, 1] = zero[1]
    return out


def split_levels(cts: np.ndarray) -> list[np.ndarray]:
    """(D, 2, levels, N) -> per prime, contiguous (D, 2, N): the layout of block files."""
    return [np.ascontiguousarray(cts[:, :, level, :]) for level in range(cts.shape[2])]


def held(residues: np.ndarray, q: int) -> np.ndarray:
    """Score-prime residues (D, 2, N) as a block holds them for matching: contiguous
    uint32 when ``q < 2^32`` (8 bytes per template-dimension), else uint64."""
    return np.ascontiguousarray(residues, dtype=poly.residue_dtype(q))


def score(block: Block, scalars: np.ndarray, q: int) -> np.ndarray:
    """The score ciphertext (2, 1, N), coefficient form, at the score prime ``q``; for
    probe digits ``scalars`` (k, D) (:func:`vault.he.poly.probe_digits`), one per digit,
    (k, 2, 1, N), from one pass over the block."""
    digits = np.atleast_2d(scalars)
    out = np.empty((digits.shape[0], 2, 1, block.residues.shape[2]), np.uint64)
    if block.residues.dtype == np.uint32:
        kernels.score_block32(block.residues, digits, q, out[:, :, 0, :])
    else:
        for d in range(digits.shape[0]):
            kernels.score_block(block.residues, digits[d], q, out[d, :, 0, :])
    return out[0] if np.ndim(scalars) == 1 else out


def score_at(block: Block, scalars: np.ndarray, q: int, slots: np.ndarray, ranges: int = 1,
             submit: Callable[[Callable[[], None]], Any] | None = None, helpers: int = 0
             ) -> np.ndarray:
    """:func:`score` for a 1:1, whose caller reads only the coefficients ``slots``: c1 in
    full, c0 at ``slots`` and zero elsewhere (half the bytes read). The coefficients at
    ``slots`` decrypt to the same values as :func:`score`'s, bit for bit; the others
    decrypt to nothing anyone reads (the decider reads declared positions only).

    ``ranges``: the dimensions are split in that many ranges, summed apart and added mod
    ``q``. The calling thread works through them, and so do up to ``helpers`` tasks given
    to ``submit`` (the scoring threads: the kernel releases the GIL) once they start: the
    caller never waits for a helper that has not started, so a 1:1 is never queued behind
    the blocks of a 1:N. Blocks held as uint64 (key versions from before issue 14) take
    the full path.
    """
    if block.residues.dtype != np.uint32:
        return score(block, scalars, q)
    digits = np.atleast_2d(scalars)
    count, dim, n = digits.shape[0], block.residues.shape[0], block.residues.shape[2]
    slots = np.ascontiguousarray(slots, np.int64)
    edges = np.linspace(0, dim, max(1, min(ranges, dim)) + 1).astype(int)
    bounds = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    parts: list[tuple[np.ndarray, np.ndarray] | Exception | None] = [None] * len(bounds)
    done = [threading.Event() for _ in bounds]
    taken = itertools.count()  # next() on it is atomic: each range is taken once

    def work() -> None:
        while (i := next(taken)) < len(bounds):
            try:
                acc1 = np.zeros((count, n), np.int64)
                acc0 = np.zeros((count, slots.size), np.int64)
                kernels.accumulate32_at(block.residues, digits, bounds[i][0], bounds[i][1],
                                        slots, acc1, acc0)
                parts[i] = (acc1, acc0)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, which raises it
                parts[i] = exc
            finally:
                done[i].set()

    if submit is not None:
        for _ in range(min(helpers, len(bounds) - 1)):
            submit(work)
    work()
    for event in done:
        event.wait()  # ranges a helper took are being summed now
    sums: list[tuple[np.ndarray, np.ndarray]] = []
    for p in parts:
        if not isinstance(p, tuple):
            raise p if isinstance(p, Exception) else RuntimeError("a range was not scored")
        sums.append(p)
    # Each partial sum is a sum of some of the full sum's terms: their total stays within
    # the full sum's int64 bound (params.py, kernel accumulators).
    acc1 = np.sum([p[0] for p in sums], axis=0)
    acc0 = np.sum([p[1] for p in sums], axis=0)
    out = np.zeros((count, 2, 1, n), np.uint64)
    out[:, 1, 0, :] = np.mod(acc1, q).astype(np.uint64)
    out[:, 0, 0, slots] = np.mod(acc0, q).astype(np.uint64)
    return out[0] if np.ndim(scalars) == 1 else out
