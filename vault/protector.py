"""Protector: validates an embedding, L2-normalises it and applies the cancellable transform.

The transform of a collection's key version is a keyed orthonormal rotation ``Q`` (D x D),
drawn from a seed that the HSM derives (HMAC inside the token) from the transform master
key, the collection id and the key version. A rotation keeps cosine similarity exactly
(no accuracy cost) and makes templates of two collections or two key versions unlinkable.
It is invertible to whoever holds its seed, and one rotation shared by many templates falls
to a known-plaintext attack: confidentiality rests on CKKS and the HSM; the transform gives
renewability (docs/SECURITY.md).

Wolves: face embeddings sit in a narrow cone (dlib: cosine about 0.92 to their mean
direction), so a mean of public faces is close to everyone. A collection created with a
*reference mean* (the embedding model's public population mean of L2-normalised
embeddings) has ``0.7 * mean`` subtracted from every normalised embedding before the
transform: the score is then the cosine of (mostly) centred embeddings. A probe too close
to the centre (``|x - mean|`` below 0.6 of the population's RMS spread,
``sqrt(1 - |mean|^2)``) is refused as INVALID_ARGUMENT. Why 0.7 and not 1: on LFW,
full centring alone brings a mean face's acceptances to zero but raises false rejects at
0.1% false accepts from 3.8% to 6.1%; 0.7 keeps accuracy (3.8%) and, with the gate, still
accepts a mean face as nobody (bench/protection.py, docs/SECURITY.md "Wolves").
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Sequence

import numpy as np

from vault.domain.errors import InvalidArgument
from vault.keys.hsm import TRANSFORM
from vault.keys.roles import Mac

MIN_DIMENSION = 2
MAX_DIMENSION = 1024
# A float32 zero vector, or one whose norm underflows, has no direction to compare.
_MIN_NORM = 1e-12
# Reference means: of unit vectors, so below norm 1; probes whose centred norm is below this
# fraction of the population's RMS spread are refused (LFW dlib: genuine faces >= 0.74 of
# it, a mean of other public faces 0.22, of 3 faces about 0.6; bench/protection.py).
_MAX_MEAN_NORM = 0.999
_QUALITY_FLOOR = 0.6
CENTRING = 0.7


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


def validate_reference_mean(values: Sequence[float], dimension: int) -> np.ndarray | None:
    """A collection's reference mean as float64 (None when not given).

    It is the mean of L2-normalised embeddings of a public population, so its norm is below
    1 (a mean of unit vectors that are not all equal); anything else is INVALID_ARGUMENT."""
    if len(values) == 0:
        return None
    if len(values) != dimension:
        raise InvalidArgument(f"reference_mean has {len(values)} values, the collection's "
                              f"dimension is {dimension}")
    mean = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(mean)):
        raise InvalidArgument("reference_mean contains NaN or infinite values")
    if not float(np.linalg.norm(mean)) < _MAX_MEAN_NORM:
        raise InvalidArgument("reference_mean must be the mean of L2-normalised embeddings "
                              f"(its norm must be below {_MAX_MEAN_NORM})")
    return mean


def centre(unit: np.ndarray, mean: np.ndarray, field: str = "embedding") -> np.ndarray:
    """Unit embeddings (D,) or (n, D) centred on ``mean`` and normalised again.

    A probe near the population centre (a mean face: close to everyone before centring,
    a direction of noise after) carries no identity: INVALID_ARGUMENT."""
    floor = _QUALITY_FLOOR * math.sqrt(max(0.0, 1.0 - float(mean @ mean)))
    if np.any(np.linalg.norm(unit - mean, axis=-1) < floor):
        raise InvalidArgument(f"{field} is too close to the collection's reference mean to "
                              "identify anyone (a population-average face)")
    shifted = unit - CENTRING * mean
    out: np.ndarray = shifted / np.linalg.norm(shifted, axis=-1, keepdims=True)
    return out


def prepare(values: Sequence[float], dimension: int, field: str = "embedding",
            reference_mean: np.ndarray | None = None) -> np.ndarray:
    """Validate, normalise and centre an embedding (what needs no key); a unit vector."""
    x = validate_embedding(values, dimension, field)
    return x if reference_mean is None else centre(x, reference_mean, field)


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
        out: np.ndarray = x @ self._q.T
        return out

    def change_to(self, other: Transform) -> np.ndarray:
        """The orthogonal matrix that takes templates protected by this transform to the
        same templates protected by ``other`` (what a key rotation applies)."""
        out: np.ndarray = other._q @ self._q.T
        return out

    def __repr__(self) -> str:
        return f"Transform(dimension={self._q.shape[0]})"


def transform_seed(hsm: Mac, collection_id: str, key_version: int, dimension: int) -> bytes:
    """The seed of a key version's transform: an HMAC inside the token."""
    info = (b"vault.v1/transform\x00" + collection_id.encode() + b"\x00"
            + struct.pack(">II", key_version, dimension))
    return hsm.hmac(TRANSFORM, info)


class Protector:
    """The transforms of every key version, derived in the HSM, and protection with them.
    The vault keeps its Protector in the decider (vault.decider.keeper): the serving
    process validates and centres, the decider transforms."""

    def __init__(self, hsm: Mac) -> None:
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
        made = Transform(transform_seed(self._hsm, collection_id, key_version, dimension),
                         dimension)
        with self._lock:
            return self._cache.setdefault(cache_key, made)

    def forget(self, collection_id: str, key_version: int) -> None:
        """Drop a cached transform (after its key version is retired)."""
        with self._lock:
            for key in [k for k in self._cache if k[:2] == (collection_id, key_version)]:
                del self._cache[key]

    def protect(self, collection_id: str, key_version: int, dimension: int,
                values: Sequence[float], field: str = "embedding",
                reference_mean: np.ndarray | None = None) -> np.ndarray:
        """Validate, normalise, centre on the collection's reference mean (if it has one)
        and transform an embedding; returns a unit vector (D,)."""
        x = prepare(values, dimension, field, reference_mean)
        return self.transform(collection_id, key_version, dimension).apply(x)
