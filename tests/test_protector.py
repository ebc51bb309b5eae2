"""Validation and the cancellable transform."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vault.domain.errors import InvalidArgument
from vault.keys.hsm import Hsm
from vault.protector import Protector, validate_embedding


@pytest.mark.parametrize("values, message", [
    ([1.0, 2.0], "has 2 values, the collection's dimension is 3"),
    ([1.0, math.nan, 0.0], "NaN or infinite"),
    ([1.0, math.inf, 0.0], "NaN or infinite"),
    ([0.0, 0.0, 0.0], "zero vector"),
    ([1e-300, 0.0, 0.0], "zero vector"),
])
def test_bad_embeddings_are_named_without_values(values: list[float], message: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_embedding(values, 3)
    assert message in err.value.message
    assert "embedding" in err.value.message
    assert "1e-300" not in err.value.message


def test_normalises() -> None:
    x = validate_embedding([3.0, 4.0], 2)
    assert np.allclose(x, [0.6, 0.8])


def test_subnormal_but_nonzero_vectors_normalise() -> None:
    x = validate_embedding([1e-10, 1e-10], 2)
    assert np.isclose(np.linalg.norm(x), 1.0)


def test_transform_keeps_cosine_and_is_keyed(hsm: Hsm, lfw: dict[str, np.ndarray]) -> None:
    p = Protector(hsm)
    emb = lfw["emb"][:50]
    a = np.array([p.protect("c1", 1, 128, e) for e in emb])
    plain = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert np.allclose(a @ a.T, plain @ plain.T, atol=1e-9)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0)
    # Same input, another collection or another key version: a different template.
    b = np.array([p.protect("c2", 1, 128, e) for e in emb])
    c = np.array([p.protect("c1", 2, 128, e) for e in emb])
    for other in (b, c):
        assert np.abs(np.sum(a * other, axis=1)).max() < 0.5
    # Deterministic for the same key: a fresh protector derives the same transform.
    assert np.allclose(Protector(hsm).protect("c1", 1, 128, emb[0]), a[0])


def test_transform_repr_hides_the_matrix(hsm: Hsm) -> None:
    t = Protector(hsm).transform("c1", 1, 4)
    assert repr(t) == "Transform(dimension=4)"


def test_reference_mean_is_checked_and_a_probe_at_it_refused() -> None:
    from vault.protector import CENTRING, centre, validate_reference_mean

    assert validate_reference_mean([], 3) is None
    for values, message in (([0.1, 0.1], "has 2 values"), ([math.nan, 0, 0], "NaN"),
                            ([1.0, 0.0, 0.0], "norm must be below")):
        with pytest.raises(InvalidArgument, match=message):
            validate_reference_mean(values, 3)
    mean = validate_reference_mean([0.9, 0.0, 0.0], 3)
    with pytest.raises(InvalidArgument, match="too close to the collection's reference mean"):
        centre(np.array([1.0, 0.0, 0.0]), mean)
    x = np.array([0.6, 0.8, 0.0])
    expected = (x - CENTRING * mean) / np.linalg.norm(x - CENTRING * mean)
    assert np.allclose(centre(x, mean), expected)


def test_subject_ids_are_nfc_and_invisible_characters_refused() -> None:
    from vault.validation import check_subject_id

    assert check_subject_id("Zoe\u0301") == check_subject_id("Zo\u00e9") == "Zo\u00e9"
    assert check_subject_id("\u0645\u062d\u0645\u062f") == "\u0645\u062d\u0645\u062f"  # RTL text is fine
    for bad in ("a\u200b", "\u202ea", "a\u2066", "\ufeffa", "a\x7f", "a\u2028", "a\ue000", "a\U000e0001"):
        with pytest.raises(InvalidArgument, match="subject_id contains invisible"):
            check_subject_id(bad)
