"""The scoring kernels: exact against Python integers, and end to end against numpy and
TenSEAL's own CKKS dot products on the same templates."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from tests.he.conftest import unit
from vault.gallery import blocks
from vault.he import kernels, poly
from vault.he.params import budget

PRIMES = [1125899906826241, (1 << 52) - 47, 1073692673, 536813569]
SCORE_PRIME = 4294828033  # SEAL's 32-bit prime for N = 4096, the default score prime


@pytest.mark.parametrize("q", PRIMES)
def test_mulmod_is_exact(q: int) -> None:
    rng = np.random.default_rng(q % 1000)
    a = rng.integers(0, q, 4000, dtype=np.uint64)
    b = rng.integers(0, q, 4000, dtype=np.uint64)
    a[:3], b[:3] = q - 1, q - 1  # the largest residues
    out = np.empty_like(a)
    kernels.mulmod(a, b, q, out)
    assert [int(x) for x in out] == [int(x) * int(y) % q for x, y in zip(a, b)]


@pytest.mark.parametrize("q", PRIMES)
def test_score_block_is_exact(q: int) -> None:
    rng = np.random.default_rng(7)
    d, n = 1024, 64  # the largest dimension: accumulators closest to overflow
    block = rng.integers(0, q, (d, 2, n), dtype=np.uint64)
    block[:, :, 0] = q - 1
    scalars = rng.integers(-(1 << 21), (1 << 21) + 1, d).astype(np.int64)
    scalars[:4] = [1 << 21, -(1 << 21), 0, 1]
    out = np.empty((2, n), np.uint64)
    kernels.score_block(block, scalars, q, out)
    for k in range(2):
        for i in range(n):
            assert int(out[k, i]) == sum(int(s) * int(c) for s, c in zip(scalars, block[:, k, i])) % q


@pytest.mark.parametrize("q", [SCORE_PRIME, (1 << 32) - 5, 1073692673])
def test_score_block32_is_exact(q: int) -> None:
    """Known answers against Python integers at the accumulators' limits: D = 1024,
    residues q - 1, probe scalars +-2^20 (the largest the parameters allow)."""
    rng = np.random.default_rng(8)
    d, n = 1024, 64
    block = rng.integers(0, q, (d, 2, n), dtype=np.uint64).astype(np.uint32)
    block[:, :, 0] = q - 1
    scalars = rng.integers(-(1 << 20), (1 << 20) + 1, d).astype(np.int64)
    scalars[:4] = [1 << 20, -(1 << 20), 0, 1]
    scalars_max = np.full(d, 1 << 20, np.int64)  # every term at its largest, one sign
    for digits in (scalars[None], scalars_max[None], np.stack([scalars, -scalars_max]),
                   np.stack([scalars, scalars_max, -scalars])):
        out = np.empty((len(digits), 2, n), np.uint64)
        kernels.score_block32(block, digits, q, out)
        for s, got in zip(digits, out):
            for k in range(2):
                for i in range(n):
                    assert int(got[k, i]) == sum(int(a) * int(c) for a, c in zip(s, block[:, k, i])) % q


def test_blocks_are_held_and_scored_as_uint32(public) -> None:
    """The default score prime is below 2^32: a block is held as uint32 (8 bytes per
    template-dimension) and scored by the 32-bit kernel, with the 64-bit kernel's answer."""
    q = public.moduli[0]
    assert q < 2 ** 32
    rng = np.random.default_rng(9)
    residues = rng.integers(0, q, (64, 2, public.n), dtype=np.uint64)
    held = blocks.held(residues, q)
    assert held.dtype == np.uint32 and held.nbytes == 64 * public.n * 8
    scalars = poly.probe_digits(unit(rng, 1, 64)[0], 10, 6)
    block = blocks.Block(0, 1, 1, public.n, 1, held, b"", np.zeros(public.n, np.int32))
    wide = blocks.Block(0, 1, 1, public.n, 1, residues, b"", np.zeros(public.n, np.int32))
    assert np.array_equal(blocks.score(block, scalars, q), blocks.score(wide, scalars, q))
    assert blocks.score(block, scalars, q).shape == (2, 2, 1, public.n)


def test_encrypted_block_scores_agree_with_numpy_and_tenseal(public, secret) -> None:
    """One full block (4,096 templates) scored by our kernel, by numpy in plaintext, and by
    TenSEAL's CKKS (slot encoding, its own dot products): ours within the budget's six
    standard deviations (vault/he/params.py), and its error's spread as the budget says."""
    rng = np.random.default_rng(11)
    d, n = 64, public.n
    templates = unit(rng, n, d)
    probes = unit(rng, 3, d)
    params = public.params
    plain = blocks.dimension_major_plaintexts(templates, 0, n, params.template_scale, public.moduli)
    cts = blocks.encrypt_plaintexts(public, plain)
    block = blocks.Block(0, 1, 1, n, cts.shape[2], blocks.held(cts[:, :, 0, :], public.moduli[0]),
                         b"", np.zeros(n, np.int32))
    expected = budget(params)
    tctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=16384,
                      coeff_mod_bit_sizes=[60, 40, 40, 60])
    tctx.global_scale = 2.0 ** 40
    tenseal_cols = [ts.ckks_vector(tctx, templates[:, j].tolist()) for j in range(d)]
    q = public.moduli[0]
    for probe in probes:
        digits = poly.probe_digits(probe, params.probe_scale_bits, params.probe_low_bits)
        assert digits.shape == (2, d)  # the default parameters: two probe digits
        scores = blocks.score(block, digits, q)
        ours = poly.combine_digits([secret.decrypt(ct, ntt=False)[0] for ct in scores], q,
                                   params.probe_low_bits) / (params.template_scale * params.probe_scale)
        acc = tenseal_cols[0] * float(probe[0])
        for j in range(1, d):
            acc += tenseal_cols[j] * float(probe[j])
        theirs = np.asarray(acc.decrypt()[:n])
        truth = templates @ probe
        assert np.abs(ours - truth).max() < expected["bound_6_sigma"]
        assert 0.7 * expected["total"] < (ours - truth).std() < 1.3 * expected["total"]
        assert np.abs(theirs - truth).max() < 2e-5
        assert np.abs(ours - theirs).max() < expected["bound_6_sigma"] + 2e-5


def _pool():  # the scoring threads, as the gallery passes them
    from vault.gallery import _SCORERS
    return _SCORERS.submit


@pytest.mark.parametrize("ranges", [1, 2, 3, 7])
def test_score_at_equals_the_full_kernel_at_the_slots(ranges: int) -> None:
    """Known answers for the 1:1 path: c1 equal to the full kernel's everywhere, c0 equal
    at the wanted slots and zero at every other coefficient, for D split in 1 to 7 ranges
    summed by the caller and the scoring threads, at the accumulators' limits (D = 1024, residues q - 1,
    digits +-2^20 of one sign)."""
    q = SCORE_PRIME
    rng = np.random.default_rng(21 + ranges)
    d, n = 1024, 512
    residues = rng.integers(0, q, (d, 2, n), dtype=np.uint64).astype(np.uint32)
    residues[:, :, 5] = q - 1
    block = blocks.Block(0, 1, 1, n, 1, residues, b"", np.zeros(n, np.int32))
    slots = np.array([0, 5, 77, 300, n - 1], np.int64)
    signed = rng.integers(-(1 << 20), (1 << 20) + 1, d).astype(np.int64)
    for digits in (np.stack([signed, np.full(d, 1 << 20, np.int64)]),  # two digits
                   np.stack([signed, -signed, np.full(d, -(1 << 20), np.int64)]),  # k = 3
                   signed):  # one digit, (D,)
        full = blocks.score(block, digits, q)
        at = blocks.score_at(block, digits, q, slots, ranges, _pool(), 2)
        assert at.shape == full.shape and at.dtype == full.dtype
        full, at = np.atleast_3d(full).reshape(-1, 2, n), np.atleast_3d(at).reshape(-1, 2, n)
        assert np.array_equal(at[:, 1], full[:, 1])
        assert np.array_equal(at[:, 0, slots], full[:, 0, slots])
        others = np.setdiff1d(np.arange(n), slots)
        assert not at[:, 0, others].any()
    # The slot with residues q - 1 against Python integers, for good measure.
    got = blocks.score_at(block, signed, q, slots, ranges, _pool(), 2)
    assert int(got[0, 0, 5]) == sum(int(s) * (q - 1) for s in signed) % q


def test_score_at_decrypts_to_the_full_scores_under_seal(public, secret) -> None:
    """Real ciphertexts: a block's 1:1 score ciphertexts (c0 at the wanted slots only)
    decrypt under SEAL to the full kernel's plaintext at those slots, bit for bit, and so
    to the cosine within the budget; the coefficients nobody declared decrypt to noise
    unrelated to the scores (what the decider never reads)."""
    rng = np.random.default_rng(12)
    d, n = 64, public.n
    params = public.params
    q = public.moduli[0]
    templates = unit(rng, n, d)
    plain = blocks.dimension_major_plaintexts(templates, 0, n, params.template_scale, public.moduli)
    cts = blocks.encrypt_plaintexts(public, plain)
    block = blocks.Block(0, 1, 1, n, cts.shape[2], blocks.held(cts[:, :, 0, :], q),
                         b"", np.zeros(n, np.int32))
    slots = np.array([3, 1000, 4095], np.int64)
    probe = unit(rng, 1, d)[0]
    digits = poly.probe_digits(probe, params.probe_scale_bits, params.probe_low_bits)
    full = [secret.decrypt(ct, ntt=False)[0] for ct in blocks.score(block, digits, q)]
    at = [secret.decrypt(ct, ntt=False)[0] for ct in blocks.score_at(block, digits, q, slots, 2,
                                                                     _pool(), 1)]
    for f, a in zip(full, at):
        assert np.array_equal(f[slots], a[slots])
    scores = poly.combine_digits([a[slots] for a in at], q, params.probe_low_bits) / (
        params.template_scale * params.probe_scale)
    assert np.abs(scores - templates[slots] @ probe).max() < budget(params)["bound_6_sigma"]
    others = np.setdiff1d(np.arange(n), slots)
    assert not np.array_equal(full[0][others], at[0][others])


def test_score_at_does_not_wait_for_busy_scoring_threads() -> None:
    """A 1:1 whose helpers cannot start (every scoring thread busy, as under a 1:N) is
    summed by the calling thread alone, with the same answer: it is never queued."""
    import threading

    from vault.gallery import _SCORERS, _THREADS
    q = SCORE_PRIME
    rng = np.random.default_rng(30)
    d, n = 256, 1024
    block = blocks.Block(0, 1, 1, n, 1, rng.integers(0, q, (d, 2, n), dtype=np.uint64)
                         .astype(np.uint32), b"", np.zeros(n, np.int32))
    digits = rng.integers(-(1 << 10), (1 << 10) + 1, (2, d)).astype(np.int64)
    slots = np.array([1, 2, 1000], np.int64)
    release, started = threading.Event(), threading.Semaphore(0)

    def busy() -> None:
        started.release()
        release.wait()

    blockers = [_SCORERS.submit(busy) for _ in range(_THREADS)]
    try:
        for _ in range(_THREADS):
            started.acquire()
        got = blocks.score_at(block, digits, q, slots, 4, _SCORERS.submit, _THREADS)
    finally:
        release.set()
    for f in blockers:
        f.result()
    full = blocks.score(block, digits, q)
    assert np.array_equal(got[:, 1], full[:, 1])
    assert np.array_equal(got[:, 0, :, slots], full[:, 0, :, slots])
