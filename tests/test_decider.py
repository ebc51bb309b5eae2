"""The decider: what it releases, and blind re-encryption."""

from __future__ import annotations

import numpy as np
import pytest

from vault import he
from vault.decider import DECISION_NOISE, MAX_TOP_K, NOISE_BOUND, Moves, ScoreCiphertext, SecretKeys
from vault.gallery import blocks
from vault.he import poly


@pytest.fixture
def decider(keypair) -> SecretKeys:
    d = SecretKeys()
    d.load("c", 1, keypair[0], he.DEFAULT_PARAMS)
    return d


def _score_part(public, values: np.ndarray, positions, groups) -> ScoreCiphertext:
    """A score ciphertext whose plaintext holds ``values`` at scale template*probe."""
    params = public.params
    m = np.zeros(public.n, np.int64)
    m[:len(values)] = np.rint(np.asarray(values) * params.template_scale * params.probe_scale)
    ct = public.ciphertext_from_ntt(public.encrypt_zero())[:, :1]
    ct[0] = poly.add(ct[0], poly.residues(m, public.moduli[:1]), public.moduli[:1])
    positions = np.asarray(positions, np.int64)
    return ScoreCiphertext(np.ascontiguousarray(ct), False, positions,
                           np.asarray(groups, np.int32), positions, 1, 0)


def test_releases_best_per_group_flooded_rounded_and_only_what_was_asked(public, decider) -> None:
    values = np.array([0.10, 0.95, 0.40, 0.97, 0.99, 0.30])
    # Slot 4 (0.99) is not asked for: it must not influence anything.
    part = _score_part(public, values, [0, 1, 2, 3, 5], [7, 7, 8, 9, 9])
    out = decider.decide("c", 1, [part], -1.0, 5, release_scores=True)
    assert [g.group for g in out] == [9, 7, 8]
    for g, truth in zip(out, (0.97, 0.95, 0.40)):
        assert abs(g.score - truth) <= 5e-3 + NOISE_BOUND + 1e-5
        assert g.score == round(g.score, 2)
    assert [(g.tier, g.loc, g.slot) for g in out] == [(1, 0, 3), (1, 0, 1), (1, 0, 2)]
    assert "0.97" not in repr(out[0])
    top = decider.decide("c", 1, [part], 0.9, 1)
    assert [g.group for g in top] == [9]
    assert decider.decide("c", 1, [part], 0.98, 5) == []


def test_a_slot_deleted_while_it_was_scored_is_never_released(public, decider) -> None:
    # Owner -1: deleted between the choice of slots and the decision. Its 0.99 neither
    # comes out (as group -1, which once read as the newest subject) nor hides the next.
    part = _score_part(public, np.array([0.99, 0.95, 0.50]), [0, 1, 2], [-1, 4, 5])
    assert [g.group for g in decider.decide("c", 1, [part], 0.9, 3)] == [4]
    assert [g.group for g in decider.decide("c", 1, [part], -1.0, 1)] == [4]


def test_decisions_only_unless_scores_are_granted_and_top_k_is_capped(public, decider) -> None:
    values = np.linspace(0.5, 0.99, 40)
    part = _score_part(public, values, range(40), range(40))
    out = decider.decide("c", 1, [part], -1.0, 100)
    assert len(out) == MAX_TOP_K == 10
    assert all(g.score is None for g in out)
    assert [g.group for g in out] == list(range(39, 29, -1))


def test_decision_near_the_threshold_cannot_be_bisected_to_the_exact_score(public, decider) -> None:
    """A caller who moves a probe until the decision flips learns the score only to about
    the release precision: within DECISION_NOISE of the threshold the decision is random,
    so no sharp boundary exists to bisect (before: the exact value, to 4e-7)."""
    threshold = 0.8
    accepted = {}
    for offset in (-0.004, -0.001, 0.0, 0.001, 0.004):
        part = _score_part(public, np.array([threshold + offset]), [0], [0])
        accepted[offset] = sum(bool(decider.decide("c", 1, [part], threshold, 1))
                               for _ in range(300)) / 300
    for offset, rate in accepted.items():  # accepted with probability (offset + b) / 2b
        assert abs(rate - (offset + DECISION_NOISE) / (2 * DECISION_NOISE)) < 0.12, accepted
    far = _score_part(public, np.array([threshold - 2 * DECISION_NOISE,
                                        threshold + 2 * DECISION_NOISE]), [0, 1], [0, 1])
    for _ in range(50):  # outside the band the decision is the plaintext one
        assert [g.group for g in decider.decide("c", 1, [far], threshold, 5)] == [1]


def test_accepted_score_floor_does_not_round_a_float32_threshold_up(public, decider) -> None:
    # Regression: a float32 threshold (0.9200000167) must not lift the floor of accepted
    # scores to 0.93; an accepted score is never shown below its threshold.
    part = _score_part(public, np.array([0.9155, 0.5]), [0, 1], [0, 1])
    for _ in range(40):  # accepted now and then (noise): then shown at the floor, 0.92
        out = decider.decide("c", 1, [part], float(np.float32(0.92)), 5, release_scores=True)
        assert out == [] or out[0].score == 0.92
    threshold = float(np.float32(0.92))
    part = _score_part(public, np.array([0.92002, 0.5]), [0, 1], [0, 1])
    for _ in range(40):  # the flooding noise is random: try it several times
        out = decider.decide("c", 1, [part], threshold, 5, release_scores=True)
        assert out == [] or ([g.group for g in out] == [0] and out[0].score in (0.92, 0.93))


def test_unknown_key_version_is_refused(public, decider) -> None:
    with pytest.raises(Exception, match="no decryption key"):
        decider.decide("c", 2, [_score_part(public, np.array([0.5]), [0], [0])], 0.0, 1)


def test_blind_reencryption_moves_values_it_never_sees(public, secret, decider) -> None:
    """The matcher masks two ciphertexts; the decider moves coefficients between them and
    encrypts afresh; after unmasking, the moved values are there, and nothing else."""
    rng = np.random.default_rng(5)
    moduli = public.moduli
    values = rng.integers(-2 ** 30, 2 ** 30, (2, public.n))
    cts = blocks.encrypt_plaintexts(public, np.stack([poly.residues(v, moduli) for v in values]))
    mask = poly.uniform((2, public.n), moduli)
    masked = cts.copy()
    masked[:, 0] = poly.add(cts[:, 0], mask, moduli)
    moves = Moves(1, np.array([0, 1]), np.array([10, 20]), np.array([0, 0]), np.array([3, 4]))
    seen = []
    fresh = decider.reencrypt("c", 1, masked, False, moves,
                              lambda plain: (seen.append(plain.copy()),
                                             blocks.encrypt_plaintexts(public, plain))[1])
    # What the decider handed to encryption is masked: it equals the moved values plus the
    # moved mask, not the values themselves.
    assert seen[0][0, 0, 3] != values[0, 10] % moduli[0]
    moved_mask = np.zeros((1, len(moduli), public.n), np.uint64)
    moved_mask[0, :, [3, 4]] = mask[[0, 1], :, [10, 20]]
    fresh[:, 0] = poly.sub(fresh[:, 0], moved_mask, moduli)
    plain = poly.centered(secret.decrypt(fresh[0], False)[0], moduli[0])
    expected = np.zeros(public.n, np.int64)
    expected[[3, 4]] = values[0, 10], values[1, 20]
    assert np.abs(plain - expected).max() < 2 ** 9  # fresh noise plus the carried noise


def test_a_1_to_1_score_ciphertext_is_decided_as_the_full_one(public, decider) -> None:
    """The 1:1 path's score ciphertexts (c0 only at the declared slots, zero elsewhere:
    blocks.score_at) go through the decider unchanged: the same decisions and released
    scores as the full kernel's, and an undeclared slot that would match perfectly (the
    probe itself) is never decided on."""
    rng = np.random.default_rng(5)
    params, q, d = public.params, public.moduli[0], 32
    templates = rng.standard_normal((public.n, d))
    templates /= np.linalg.norm(templates, axis=1, keepdims=True)
    probe = templates[9]  # slot 9 is not declared: its score of 1.0 must not come out
    templates[100] = probe + 0.3 * templates[101]
    templates[100] /= np.linalg.norm(templates[100])
    plain = blocks.dimension_major_plaintexts(templates, 0, public.n, params.template_scale,
                                              public.moduli)
    cts = blocks.encrypt_plaintexts(public, plain)
    block = blocks.Block(0, 1, 1, public.n, 1, blocks.held(cts[:, :, 0, :], q), b"",
                         np.zeros(public.n, np.int32))
    digits = poly.probe_digits(probe, params.probe_scale_bits, params.probe_low_bits)
    slots = np.array([100, 2000], np.int64)
    truth = templates[slots] @ probe

    def part(ct: np.ndarray) -> ScoreCiphertext:
        return ScoreCiphertext(ct[0], False, slots, np.array([4, 5], np.int32), slots, 1, 0,
                               low=ct[1])

    for ct in (blocks.score(block, digits, q), blocks.score_at(block, digits, q, slots, 2)):
        out = decider.decide("c", 1, [part(ct)], -1.0, 2, release_scores=True)
        assert [g.group for g in out] == [4, 5] and [g.slot for g in out] == [100, 2000]
        for g, t in zip(out, truth):
            assert abs(g.score - t) <= 5e-3 + NOISE_BOUND + 1e-5
        assert decider.decide("c", 1, [part(ct)], 0.999, 1) == []
