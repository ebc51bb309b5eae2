"""CKKS parameters of one collection key version (stored with it, as JSON).

**Ring and primes.** N = 4096 with three primes: a 32-bit *score* prime q0 (SEAL picks
4,294,828,033 = 2^32 - 139,263), a 30-bit *rotation* prime q1 and a 29-bit special prime
(SEAL's key level, used only to shrink the noise of fresh encryptions: we never
key-switch). 91 bits in all. Security: the homomorphic encryption standard's table
(HomomorphicEncryption.org, 2018; ternary secret, classical, 128 bits) allows at most
109 bits of modulus for N = 4096; 91 is below that row's bound (SEAL enforces it).

**Coefficient encoding.** A plaintext polynomial's coefficient ``i`` holds a value scaled
by ``2**template_scale_bits``. A ciphertext holds N values (twice what slot encoding
gives), its fresh noise is a dozen units instead of thousands, and moving or erasing a
value is an integer operation on coefficients, which commutes with masking by uniform
values mod q (what the decider's blind re-encryption relies on, see :mod:`vault.decider`).

**Stored layout: 8 bytes per template-dimension.** Stored ciphertexts keep the score prime
only (:attr:`HeParams.stored_levels`): a ciphertext mod q0*q1 whose plaintext is small is
also a valid ciphertext mod q0, so the rotation prime is dropped after encryption. q0 is
below 2^32, so c0 and c1 are stored, held in memory and streamed by the scoring kernel as
uint32: a 512-d template is 4 KiB of residues (16 bytes per dimension with the 50-bit
prime before). The rotation prime is used while a transform rotation runs: a blind
re-encryption under the new key lifts the ciphertexts to both primes, the rotation (a
linear map with integers up to q1 times the ratio of template scales: 2^31 from 2^19 to
2^20) is applied, and a rescale by q1 brings them back down.

**Noise and precision budget** (defaults; ``Dt = 2^20`` template scale, probe in two
digits ``hi`` at ``Dp = 2^10`` and ``lo`` at 2^6 below it (:func:`vault.he.poly.probe_digits`),
t and p unit vectors, scores relative to a cosine of 1; :func:`budget` computes it and
``tests/he/test_budget.py`` checks it against SEAL):

- *Fresh noise*: SEAL encrypts at the special prime's level and divides by it; what is
  left is the rounding ``r0 + r1*s`` (r uniform in [-1/2, 1/2], s ternary with 2N/3
  non-zero coefficients): sigma_f = sqrt((1 + 2N/3) / 12) = 15.1 units per coefficient
  (measured 15.0; the encryption's own error, divided by the 29-bit special prime, adds
  below 0.001).
- *Re-encryptions*: a blind re-encryption decrypts ``m + e + R`` and encrypts it afresh,
  so the old noise stays in the plaintext and a fresh one is added: after r of them
  (a checkpoint 1, with the page's rescale; each compaction of the block 1; each key
  rotation 2: the fresh encryption and the rescale's rounding) sigma = sigma_f sqrt(1 + r).
- *Accumulated over D terms*: a score is ``sum_j s_j (Dt t_j + e_j)``; the noise term
  ``sum_j s_j e_j`` has std ``sigma * |s| = sigma * Dp``, relative ``sigma / Dt``:
  1.4e-5 fresh, 3.2e-5 at r = 4. The probe scale cancels: it sets only the probe's
  quantisation error. The noise floor is the template scale; the 32-bit prime bounds
  ``Dt * Dp``, hence the second digit. (Issue 14 first took ``Dt = 2^19``, a factor 4 of
  margin: 1:N decisions on LFW then agreed with plaintext for 99.89-99.97% of probes over
  six key draws, 99.97-100% at ``2^20``; bench/protection.py.)
- *Quantisation*: the probe, in two digits, to 2^-16: std sqrt(1/12) / 2^16 = 4.4e-6;
  templates rounded to ``Dt``: 2.8e-7.
- *Total*: std 1.5e-5 for a fresh template (3.3e-5 at r = 4, 4.4e-5 at r = 8); six
  standard deviations (9.1e-5 fresh, 2.0e-4 at r = 4) stay far under the release
  precision (2 decimals) and the decision noise (+-0.005).
- *Margin to q0/2*: the high digit's score ``|sum hi_j m_j| <= |hi| |m| <= (Dp +
  sqrt(D)/2) * Dt`` (the digit's rounding, D <= 1024) + noise = 2^30 (1 + 2^-6); the low digit's ``|sum lo_j m_j| <= 2^(6-1) * Dt * sqrt(D)``
  (Cauchy-Schwarz, D <= 1024) = 2^30. Against q0/2 = 2^31 - 69,632 (SEAL's prime): a
  factor of 1.97. The score prime is the largest NTT prime of its size SEAL finds below 2^32,
  so the margins are computed for a floor within 2^-12 of 2^bits
  (:func:`score_prime_floor`) and checked again on the actual one when a context is made
  (:func:`check_margin`). The decider centres each residue in (-q0/2, q0/2] and adds
  ``hi + lo / 2^6``.
- *Kernel accumulators*: ``|hi_j| <= 2^10``, ``|lo_j| <= 2^5``, residues below 2^32, D <=
  1024 terms: sums below 2^52, exact in int64 (``score_block32``, both digits in one pass
  over the residues).
- *Rotation's lift*: the decider sees ``m + R`` with R uniform in [M, q0 - M),
  M = :attr:`HeParams.lift_margin` = Dt + 2^12 (above any plaintext coefficient): within
  statistical distance 2M/q0 = 2^-11 per coefficient of uniform (2^-21 with the 50-bit
  prime): the price of the larger template scale, paid once per coefficient and rotation,
  to the decider only. Checkpoints and compaction stay at one prime and use masks
  exactly uniform mod q0.

Older key versions (50-bit score prime, scales 2^27 and 2^20, 16 bytes per
template-dimension) load and match as stored: their parameters are stored with them and
the 64-bit kernel stays. A key rotation moves a collection to the current defaults
(:mod:`vault.ops.rotation` rescales between the two template scales).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

# The 64-bit scoring kernel splits residues in two 26-bit halves and accumulates signed
# products with probe scalars in int64: this bounds the score prime, the dimension and the
# probe scale. The 32-bit kernel multiplies whole residues (below 2^32).
MAX_SCORE_PRIME_BITS = 52
UINT32_PRIME_BITS = 32
MAX_DIMENSION = 1024
# Bound used for the accumulated noise of a stored ciphertext (units of the template scale
# grid): far above six standard deviations after hundreds of re-encryptions.
NOISE_BOUND_BITS = 12
# A score prime of b bits is at least (1 - 2^-SCORE_PRIME_GAP_BITS) * 2^b: SEAL takes the
# largest primes = 1 mod 2N below 2^b (2^32 - 139,263 for b = 32, N = 4096). The margins
# are computed for that floor and checked on the actual prime (check_margin).
SCORE_PRIME_GAP_BITS = 12
# What the largest score coefficient must stay under q0/2 by.
MIN_MARGIN = 1.9


@dataclass(frozen=True)
class HeParams:
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (32, 30, 29)
    template_scale_bits: int = 20
    probe_scale_bits: int = 10
    probe_low_bits: int = 6  # a second probe digit (0: none, as before issue 14)

    def __post_init__(self) -> None:
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2:
            raise ValueError("need at least a score prime and a special prime")
        if bits[0] > MAX_SCORE_PRIME_BITS:
            raise ValueError(f"the score prime must have at most {MAX_SCORE_PRIME_BITS} bits")
        # Scores up to 1 plus sign, and the low digit's score (|lo| <= 2^(low-1) per term,
        # sum_j |lo_j t_j| <= 2^(low-1) * sqrt(D), Cauchy-Schwarz, |t| = 1), a factor
        # MIN_MARGIN under q0/2 (see the module docstring).
        half_q = score_prime_floor(bits[0]) / 2
        if _high_score_bound(self) * MIN_MARGIN > half_q:
            raise ValueError("template and probe scales do not fit under the score prime")
        if self.probe_low_bits and _low_score_bound(self) * MIN_MARGIN > half_q:
            raise ValueError("the probe's low digit does not fit under the score prime")
        # Kernel accumulators: |s| * q * D below 2^63 (the 64-bit kernel: 2^21 * 2^26 * D).
        limit = 21 if bits[0] > UINT32_PRIME_BITS else 63 - UINT32_PRIME_BITS - 10 - 1
        if max(self.probe_scale_bits, self.probe_low_bits) > limit:
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

    @property
    def lift_margin(self) -> int:
        """A bound on every stored plaintext coefficient (|t_j| <= 1 plus noise): masks for a
        lift to more primes stay this far from 0 and q0."""
        return (1 << self.template_scale_bits) + (1 << NOISE_BOUND_BITS)

    def page_slots(self, dimension: int) -> int:
        """Templates per journal page (template-major, ``dimension`` coefficients each)."""
        return self.poly_modulus_degree // dimension

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HeParams:
        raw = json.loads(text)
        raw["coeff_mod_bit_sizes"] = tuple(raw["coeff_mod_bit_sizes"])
        raw.setdefault("probe_low_bits", 0)  # stored before issue 14: one digit
        return cls(**raw)


def fresh_noise_sigma(n: int) -> float:
    """Std of a fresh encryption's noise per coefficient: the rounding ``r0 + r1*s`` left
    when SEAL divides by the special prime (s ternary, 2n/3 non-zero coefficients)."""
    return math.sqrt((1 + 2 * n / 3) / 12)


def budget(params: HeParams, reencryptions: int = 0, q0: int | None = None) -> dict[str, float]:
    """The score error budget (relative to a cosine of 1) and the margin to q0/2, for a
    template that went through ``reencryptions`` blind re-encryptions, with score prime
    ``q0`` (default: the floor the parameters assume). See the module docstring; every
    figure is a standard deviation except the bounds."""
    dt, dp = params.template_scale, params.probe_scale
    low = params.probe_low_bits
    sigma = fresh_noise_sigma(params.poly_modulus_degree) * math.sqrt(1 + reencryptions)
    noise = sigma / dt
    probe_q = math.sqrt(1 / 12) / (dp * 2.0 ** low)
    template_q = math.sqrt(1 / 12) / dt
    total = math.sqrt(noise ** 2 + probe_q ** 2 + template_q ** 2)
    largest = _high_score_bound(params) + 6 * sigma * dp
    if low:
        largest = max(largest, _low_score_bound(params))
    prime = float(q0 or score_prime_floor(params.coeff_mod_bit_sizes[0]))
    return {"noise_sigma_units": sigma, "noise": noise, "probe_quantisation": probe_q,
            "template_quantisation": template_q, "total": total, "bound_6_sigma": 6 * total,
            "largest_coefficient": largest, "margin_to_half_q": prime / 2 / largest,
            "lift_statistical_distance": 2 * params.lift_margin / prime}


def score_prime_floor(bits: int) -> int:
    """The least score prime of ``bits`` bits the margins assume (see SCORE_PRIME_GAP_BITS)."""
    return (1 << bits) - (1 << (bits - SCORE_PRIME_GAP_BITS))


def check_margin(params: HeParams, q0: int) -> None:
    """Refuse a context whose actual score prime leaves less than MIN_MARGIN under q0/2."""
    if budget(params, q0=q0)["margin_to_half_q"] < MIN_MARGIN:
        raise ValueError("the score prime is too small for these template and probe scales")


def _high_score_bound(params: HeParams) -> float:
    """|sum_j hi_j m_j| <= |hi| |m| for unit t and p: |hi| <= Dp + sqrt(D) / 2 (the
    rounding of D values, D <= MAX_DIMENSION), |m| about Dt."""
    return (params.template_scale
            * (params.probe_scale + math.sqrt(MAX_DIMENSION) / 2) * (1 + 2.0 ** -10))


def _low_score_bound(params: HeParams) -> float:
    """|sum_j lo_j m_j| <= 2^(low-1) * Dt * sqrt(D) (Cauchy-Schwarz, D <= MAX_DIMENSION)."""
    return (2.0 ** (params.probe_low_bits - 1) * params.template_scale
            * math.sqrt(MAX_DIMENSION) * (1 + 2.0 ** -10))


DEFAULT_PARAMS = HeParams()
# Six standard deviations of a score's CKKS and quantisation error after four blind
# re-encryptions (2.0e-4 for the defaults): the tolerance of tests that compare decisions
# or released scores with plaintext cosine.
SCORE_ERROR_BOUND = budget(DEFAULT_PARAMS, reencryptions=4)["bound_6_sigma"]
# The parameters of key versions written before issue 14 (16 bytes per template-dimension).
LEGACY_PARAMS = HeParams(coeff_mod_bit_sizes=(50, 30, 29), template_scale_bits=27,
                         probe_scale_bits=20, probe_low_bits=0)
