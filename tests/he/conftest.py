from __future__ import annotations

import numpy as np


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` random unit vectors of dimension ``d``."""
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)
