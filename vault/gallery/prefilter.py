"""Pre-filter: an IVF coarse quantiser whose lists are the encrypted blocks.

An import groups each chunk of protected templates into blocks by balanced spherical
k-means, so that every block holds templates that are near each other; the block's
*sketch* is the normalised mean of its templates. A 1:N match scores only the blocks
whose sketches are nearest the probe (faiss, inner product), plus every block that was
filled in arrival order (mixed blocks, journal checkpoints) and every journal page.

What the sketch reveals to someone who reads the matcher's memory: one D-dimensional
mean of 4,096 protected templates per block (in the collection's keyed transform space,
so not comparable across collections or key versions) and, per template, which block it
sits in: log2(number of blocks) bits of coarse position, about 8 bits at a million
templates. No template's values, and no per-template code. At rest the sketches are
sealed (AES-GCM under a data key wrapped by the HSM), like subject ids.
"""

from __future__ import annotations

import threading

import faiss
import numpy as np


def balanced_clusters(x: np.ndarray, size: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Split ``x`` (n, D) unit vectors into ``n // size`` groups of exactly ``size``.

    Spherical k-means gives the centres; points are then placed greedily, the most
    clear-cut first (largest margin between their best and second-best centre), each in
    the nearest centre that still has room. Returns the groups (index arrays) and the
    points left over (fewer than ``size``).
    """
    n, dim = x.shape
    k = n // size
    if k == 0:
        return [], np.arange(n)
    if k == 1:
        order = np.arange(n)
        return [order[:size]], order[size:]
    data = np.ascontiguousarray(x, dtype=np.float32)
    km = faiss.Kmeans(dim, k, niter=12, spherical=True, seed=seed, verbose=False)
    km.train(data)
    assert km.centroids is not None  # set by train()
    sim = data @ km.centroids.T
    preference = np.argsort(-sim, axis=1)
    top2 = np.take_along_axis(sim, preference[:, :2], axis=1)
    order = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")  # largest margin first
    room = np.full(k, size)
    members: list[list[int]] = [[] for _ in range(k)]
    leftover = []
    for i in order.tolist():
        for c in preference[i].tolist():
            if room[c]:
                room[c] -= 1
                members[c].append(i)
                break
        else:
            leftover.append(i)
    return [np.array(sorted(m), dtype=np.int64) for m in members], np.array(sorted(leftover), np.int64)


def sketch(templates: np.ndarray) -> np.ndarray:
    """A block's sketch: the normalised mean of its (unit) templates, float32."""
    mean = templates.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    out: np.ndarray = (mean / norm if norm > 0 else mean).astype(np.float32)
    return out


class Prefilter:
    """Sketches of the clustered blocks of one collection key version."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self._lock = threading.Lock()
        self._sketches: dict[int, np.ndarray] = {}
        self._index: faiss.IndexFlatIP | None = None
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self._sketches)

    def add(self, block_no: int, block_sketch: np.ndarray) -> None:
        with self._lock:
            self._sketches[block_no] = np.asarray(block_sketch, np.float32)
            self._index = None  # rebuilt on the next search: a few hundred vectors

    def nearest(self, probe: np.ndarray, count: int) -> list[int]:
        """The ``count`` blocks whose sketches are nearest the probe, nearest first."""
        with self._lock:
            if not self._sketches:
                return []
            if self._index is None:
                self._order = sorted(self._sketches)
                self._index = faiss.IndexFlatIP(self.dimension)
                self._index.add(np.stack([self._sketches[b] for b in self._order]))
            index, order = self._index, self._order
        count = min(count, len(order))
        _, found = index.search(np.asarray(probe, np.float32).reshape(1, -1), count)
        return [order[i] for i in found[0].tolist() if i >= 0]
