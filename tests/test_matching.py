"""Gallery and decider: encrypted scores against numpy, and who can decrypt what."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from vault import he
from vault.decider import NOISE_BOUND, Decider, SlotRef
from vault.gallery import CollectionGallery


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return he.generate()


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_public_context_holds_no_secret_key(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    ctx = ts.context_from(public)
    assert not ctx.has_secret_key()
    with pytest.raises(ValueError):
        he.load_public(secret, he.DEFAULT_PARAMS)
    gallery = CollectionGallery("c", 1, 8, he.DEFAULT_PARAMS, public)
    try:
        assert not gallery.context.has_secret_key()
        gallery.apply(gallery.prepare(_unit(np.random.default_rng(0), 1, 8)), [])
        with pytest.raises(ValueError):
            gallery.block_ciphertexts(0)[0].decrypt()
    finally:
        gallery.close()


def test_scores_match_numpy_across_blocks(keys: tuple[bytes, bytes]) -> None:
    """Spans two blocks (2,048 slots each) so the block boundary is exercised."""
    secret, public = keys
    rng = np.random.default_rng(7)
    d = 16
    templates = _unit(rng, 2100, d)
    gallery = CollectionGallery("c", 1, d, he.DEFAULT_PARAMS, public)
    try:
        writes = gallery.prepare(templates)
        assert [w.block_no for w in writes] == [0, 1]
        assert writes[1].slot == list(range(52))
        gallery.apply(writes, [])
        ctx = he.load_secret(secret, he.DEFAULT_PARAMS)
        for probe in _unit(rng, 3, d):
            scores = gallery.score(probe, [0, 1])
            got = np.concatenate([ts.ckks_vector_from(ctx, scores[0]).decrypt(),
                                  ts.ckks_vector_from(ctx, scores[1]).decrypt()[:52]])
            assert np.abs(got - templates @ probe).max() < 5e-4
    finally:
        gallery.close()


def test_probe_with_exact_zeros_is_scored(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    gallery = CollectionGallery("c", 1, 4, he.DEFAULT_PARAMS, public)
    try:
        t = np.array([[0.6, 0.8, 0.0, 0.0]])
        gallery.apply(gallery.prepare(t), [])
        ctx = he.load_secret(secret, he.DEFAULT_PARAMS)
        out = gallery.score(np.array([1.0, 0.0, 0.0, 0.0]), [0])
        assert abs(ts.ckks_vector_from(ctx, out[0]).decrypt()[0] - 0.6) < 5e-4
    finally:
        gallery.close()


def test_decider_releases_only_requested_slots_flooded_and_rounded(keys: tuple[bytes, bytes]) -> None:
    secret, public = keys
    rng = np.random.default_rng(3)
    templates = _unit(rng, 10, 8)
    gallery = CollectionGallery("c", 1, 8, he.DEFAULT_PARAMS, public)
    try:
        gallery.apply(gallery.prepare(templates), [])
        decider = Decider()
        decider.load("c", 1, secret, he.DEFAULT_PARAMS)
        probe = templates[4]
        scores = gallery.score(probe, [0])
        truth = templates @ probe
        # Groups: slots 0-4 are subject 0, slots 5-9 subject 1; ask for slot 2 and 7 only.
        out = decider.decide("c", 1, scores, [SlotRef(0, 2, 0), SlotRef(0, 7, 1)], -1.0, 5)
        assert {g.group for g in out} == {0, 1}
        for g in out:
            expected = truth[2] if g.group == 0 else truth[7]
            assert abs(g.score - expected) <= 5e-4 + NOISE_BOUND + 2e-4
            assert g.score == round(g.score, 3)
        # Threshold and top_k apply after grouping; best first.
        out = decider.decide("c", 1, scores, [SlotRef(0, s, s // 5) for s in range(10)], -1.0, 1)
        assert len(out) == 1 and out[0].group == 0 and out[0].score > 0.99
        assert "0.99" not in repr(out[0])
    finally:
        gallery.close()


def test_accepted_score_floor_does_not_round_a_float32_threshold_up(keys: tuple[bytes, bytes]) -> None:
    # Regression: a float32 threshold (0.9200000167) once lifted accepted scores of 0.920 to
    # 0.921, one thousandth away from the plaintext cosine.
    secret, _public = keys
    decider = Decider()
    decider.load("c", 1, secret, he.DEFAULT_PARAMS)
    ctx = he.load_secret(secret, he.DEFAULT_PARAMS)
    threshold = float(np.float32(0.92))
    value = 0.92002
    scores = {0: ts.ckks_vector(ctx, [value, 0.5]).serialize()}
    for _ in range(20):  # the flooding noise is random: try it several times
        out = decider.decide("c", 1, scores, [SlotRef(0, 0, 0), SlotRef(0, 1, 1)], threshold, 5)
        assert [g.group for g in out] == [0]
        assert out[0].score == 0.92
        assert abs(out[0].score - value) <= 5e-4 + NOISE_BOUND


def test_score_error_stays_bounded_in_a_block_filled_one_enrollment_at_a_time(keys) -> None:
    """Each single enrollment adds a fresh zero to every ciphertext of the block: the noise
    grows with the number of updates. A full block must still score within 5e-4."""
    secret, public = keys
    rng = np.random.default_rng(11)
    d = 4
    slots = he.DEFAULT_PARAMS.slots
    templates = _unit(rng, slots, d)
    gallery = CollectionGallery("c", 1, d, he.DEFAULT_PARAMS, public, zero_pool_target=4096)
    try:
        for t in templates:
            gallery.apply(gallery.prepare(t), [])
        ctx = he.load_secret(secret, he.DEFAULT_PARAMS)
        for probe in _unit(rng, 3, d):
            got = np.asarray(ts.ckks_vector_from(ctx, gallery.score(probe, [0])[0]).decrypt())
            assert np.abs(got - templates @ probe).max() < 5e-4
    finally:
        gallery.close()
