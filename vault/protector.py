"""Protector: validates an embedding, L2-normalises it and applies the cancellable transform.

The transform of a collection's key version is a keyed orthonormal rotation ``Q`` (D x D),
drawn from a seed that the HSM derives (HMAC inside the token) from the transform master
key, the collection id and the key version. A rotation keeps cosine similarity exactly
(no accuracy cost) and makes templates of two collections or two key versions unlinkable.
It is invertible to whoever holds its seed, and one rotation shared by many templates falls
to a known-plaintext attack: confidentiality rests on CKKS and the HSM; the transform gives
renewability (docs/SECURITY.md).
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence

import numpy as np

from vault.errors import InvalidArgument
from vault.keys.hsm import TRANSFORM, Hsm

MIN_DIMENSION = 2
MAX_DIMENSION = 1024
# A float32 zero vector, or one whose norm underflows, has no direction to compare.
_MIN_NORM = 1e-12


def validate_embedding(values: Sequence[float], dimension: int, field: str = "embedding") -> np.ndarray:
    """Check an embedding and return it L2-normalised as float64.

    Raises :class:`InvalidArgument` naming the field for a wrong dimension, a non-finite
    value or a zero vector. The message never contains the values themselves.
    """
    if len(values) != dimension:
        raise InvalidArgument(
            f"{field} has {len(values)} values, the collection's dimension is {dimension}"
        )
    x = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise InvalidArgument(f"{field} contains NaN or infinite values")
    norm = float(np.linalg.norm(x))
    if not math.isfinite(norm) or norm < _MIN_NORM:
        raise InvalidArgument(f"{field} is a zero vector (or too close to it to normalise)")
    return x / norm


class Transform:
    """A keyed orthonormal rotation. Its repr never shows the matrix."""

    __slots__ = ("_q",)

    def __init__(self, seed: bytes, dimension: int) -> None:
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))
        q, r = np.linalg.qr(rng.standard_normal((dimension, dimension)))
        # Fix the signs so that Q is uniformly (Haar) distributed and reproducible.
        self._q = q * np.sign(np.diag(r))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Rotate one vector (D,) or a batch (n, D)."""
        return x @ self._q.T

    def change_to(self, other: Transform) -> np.ndarray:
        """The orthogonal matrix that takes templates protected by this transform to the
        same templates protected by ``other`` (what a key rotation applies)."""
        return other._q @ self._q.T

    def __repr__(self) -> str:
        return f"Transform(dimension={self._q.shape[0]})"


class Protector:
    """Turns raw embeddings into protected templates for a collection's key version."""

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int, int], Transform] = {}

    def transform(self, collection_id: str, key_version: int, dimension: int) -> Transform:
        """The transform of (collection, key version); its seed is derived in the HSM."""
        cache_key = (collection_id, key_version, dimension)
        with self._lock:
            found = self._cache.get(cache_key)
        if found is not None:
            return found
        info = b"vault.v1/transform\x00" + collection_id.encode() + b"\x00" + struct.pack(">II", key_version, dimension)
        made = Transform(self._hsm.hmac(TRANSFORM, info), dimension)
        with self._lock:
            return self._cache.setdefault(cache_key, made)

    def forget(self, collection_id: str, key_version: int) -> None:
        """Drop a cached transform (after its key version is retired)."""
        with self._lock:
            for key in [k for k in self._cache if k[:2] == (collection_id, key_version)]:
                del self._cache[key]

    def protect(self, collection_id: str, key_version: int, dimension: int,
                values: Sequence[float], field: str = "embedding") -> np.ndarray:
        """Validate, normalise and transform an embedding; returns a unit vector (D,)."""
        x = validate_embedding(values, dimension, field)
        return self.transform(collection_id, key_version, dimension).apply(x)
