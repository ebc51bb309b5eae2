"""Key pairs, the two contexts, and the raw SEAL access they rest on."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from vault import he
from vault.he import _seal, poly


def test_the_public_context_holds_no_secret_key(keypair) -> None:
    secret_bytes, public_bytes = keypair
    assert not ts.context_from(public_bytes).has_secret_key()
    assert not he.PublicContext(public_bytes, he.DEFAULT_PARAMS).has_secret_key()
    with pytest.raises(ValueError, match="must not hold the secret key"):
        he.PublicContext(secret_bytes, he.DEFAULT_PARAMS)
    with pytest.raises(ValueError, match="no secret key"):
        he.SecretContext(public_bytes, he.DEFAULT_PARAMS)


def test_stored_parameters_must_match_the_context(keypair) -> None:
    other = he.HeParams(coeff_mod_bit_sizes=(50, 31, 28))
    with pytest.raises(ValueError, match="does not match"):
        he.PublicContext(keypair[1], other)


@pytest.mark.parametrize("bits, scales, message", [
    ((60, 49), (27, 20), "at most 52 bits"),
    ((50, 30, 29), (28, 21), "do not fit"),
    ((50,), (27, 20), "special prime"),
])
def test_parameters_are_checked(bits, scales, message) -> None:
    with pytest.raises(ValueError, match=message):
        he.HeParams(coeff_mod_bit_sizes=bits, template_scale_bits=scales[0],
                    probe_scale_bits=scales[1])


def test_raw_view_agrees_with_seal_accessors(public: he.PublicContext) -> None:
    ct = ts.sealapi.Ciphertext(public._seal)
    public._encryptor.encrypt_zero(ct)
    view = _seal.ciphertext_array(ct)
    assert view.shape == (2, public.params.levels, public.n)
    flat = view.reshape(-1)
    for i in (0, 1, 4097, flat.size - 1):
        assert int(flat[i]) == ct[i]
    assert all(int(v) < q for v, q in zip(view[0, :, 0], public.moduli))


def test_ntt_round_trip(public: he.PublicContext) -> None:
    rng = np.random.default_rng(1)
    poly_ = poly.residues(rng.integers(-2 ** 40, 2 ** 40, public.n), public.moduli)
    there = public.to_ntt(poly_)
    assert not np.array_equal(there, poly_)
    assert np.array_equal(public.from_ntt(there), poly_)


def test_fresh_encryption_noise_is_small_and_decrypts_at_both_levels(public, secret) -> None:
    """A fresh public-key encryption has noise of a few dozen units (SEAL divides it by
    the special prime); dropping the rotation prime leaves a valid ciphertext mod the
    score prime."""
    rng = np.random.default_rng(2)
    m = rng.integers(-2 ** 30, 2 ** 30, public.n)  # below q0/2 (a 32-bit prime)
    ct = public.ciphertext_from_ntt(public.encrypt_zero())
    ct[0] = poly.add(ct[0], poly.residues(m, public.moduli), public.moduli)
    top = secret.decrypt(ct, ntt=False)
    base = secret.decrypt(np.ascontiguousarray(ct[:, :1]), ntt=False)
    for plain in (top, base):
        noise = poly.centered(plain[0], public.moduli[0]) - m
        assert 0 < np.abs(noise).max() < 2 ** 8
    assert np.array_equal(top[0], base[0])
    exact = poly.centered(top[0], public.moduli[0])  # m + noise, as an integer
    assert np.array_equal(top[1], poly.residues(exact, public.moduli[1:])[0])


def test_uniform_masks_cover_the_range(public) -> None:
    q = public.moduli[0]
    r = poly.uniform((200_000,), (q,))[0].astype(np.float64) / q
    assert r.max() < 1.0 and r.min() >= 0.0
    assert abs(r.mean() - 0.5) < 0.005 and abs(r.var() - 1 / 12) < 0.002


def test_decrypting_a_few_positions_equals_seal_decryption(public, secret) -> None:
    """SecretContext.decrypt_at (a 1:1's path) against SEAL's whole decryption, bit for bit:
    uniform residues up to q0 - 1 (the accumulators' extremes), a fresh encryption of
    known values, and the first and last coefficients (the negacyclic wrap)."""
    rng = np.random.default_rng(3)
    q, n = public.moduli[0], public.n
    positions = np.array([0, 1, 17, n // 2, n - 2, n - 1])
    uniform = rng.integers(0, q, (2, 1, n), dtype=np.uint64)
    extreme = np.full((2, 1, n), q - 1, np.uint64)
    values = rng.integers(-(2 ** 20), 2 ** 20, n)
    plain = (values % q).astype(np.uint64)[None, None, :]
    from vault.gallery import blocks
    fresh = blocks.encrypt_plaintexts(public, plain)[0][:, :1]
    for ct in (uniform, extreme, np.ascontiguousarray(fresh)):
        whole = secret.decrypt(ct, False)[0]
        assert np.array_equal(secret.decrypt_at(ct, False, positions), whole[positions])
    got = poly.centered(secret.decrypt_at(np.ascontiguousarray(fresh), False, positions), q)
    assert np.abs(got - values[positions]).max() < 2 ** 12  # the values, plus fresh noise
    secret.wipe()  # the copy of s goes; the next call makes it again
    assert np.array_equal(secret.decrypt_at(uniform, False, positions),
                          secret.decrypt(uniform, False)[0][positions])


def test_the_50_bit_layout_is_decrypted_whole_where_int64_could_overflow() -> None:
    """q * N above 2^62 (the legacy 50-bit prime): decrypt_at falls back to SEAL, same values."""
    from vault.he.params import LEGACY_PARAMS
    secret_bytes, _ = he.generate(LEGACY_PARAMS)
    legacy = he.SecretContext(secret_bytes, LEGACY_PARAMS)
    q, n = legacy.public.moduli[0], legacy.public.n
    assert not legacy.direct_decryption and q.bit_length() + n.bit_length() > 62
    ct = np.random.default_rng(4).integers(0, q, (2, 1, n), dtype=np.uint64)
    positions = np.array([0, 5, n - 1])
    assert np.array_equal(legacy.decrypt_at(ct, False, positions), legacy.decrypt(ct, False)[0][positions])
