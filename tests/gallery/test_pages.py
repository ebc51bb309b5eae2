"""Journal pages: single enrollments, scores, and what the decider gets to see."""

from __future__ import annotations

import numpy as np
import pytest

from tests.he.conftest import unit
from vault.gallery import pages
from vault.he import DEFAULT_PARAMS, poly
from vault.he.params import budget

# Six standard deviations of a fresh template's score error (vault/he/params.py): a page
# whose noise grew with its fill (one fresh encryption per enrollment, 32 at 128-d) is
# off by three times that.
TOLERANCE = budget(DEFAULT_PARAMS)["bound_6_sigma"]


def _scores(secret, part, params) -> np.ndarray:
    plains = [secret.decrypt(ct, part.ntt)[0] for ct in (part.data, part.low) if ct is not None]
    return poly.combine_digits(plains, secret.public.moduli[0], params.probe_low_bits) / (
        params.template_scale * params.probe_scale)


def _digits(probe, params) -> np.ndarray:
    return poly.probe_digits(probe, params.probe_scale_bits, params.probe_low_bits)


@pytest.mark.parametrize("dim", [128, 512, 1000])
def test_a_page_filled_one_enrollment_at_a_time_scores_like_numpy(public, secret, dim) -> None:
    rng = np.random.default_rng(dim)
    slots = public.params.page_slots(dim)
    templates = unit(rng, slots, dim)
    ct = None
    for k in range(slots):
        ct = pages.write(public, ct, k, templates[k:k + 1])
    page = pages.Page(0, slots, slots, ct, np.arange(slots, dtype=np.int32))
    for probe in unit(rng, 3, dim):
        (part,) = pages.score(public, [page], _digits(probe, public.params))
        assert list(part.groups) == list(range(slots)) and list(part.slots) == list(range(slots))
        got = _scores(secret, part, public.params)[part.positions]
        assert np.abs(got - templates @ probe).max() < TOLERANCE


def test_only_live_scores_reach_the_decider_the_rest_is_uniform(public, secret) -> None:
    """Without the mask, the other coefficients of a page product are partial correlations
    of the template with the probe (enough to rebuild the template); with it, every
    coefficient but the live scores is uniform mod q."""
    rng = np.random.default_rng(3)
    dim = 128
    slots = public.params.page_slots(dim)
    templates = unit(rng, slots, dim)
    ct = pages.write(public, None, 0, templates)
    groups = np.full(slots, -1, np.int32)
    groups[[1, 5]] = [10, 11]  # two live templates, the others deleted
    page = pages.Page(0, 1, slots, ct, groups)
    probe = unit(rng, 1, dim)[0]
    scalars = _digits(probe, public.params)
    (part,) = pages.score(public, [page], scalars)
    assert part.low is not None  # the low digit's product: masked the same way
    assert list(part.positions) == [1 * dim, 5 * dim] and list(part.groups) == [10, 11]
    plain = secret.decrypt(part.data, part.ntt)[0]
    q = public.moduli[0]
    hidden = np.ones(public.n, bool)
    hidden[part.positions] = False
    r = plain[hidden].astype(np.float64) / q
    assert abs(r.mean() - 0.5) < 0.02 and abs(r.var() - 1 / 12) < 0.01  # uniform
    low = secret.decrypt(part.low, part.ntt)[0]
    r = low[hidden].astype(np.float64) / q
    assert abs(r.mean() - 0.5) < 0.02 and abs(r.var() - 1 / 12) < 0.01  # uniform too
    scores = _scores(secret, part, public.params)[part.positions]
    assert np.abs(scores - templates[[1, 5]] @ probe).max() < TOLERANCE
    # The same product unmasked: small, structured values everywhere (what the mask hides).
    raw = np.empty_like(part.data)
    from vault.he import kernels
    phat = public.to_ntt(poly.residues(poly.negacyclic_reverse(scalars[0], public.n), (q,)))[0]
    held = pages.scored(public, ct)
    kernels.mulmod(held[0, 0], phat, q, raw[0, 0])
    kernels.mulmod(held[1, 0], phat, q, raw[1, 0])
    unmasked = np.abs(poly.centered(secret.decrypt(raw, True)[0], q)).astype(np.float64)
    assert unmasked[hidden].max() < 4 * public.params.template_scale * public.params.probe_scale


def test_pack_round_trip(public) -> None:
    ct = pages.write(public, None, 0, unit(np.random.default_rng(0), 1, 128))
    assert ct.shape == (2, 2, public.n)  # new pages: both primes (see pages.write)
    data = pages.pack(ct, public.moduli)
    assert len(data) == 2 * public.n * (4 + 4)  # both primes below 2^32: uint32
    assert pages.packed_levels(data, public.n, public.moduli) == 2
    assert np.array_equal(pages.unpack(data, 2, public.n, public.moduli), ct)
    one = np.ascontiguousarray(ct[:, :1])  # a one-prime page (written before issue 14)
    assert len(pages.pack(one, public.moduli)) == 2 * public.n * 4
    assert np.array_equal(pages.unpack(pages.pack(one, public.moduli), 1, public.n, public.moduli), one)
    with pytest.raises(ValueError):
        pages.unpack(data[:-8], 2, public.n, public.moduli)


def test_a_full_page_has_fresh_size_noise_not_the_sum_of_its_enrollments(public, secret) -> None:
    """32 enrollments into one 128-d page add 32 fresh noises (std 5.7 sigma_f); the page
    as scored (rescaled by q1) keeps one rounding's noise."""
    rng = np.random.default_rng(5)
    dim, slots = 128, public.params.page_slots(128)
    templates = unit(rng, slots, dim)
    ct = None
    for k in range(slots):
        ct = pages.write(public, ct, k, templates[k:k + 1])
    q = public.moduli[0]
    want = poly.quantise(templates.reshape(-1), public.params.template_scale)
    noise = poly.centered(secret.decrypt(pages.scored(public, ct), True)[0], q) - want
    assert 0 < noise.std() < 1.5 * budget(public.params)["noise_sigma_units"]
