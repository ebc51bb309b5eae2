"""Balanced clustering of imports into blocks, and routing a probe to the nearest ones."""

from __future__ import annotations

import numpy as np

from vault.gallery.prefilter import Prefilter, balanced_clusters, sketch


def _clustered(rng, identities: int, per: int, dim: int, spread: float = 0.65):
    centres = rng.standard_normal((identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[:, None, :] + spread * rng.standard_normal((identities, per, dim)) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    return centres, x.reshape(-1, dim), np.repeat(np.arange(identities), per)


def test_balanced_clusters_are_exactly_full() -> None:
    rng = np.random.default_rng(0)
    _, x, _ = _clustered(rng, 700, 5, 32)
    groups, leftover = balanced_clusters(x, 1000)
    assert [len(g) for g in groups] == [1000, 1000, 1000]
    assert len(leftover) == 500
    every = np.concatenate(groups + [leftover])
    assert sorted(every.tolist()) == list(range(len(x)))
    small, rest = balanced_clusters(x[:10], 1000)
    assert small == [] and list(rest) == list(range(10))


def test_routing_finds_the_blocks_holding_a_probes_identity() -> None:
    """Samples of one identity end up in few blocks, and the nearest sketches point to them:
    scoring a third of the blocks finds an identity's sample for nearly every probe."""
    rng = np.random.default_rng(1)
    centres, x, owner = _clustered(rng, 2400, 5, 64)
    groups, _ = balanced_clusters(x, 1000)
    block_of = np.full(len(x), -1)
    pre = Prefilter(64)
    for b, members in enumerate(groups):
        block_of[members] = b
        pre.add(b, sketch(x[members]))
    assert len(pre) == 12
    probes = centres[:300] + 0.65 * rng.standard_normal((300, 64)) / 8
    hits = 0
    for i, probe in enumerate(probes):
        chosen = set(pre.nearest(probe / np.linalg.norm(probe), 4))
        hits += bool(chosen & set(block_of[owner == i].tolist()))
    assert hits / len(probes) >= 0.95
