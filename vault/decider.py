"""Decider: the only holder of CKKS secret keys. Decrypts score ciphertexts, nothing else.

Its interface takes bytes and opaque group numbers, never subject ids, so that it can run
as its own process later. What leaves it is a decision and, for the groups that reach the
threshold, a score that was flooded with bounded noise and rounded to 3 decimals: CKKS
decryptions handed to someone who chose the ciphertext leak the secret key (IND-CPA^D),
and raw score vectors allow template reconstruction. Scores of slots the caller did not
ask about never leave.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tenseal as ts

from vault import he
from vault.errors import FailedPrecondition

SCORE_DECIMALS = 3
# Flooding noise, uniform in [-bound, bound], added to released scores before rounding.
# Bounded so that a returned score stays within 1e-3 of the plaintext cosine: 5e-4
# (rounding) + 1e-4 (noise) + at most 4.6e-4 (CKKS error of a full block, see vault.he).
NOISE_BOUND = 1e-4


@dataclass(frozen=True)
class SlotRef:
    """A slot whose score the caller may learn, and the group (subject) it belongs to."""

    block_no: int
    slot: int
    group: int


@dataclass(frozen=True)
class GroupScore:
    group: int
    score: float

    def __repr__(self) -> str:  # scores stay out of logs and tracebacks
        return f"GroupScore(group={self.group}, score=***)"


class Decider:
    """Holds the secret contexts of every (collection, key version) it was given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contexts: dict[tuple[str, int], ts.Context] = {}
        self._rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))

    def load(self, collection_id: str, key_version: int, secret_context: bytes,
             params: he.HeParams) -> None:
        ctx = he.load_secret(secret_context, params)
        with self._lock:
            self._contexts[(collection_id, key_version)] = ctx

    def forget(self, collection_id: str, key_version: int) -> None:
        with self._lock:
            self._contexts.pop((collection_id, key_version), None)

    def _context(self, collection_id: str, key_version: int) -> ts.Context:
        with self._lock:
            ctx = self._contexts.get((collection_id, key_version))
        if ctx is None:
            raise FailedPrecondition("no decryption key loaded for this collection key version")
        return ctx

    def decide(self, collection_id: str, key_version: int, score_cts: dict[int, bytes],
               slots: Sequence[SlotRef], threshold: float, top_k: int) -> list[GroupScore]:
        """Best score per group, flooded and rounded; only groups reaching ``threshold``,
        best first, at most ``top_k``."""
        ctx = self._context(collection_id, key_version)
        decrypted: dict[int, np.ndarray] = {}
        for block_no, data in score_cts.items():
            decrypted[block_no] = np.asarray(ts.ckks_vector_from(ctx, data).decrypt())
        if not slots:
            return []
        raw = np.fromiter((decrypted[s.block_no][s.slot] for s in slots), dtype=np.float64,
                          count=len(slots))
        groups = np.fromiter((s.group for s in slots), dtype=np.int64, count=len(slots))
        best: dict[int, float] = {}
        for group, value in zip(groups.tolist(), raw.tolist()):
            if value > best.get(group, -np.inf):
                best[group] = value
        group_ids = np.fromiter(best.keys(), dtype=np.int64, count=len(best))
        values = np.fromiter(best.values(), dtype=np.float64, count=len(best))
        with self._lock:
            noise = self._rng.uniform(-NOISE_BOUND, NOISE_BOUND, size=len(values))
        released = np.clip(np.round(values + noise, SCORE_DECIMALS), -1.0, 1.0)
        # Decide and rank on the decrypted value: the decision is one bit whatever noise
        # is added, and rounding would otherwise flip decisions near the threshold and
        # break ranking ties by group number.
        keep = values >= threshold
        # An accepted score is never shown below its threshold rounded like a score. (Not
        # rounded up: a float32 threshold such as 0.9200000167 would lift 0.920 to 0.921.)
        floor = round(threshold, SCORE_DECIMALS)
        released = np.where(keep, np.maximum(released, floor), released)
        order = np.argsort(-values[keep], kind="stable")[:top_k]
        return [GroupScore(int(g), float(v)) for g, v in
                zip(group_ids[keep][order], released[keep][order])]
