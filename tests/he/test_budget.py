"""The noise and precision budget of vault/he/params.py, checked against SEAL: the fresh
noise it assumes, the margins to q0/2 at the worst-case inputs, the probe digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.he.conftest import unit
from vault import he
from vault.gallery import blocks
from vault.he import poly
from vault.he.params import DEFAULT_PARAMS, LEGACY_PARAMS, budget, check_margin, fresh_noise_sigma


def test_fresh_noise_is_what_the_budget_assumes(public, secret) -> None:
    cts = blocks.encrypt_plaintexts(public, np.zeros((6, 2, public.n), np.uint64))
    q = public.moduli[0]
    noise = np.concatenate([poly.centered(secret.decrypt(np.ascontiguousarray(c[:, :1]), False)[0], q)
                            for c in cts])
    assert abs(noise.std() / fresh_noise_sigma(public.n) - 1) < 0.1
    assert np.abs(noise).max() < 2 ** 12  # the lift margin's noise allowance, far off


def test_the_default_layout_fits_and_its_error_is_below_the_release_precision(public) -> None:
    b = budget(DEFAULT_PARAMS)
    assert public.moduli[0] < 2 ** 32  # uint32 residues
    assert b["largest_coefficient"] < public.moduli[0] / 2 / 1.95  # about 2 with SEAL's prime
    assert budget(DEFAULT_PARAMS, q0=public.moduli[0])["margin_to_half_q"] > 1.95
    assert b["bound_6_sigma"] < 1e-4 and budget(DEFAULT_PARAMS, 8)["bound_6_sigma"] < 3e-4
    assert b["lift_statistical_distance"] < 5e-4  # 2^-11


def test_probe_digits_carry_both_digits_bits() -> None:
    rng = np.random.default_rng(0)
    p = unit(rng, 1, 512)[0]
    digits = poly.probe_digits(p, 10, 6)
    assert np.abs(digits[1]).max() <= 32
    assert np.abs((digits[0] + digits[1] / 64) / 1024 - p).max() <= 2 ** -17
    assert poly.probe_digits(p, 20, 0).shape == (1, 512)


@pytest.mark.parametrize("case", ["aligned_with_low_digit", "identical", "opposite"])
def test_scores_at_the_worst_case_inputs_do_not_wrap(public, secret, case) -> None:
    """The largest score coefficients the budget allows: a template equal (or opposite)
    to the probe (|hi score| = Dt * Dp), and one aligned with the signs of the probe's low
    digit (the low score's Cauchy-Schwarz bound), at D = 1024."""
    rng = np.random.default_rng(1)
    d, params, q = 1024, public.params, public.moduli[0]
    probe = unit(rng, 1, d)[0]
    digits = poly.probe_digits(probe, params.probe_scale_bits, params.probe_low_bits)
    template = {"aligned_with_low_digit": np.where(digits[1] >= 0, 1.0, -1.0) / np.sqrt(d),
                "identical": probe, "opposite": -probe}[case]
    plain = blocks.dimension_major_plaintexts(template[None], 0, public.n, params.template_scale,
                                              public.moduli[:1])
    cts = blocks.encrypt_plaintexts(public, plain)
    block = blocks.Block(0, 1, 1, 1, 1, blocks.held(cts[:, :, 0, :], q), b"",
                         np.zeros(public.n, np.int32))
    parts = [secret.decrypt(ct, False)[0] for ct in blocks.score(block, digits, q)]
    got = poly.combine_digits(parts, q, params.probe_low_bits)[0] / (params.template_scale
                                                                      * params.probe_scale)
    assert abs(got - template @ probe) < budget(params)["bound_6_sigma"]


def test_parameters_refuse_a_low_digit_that_could_wrap() -> None:
    with pytest.raises(ValueError, match="low digit"):
        he.HeParams(template_scale_bits=20, probe_scale_bits=10, probe_low_bits=7)


def test_a_context_whose_actual_score_prime_is_too_small_is_refused(keypair) -> None:
    """The parameters' margins assume SEAL's prime near 2^32; one further below fails."""
    with pytest.raises(ValueError, match="too small"):
        check_margin(DEFAULT_PARAMS, 2 ** 31 + 1)
    check_margin(DEFAULT_PARAMS, he.PublicContext(keypair[1], DEFAULT_PARAMS).moduli[0])


def test_key_versions_stored_before_the_second_digit_keep_one() -> None:
    raw = json.loads(LEGACY_PARAMS.to_json())
    del raw["probe_low_bits"]
    assert he.HeParams.from_json(json.dumps(raw)) == LEGACY_PARAMS
