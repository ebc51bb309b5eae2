"""Validation and the cancellable transform."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vault.errors import InvalidArgument
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
