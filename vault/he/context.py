"""CKKS key pairs (TenSEAL/SEAL) and the two views of them the vault uses.

- :class:`PublicContext`: the matcher's. Public key only (it refuses bytes that carry a
  secret key). Encrypts zeros and moves polynomials in and out of SEAL's NTT domain.
- :class:`SecretContext`: the decider's. Adds decryption to plaintext coefficients.

Key generation, encryption and decryption are SEAL's; the vault's own code only computes
linear maps of ciphertexts with plaintext integers (:mod:`vault.he.kernels`).
"""

from __future__ import annotations

import numpy as np
import tenseal as ts
from tenseal import sealapi

from vault.he import _seal
from vault.he.params import HeParams, check_margin

# Up to this many positions, decrypt_at computes them alone (a 1:1 names a subject's few
# slots); beyond, one whole decryption is cheaper.
DIRECT_POSITIONS = 32


def generate(params: HeParams) -> tuple[bytes, bytes]:
    """A fresh key pair: (secret context bytes, public context bytes).

    Only the public key and the secret key are kept: no relinearisation or Galois keys,
    since matching needs neither (they would also be 30x larger).
    """
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    secret = ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    ctx.make_context_public()
    public = ctx.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return secret, public


class PublicContext:
    """Encryption and NTT transforms under one collection key version's public key."""

    def __init__(self, public_context: bytes, params: HeParams,
                 _ts_context: ts.Context | None = None) -> None:
        ctx = _ts_context if _ts_context is not None else ts.context_from(public_context)
        if _ts_context is None and (ctx.has_secret_key() or ctx.is_private()):
            raise ValueError("a public context must not hold the secret key")
        self.params = params
        self._ts = ctx  # keeps the SEAL objects below alive
        self._seal = ctx.seal_context().data
        self._encryptor = sealapi.Encryptor(self._seal, ctx.public_key().data)
        self._evaluator = sealapi.Evaluator(self._seal)
        self._parms_ids: dict[int, list[int]] = {}
        moduli_top: list[int] = []
        data = self._seal.first_context_data()
        while data is not None:
            moduli = [m.value() for m in data.parms().coeff_modulus()]
            self._parms_ids[len(moduli)] = data.parms_id()
            moduli_top = moduli_top or moduli
            data = data.next_context_data()
        if (self._seal.first_context_data().parms().poly_modulus_degree() != params.poly_modulus_degree
                or [q.bit_length() for q in moduli_top] != list(params.coeff_mod_bit_sizes[:-1])):
            raise ValueError("the context does not match its stored parameters")
        self.moduli: tuple[int, ...] = tuple(moduli_top)
        check_margin(params, self.moduli[0])
        _seal.self_check(self._seal, self._encryptor)

    @property
    def n(self) -> int:
        return self.params.poly_modulus_degree

    def has_secret_key(self) -> bool:
        return bool(self._ts.has_secret_key())

    def level_moduli(self, levels: int) -> tuple[int, ...]:
        """The primes of a ciphertext that has ``levels`` of them (a prefix of the chain)."""
        return self.moduli[:levels]

    def encrypt_zero(self) -> np.ndarray:
        """A fresh public-key encryption of zero, (2, levels, N), NTT form, top level."""
        ct = sealapi.Ciphertext(self._seal)
        self._encryptor.encrypt_zero(ct)
        return _seal.ciphertext_array(ct).copy()

    def _container(self, data: np.ndarray, ntt: bool) -> sealapi.Ciphertext:
        return _seal.new_ciphertext(self._seal, self._parms_ids[data.shape[1]], data, ntt)

    def ciphertext_to_ntt(self, ct: np.ndarray) -> np.ndarray:
        c = self._container(ct, ntt=False)
        self._evaluator.transform_to_ntt_inplace(c)
        return _seal.ciphertext_array(c).copy()

    def ciphertext_from_ntt(self, ct: np.ndarray) -> np.ndarray:
        c = self._container(ct, ntt=True)
        self._evaluator.transform_from_ntt_inplace(c)
        return _seal.ciphertext_array(c).copy()

    def _one_poly(self, poly: np.ndarray, ntt_in: bool) -> np.ndarray:
        # SEAL refuses to transform a ciphertext whose c1 is zero ("transparent"): c1 is a
        # dummy here and is discarded.
        box = np.zeros((2, *poly.shape), np.uint64)
        box[0] = poly
        box[1, :, 0] = 1
        out = self.ciphertext_from_ntt(box) if ntt_in else self.ciphertext_to_ntt(box)
        first: np.ndarray = out[0]
        return first

    def to_ntt(self, poly: np.ndarray) -> np.ndarray:
        """Coefficient form -> NTT form, one polynomial (levels, N)."""
        return self._one_poly(poly, ntt_in=False)

    def many_to_ntt(self, polys: np.ndarray) -> np.ndarray:
        """Coefficient form -> NTT form for (k, levels, N) polynomials that are not zero
        (uniform masks, say), two per SEAL call."""
        out = np.empty_like(polys)
        for i in range(0, len(polys) - 1, 2):
            out[i:i + 2] = self.ciphertext_to_ntt(polys[i:i + 2])
        if len(polys) % 2:
            out[-1] = self.to_ntt(polys[-1])
        return out

    def from_ntt(self, poly: np.ndarray) -> np.ndarray:
        """NTT form -> coefficient form, one polynomial (levels, N)."""
        return self._one_poly(poly, ntt_in=True)


class SecretContext:
    """Decryption under one collection key version's secret key (the decider's only)."""

    def __init__(self, secret_context: bytes, params: HeParams) -> None:
        ctx = ts.context_from(secret_context)
        if not ctx.has_secret_key():
            raise ValueError("secret context holds no secret key")
        self.public = PublicContext(b"", params, _ts_context=ctx)
        self._decryptor = sealapi.Decryptor(self.public._seal, ctx.secret_key().data)
        _seal.self_check(self.public._seal, self.public._encryptor, self._decryptor)
        self._secret: np.ndarray | None = None  # s at the score prime, coefficients in {-1, 0, 1}

    def decrypt(self, ct: np.ndarray, ntt: bool) -> np.ndarray:
        """The plaintext coefficients (levels, N) of a ciphertext (2, levels, N)."""
        c = self.public._container(ct, ntt)
        if not ntt:
            self.public._evaluator.transform_to_ntt_inplace(c)
        plain = sealapi.Plaintext()
        self._decryptor.decrypt(c, plain)
        flat = _seal.plaintext_array(plain)
        return self.public.from_ntt(flat.reshape(ct.shape[1], -1))

    def decrypt_at(self, ct: np.ndarray, ntt: bool, positions: np.ndarray) -> np.ndarray:
        """Coefficients ``positions`` of the plaintext of ``ct`` (2, 1, N) at the score prime,
        equal to ``decrypt(ct, ntt)[0][positions]`` (tests/he/test_context.py). For a few
        positions of a coefficient-form ciphertext (a 1:1: at most DIRECT_POSITIONS) each is
        ``c0[i] + (c1 * s)[i] mod q0``, one negacyclic row of ``s``, without SEAL's
        transforms of whole polynomials; for many (N^2 at every position), in NTT form, or
        where int64 could overflow, SEAL decrypts the whole."""
        q, n = self.public.moduli[0], self.public.n
        pos = np.asarray(positions, np.int64)
        if ntt or pos.size > DIRECT_POSITIONS or not self.direct_decryption:
            whole: np.ndarray = self.decrypt(ct, ntt)[0]
            return whole[pos]
        if self._secret is None:
            unit = np.zeros((2, 1, n), np.uint64)
            unit[1, 0, 0] = 1  # decrypts to c0 + 1 * s = s
            s = self.decrypt(unit, False)[0].astype(np.int64)
            s[s > q // 2] -= q  # centred in place: one copy of s, wiped by wipe()
            self._secret = s
        j = np.arange(n)
        # (c1 * s)[i] = sum_j c1[j] s[i - j], with s[i - j + N] = -s[i - j] where j > i.
        rows = self._secret[(pos[:, None] - j) % n] * np.where(j <= pos[:, None], 1, -1)
        c0, c1 = ct[0, 0].astype(np.int64), ct[1, 0].astype(np.int64)
        out: np.ndarray = ((c0[pos] + rows @ c1) % q).astype(np.uint64)  # |sum| < q * N < 2^62
        rows.fill(0)
        return out

    @property
    def direct_decryption(self) -> bool:
        """Whether :meth:`decrypt_at` computes in int64 (N residues below q summed: q * N
        below 2^62; the 32-bit layout, not the 50-bit one), else it decrypts whole."""
        return self.public.moduli[0].bit_length() + self.public.n.bit_length() <= 62

    def wipe(self) -> None:
        """Zero the coefficient copy of s that :meth:`decrypt_at` keeps (on forget)."""
        if self._secret is not None:
            self._secret.fill(0)
            self._secret = None
