"""CKKS parameters of one collection key version (stored with it, as JSON).

Ring N = 4096 with three primes: a 50-bit *score* prime, a 30-bit *rotation* prime and a
29-bit special prime (SEAL's key level, used only to shrink the noise of fresh
encryptions: we never key-switch). 109 bits in all, the 128-bit-security bound of the
homomorphic encryption standard for N = 4096 (SEAL enforces it).

Encoding is by coefficient, not by slot: a plaintext polynomial's coefficient ``i``
holds a value scaled by ``2**template_scale_bits``. A ciphertext therefore holds N values
(twice what slot encoding gives), its fresh noise is a few dozen units instead of a few
thousand, and moving or erasing a value is an integer operation on coefficients, which
commutes with masking by uniform values mod q (what the decider's blind re-encryption
relies on, see :mod:`vault.decider`).

Scores are plaintext-scalar multiply-adds of template ciphertexts with the probe scaled
by ``2**probe_scale_bits``: a score sits at scale 2^(27+20) = 2^47 under the 50-bit prime,
with room for the values up to 2 that a journal page's product holds.

Stored ciphertexts keep the score prime only (:attr:`HeParams.stored_levels`): a
ciphertext mod q0*q1 whose plaintext is small is also a valid ciphertext mod q0, so the
rotation prime is dropped after encryption, and 8 bytes per coefficient are stored. The
rotation prime is used while a transform rotation runs: a blind re-encryption under the
new key lifts the ciphertexts to both primes, the rotation (a linear map with 30-bit
integers) is applied, and a rescale by the rotation prime brings them back down.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

# The scoring kernel splits residues in two 26-bit halves and accumulates signed products
# with probe scalars in int64: this bounds the score prime, the dimension and the scale.
MAX_SCORE_PRIME_BITS = 52
MAX_DIMENSION = 1024


@dataclass(frozen=True)
class HeParams:
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (50, 30, 29)
    template_scale_bits: int = 27
    probe_scale_bits: int = 20

    def __post_init__(self) -> None:
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            raise ValueError("need at least a score prime and a special prime")
        if bits[0] > MAX_SCORE_PRIME_BITS:
            raise ValueError(f"the score prime must have at most {MAX_SCORE_PRIME_BITS} bits")
        # Scores up to 2 (journal products) plus sign must fit under the score prime.
        if self.template_scale_bits + self.probe_scale_bits + 2 >= bits[0]:
            raise ValueError("template and probe scales do not fit under the score prime")
        if self.probe_scale_bits > 21:
            raise ValueError("probe scale too large for the scoring kernel's accumulators")

    @property
    def slots(self) -> int:
        """Templates per block (one per coefficient)."""
        return self.poly_modulus_degree

    @property
    def levels(self) -> int:
        """Data primes of a fresh ciphertext (the special prime is not one)."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def stored_levels(self) -> int:
        """Primes of a stored ciphertext: the score prime only."""
        return 1

    @property
    def template_scale(self) -> float:
        return float(2 ** self.template_scale_bits)

    @property
    def probe_scale(self) -> float:
        return float(2 ** self.probe_scale_bits)

    def page_slots(self, dimension: int) -> int:
        """Templates per journal page (template-major, ``dimension`` coefficients each)."""
        return self.poly_modulus_degree // dimension

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeParams:
        raw = json.loads(text)
        raw["coeff_mod_bit_sizes"] = tuple(raw["coeff_mod_bit_sizes"])
        return cls(**raw)


DEFAULT_PARAMS = HeParams()
