"""CKKS parameters and contexts (TenSEAL), shared by the gallery and the decider.

Layout: dimension-major blocks. Ciphertext ``j`` of a block holds dimension ``j`` of up to
``slots`` templates, so a score is ``sum_j probe[j] * ct_j``: scalar multiply-adds, no
rotations, hence no Galois keys and no relinearisation at all.

Parameters: N = 4096, coefficient modulus 60 + 49 bits (109 bits, the 128-bit-security
bound of the HE standard for N = 4096; the 49-bit prime is SEAL's key-switching prime,
unused here), templates and probe scalars both encoded at scale 2^29 and never rescaled:
a score sits at scale 2^58 below the 60-bit data prime. One data prime keeps a ciphertext
at about 64 KB for 2,048 templates, about 32 bytes per template and dimension.

Noise: every enrollment into a block adds a fresh encryption of zero to each of its
ciphertexts (see :mod:`vault.gallery`), so the error of a block's scores grows with the
square root of the number of updates it received. Measured: about 1e-5 for a fresh block,
at most 4.6e-4 after 2,048 single-template updates (a full block). The scale is as large
as one 60-bit prime allows precisely to keep that bound under the 1e-3 score contract.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import tenseal as ts


@dataclass(frozen=True)
class HeParams:
    """CKKS parameters of one collection key version (stored with it)."""

    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 29

    @property
    def slots(self) -> int:
        """Templates per block."""
        return self.poly_modulus_degree // 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeParams:
        raw = json.loads(text)
        raw["coeff_mod_bit_sizes"] = tuple(raw["coeff_mod_bit_sizes"])
        return cls(**raw)


DEFAULT_PARAMS = HeParams()


def _configure(ctx: ts.Context, params: HeParams) -> ts.Context:
    ctx.global_scale = 2.0 ** params.scale_bits
    ctx.auto_rescale = False  # see module docstring: scores stay at scale^2
    ctx.auto_relin = False
    ctx.auto_mod_switch = False
    return ctx


def generate(params: HeParams = DEFAULT_PARAMS) -> tuple[bytes, bytes]:
    """A fresh key pair: (secret context bytes, public context bytes)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
    )
    _configure(ctx, params)
    secret = ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    ctx.make_context_public()
    public = ctx.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return secret, public


def load_public(data: bytes, params: HeParams) -> ts.Context:
    """The matcher's context. Refuses bytes that carry a secret key."""
    ctx = ts.context_from(data)
    if ctx.has_secret_key() or ctx.is_private():
        raise ValueError("a public context must not hold the secret key")
    return _configure(ctx, params)


def load_secret(data: bytes, params: HeParams) -> ts.Context:
    """The decider's context."""
    ctx = ts.context_from(data)
    if not ctx.has_secret_key():
        raise ValueError("secret context holds no secret key")
    return _configure(ctx, params)
