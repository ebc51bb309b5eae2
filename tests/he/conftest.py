from __future__ import annotations

import numpy as np
import pytest

from vault import he


@pytest.fixture(scope="session")
def keypair() -> tuple[bytes, bytes]:
    return he.generate(he.DEFAULT_PARAMS)


@pytest.fixture(scope="session")
def public(keypair) -> he.PublicContext:
    return he.PublicContext(keypair[1], he.DEFAULT_PARAMS)


@pytest.fixture(scope="session")
def secret(keypair) -> he.SecretContext:
    return he.SecretContext(keypair[0], he.DEFAULT_PARAMS)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)
