"""The one blind re-encryption recipe, known answers against real TenSEAL ciphertexts:
moved coefficients arrive, erased ones leave nothing, the decider sees only masked values."""

from __future__ import annotations

import numpy as np
import pytest

from vault import he
from vault.crypto.reencrypt import blind_reencrypt
from vault.decider import Moves, SecretKeys
from vault.gallery import blocks
from vault.he import poly

NOISE = 2 ** 9  # fresh encryption noise plus the carried noise, in plaintext units


class _Decider:
    """The decider's re-encryption as the recipe calls it (vault.decider.Decider's
    signature), over the real secret keys; ``seen`` records what it handed to encryption."""

    def __init__(self, keys: SecretKeys, public) -> None:
        self.keys, self.public, self.seen = keys, public, []

    def _encrypt(self, plain: np.ndarray) -> np.ndarray:
        self.seen.append(plain.copy())
        return blocks.encrypt_plaintexts(self.public, plain)

    def reencrypt(self, collection_id, key_version, masked, ntt, moves, target_version,
                  lift_to=()):
        assert target_version == key_version  # one key pair in these tests
        return self.keys.reencrypt(collection_id, key_version, masked, ntt, moves,
                                   self._encrypt, lift_to)


@pytest.fixture
def decider(keypair, public) -> _Decider:
    keys = SecretKeys()
    keys.load("c", 1, keypair[0], he.DEFAULT_PARAMS)
    return _Decider(keys, public)


def _encrypt(public, values: np.ndarray, levels: int) -> np.ndarray:
    moduli = public.level_moduli(levels)
    return blocks.encrypt_plaintexts(public, np.stack([poly.residues(v, moduli) for v in values]))


def _decrypted(secret, ct: np.ndarray, q: int) -> np.ndarray:
    return poly.centered(secret.decrypt(ct, False)[0], q)


@pytest.mark.parametrize("ntt", [False, True])
def test_moved_values_arrive_and_erased_ones_leave_nothing(public, secret, decider, ntt) -> None:
    rng = np.random.default_rng(3)
    moduli = public.moduli
    values = rng.integers(-2 ** 30, 2 ** 30, (3, public.n))
    cts = _encrypt(public, values, len(moduli))
    given = public.many_to_ntt(cts.reshape(-1, len(moduli), public.n)).reshape(cts.shape) \
        if ntt else cts.copy()
    before = given.copy()
    # Target 0 gets ct0[10] at 3 and ct2[20] at 4; target 1 gets ct1[7] at 7 (kept in place);
    # everything else (ct2 but one value, say, an erased template) is left out.
    moves = Moves(2, np.array([0, 2, 1]), np.array([10, 20, 7]), np.array([0, 0, 1]),
                  np.array([3, 4, 7]))
    fresh = blind_reencrypt(decider, public, "c", 1, given, ntt, moves, 1)
    seen = decider.seen
    assert np.array_equal(given, before)  # the caller's ciphertexts are not modified
    assert fresh.shape == (2, 2, len(moduli), public.n)
    # The decider handed masked values to encryption, never the values themselves.
    assert seen[0][0, 0, 3] != values[0, 10] % moduli[0]
    assert seen[0][1, 0, 7] != values[1, 7] % moduli[0]
    expected = np.zeros((2, public.n), np.int64)
    expected[0, [3, 4]] = values[0, 10], values[2, 20]
    expected[1, 7] = values[1, 7]
    for t in range(2):
        got = _decrypted(secret, fresh[t], moduli[0])
        assert np.abs(got - expected[t]).max() < NOISE  # and zeros (noise) everywhere else


def test_lifted_to_more_primes_for_a_key_rotation(public, secret, decider) -> None:
    """One prime in, the whole chain out: each value is reduced mod every prime."""
    rng = np.random.default_rng(4)
    moduli = public.moduli
    values = rng.integers(-2 ** 28, 2 ** 28, (2, public.n))
    cts = _encrypt(public, values, 1)
    every = np.arange(public.n)
    moves = Moves(2, np.repeat([0, 1], public.n), np.tile(every, 2), np.repeat([0, 1], public.n),
                  np.tile(every, 2))
    fresh = blind_reencrypt(decider, public, "c", 1, cts, False, moves, 1,
                            lift_to=moduli, margin=2 ** 29)
    assert fresh.shape == (2, 2, len(moduli), public.n)
    for t in range(2):
        plain = secret.decrypt(fresh[t], False)
        for level, q in enumerate(moduli):
            assert np.abs(poly.centered(plain[level], q) - values[t]).max() < NOISE
    with pytest.raises(ValueError, match="score prime alone"):
        blind_reencrypt(decider, public, "c", 1, _encrypt(public, values, 2), False, moves, 1,
                        lift_to=moduli, margin=2 ** 29)
