"""Linear maps across a block's ciphertexts, the rescale, and re-encryption to two primes."""

from __future__ import annotations

import numpy as np
import pytest

from tests.he.conftest import unit
from vault import he
from vault.decider import Moves, SecretKeys
from vault.gallery import blocks
from vault.he import linear, poly


def test_matmul_mod_is_exact() -> None:
    rng = np.random.default_rng(0)
    for q in (1125899906826241, 1073692673):
        m = rng.integers(-(2 ** 36) + 1, 2 ** 36, (40, 300))
        m[0, :] = 2 ** 36 - 1  # the bound, both signs, against residues q - 1 over D terms
        m[1, :] = -(2 ** 36) + 1
        x = rng.integers(0, q, (300, 17), dtype=np.uint64)
        x[:, 0] = q - 1
        got = linear.matmul_mod(m, x, q)
        for i in (0, 1, 7, 39):
            for k in (0, 5, 16):
                assert int(got[i, k]) == sum(int(a) * int(b) for a, b in zip(m[i], x[:, k])) % q
    with pytest.raises(ValueError, match="too large"):
        linear.matmul_mod(np.full((1, 3), 2 ** 36), np.ones((3, 1), np.uint64), 1073692673)


def test_rotating_and_rescaling_a_block_rotates_its_templates(public, secret) -> None:
    """Encrypt templates under both primes, apply round(R * q1) and rescale: decrypting
    gives R @ t at the original scale, within the noise of one rounding (about 1e-4 at
    2^17; the matrix's own rounding adds 2^-31)."""
    rng = np.random.default_rng(1)
    dim, n = 32, public.n
    moduli = public.moduli
    templates = unit(rng, 50, dim)
    rot, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    plain = blocks.dimension_major_plaintexts(templates, 0, n, public.params.template_scale, moduli)
    cts = blocks.encrypt_plaintexts(public, plain)  # (D, 2, 2, N): both primes
    mapped = linear.linear_map(cts, np.rint(rot * moduli[1]).astype(np.int64), moduli)
    down = linear.rescale(mapped, moduli)
    assert down.shape == (dim, 2, 1, n)
    values = np.stack([poly.centered(secret.decrypt(ct, False)[0], moduli[0]) for ct in down])
    got = values[:, :50].T / public.params.template_scale
    sigma = he.params.budget(public.params, reencryptions=1)["noise_sigma_units"]
    assert np.abs(got - templates @ rot.T).max() < 6 * sigma / public.params.template_scale
    assert np.abs(values[:, 50:]).max() < 6 * sigma  # empty slots: noise only


def test_reencryption_lifts_a_score_prime_ciphertext_to_both_primes_under_a_new_key(
        public, secret, keypair) -> None:
    rng = np.random.default_rng(2)
    moduli = public.moduli
    margin = public.params.lift_margin
    values = rng.integers(-2 ** 17, 2 ** 17, public.n)
    ct = blocks.encrypt_plaintexts(public, poly.residues(values, moduli[:1])[None])  # score prime
    old = SecretKeys()
    old.load("c", 1, keypair[0], he.DEFAULT_PARAMS)
    new_secret, new_public_bytes = he.generate(he.DEFAULT_PARAMS)
    new_public = he.PublicContext(new_public_bytes, he.DEFAULT_PARAMS)
    mask = poly.uniform_interior((1, public.n), moduli[0], margin)
    masked = ct.copy()
    masked[0, 0, 0] = poly.add(ct[0, 0], mask, moduli[:1])[0]
    ident = np.arange(public.n)
    fresh = old.reencrypt("c", 1, masked, False, Moves(1, ident * 0, ident, ident * 0, ident),
                          lambda p: blocks.encrypt_plaintexts(new_public, p), lift_to=moduli)
    assert fresh.shape == (1, 2, 2, public.n)
    fresh[0, 0] = poly.sub(fresh[0, 0], poly.residues(mask[0].astype(np.int64), moduli), moduli)
    new = he.SecretContext(new_secret, he.DEFAULT_PARAMS).decrypt(fresh[0], False)
    for level, q in enumerate(moduli):
        assert np.abs(poly.centered(new[level], q) - values).max() < 2 ** 9
    # Under the old key it means nothing.
    stale = poly.centered(secret.decrypt(np.ascontiguousarray(fresh[0][:, :1]), False)[0], moduli[0])
    assert np.abs(stale - values).mean() > 2 ** 28


def test_interior_masks_stay_off_the_edges() -> None:
    q, margin = 1125899906826241, 2 ** 28
    r = poly.uniform_interior((100_000,), q, margin).astype(np.float64)
    assert r.min() >= margin and r.max() < q - margin
    assert abs(r.mean() / q - 0.5) < 0.01
