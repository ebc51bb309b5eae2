"""The decider's release policy and secret-key operations (no HSM, no transport).

:class:`SecretKeys` decrypts two kinds of ciphertexts, and releases nothing it decrypts:

- **score ciphertexts** computed by the gallery. Of each it reads only the coefficients
  the caller names (live templates' scores; journal pages arrive with every other
  coefficient masked by uniform values mod q), keeps the best per group (subject), and
  releases decisions made on the flooded score and, only when granted, for groups at or
  above the threshold, those flooded scores rounded to 2 decimals (see the release
  policy below). CKKS decryptions handed to someone who chose
  the ciphertext leak the secret key (IND-CPA^D), and raw score vectors allow template
  reconstruction: neither ever leaves.
- **masked ciphertexts** for blind re-encryption (:meth:`SecretKeys.reencrypt`): the matcher
  adds a uniform mask R mod q to a template ciphertext, the decider decrypts ``m + R``
  (uniform: it learns nothing), moves or erases coefficients (integer operations, which
  commute with the mask), encrypts the result afresh and returns the ciphertext; the
  matcher subtracts the moved mask. This is how journal pages become blocks and how
  deleted templates leave the ciphertexts, without a template ever being decrypted.

Its interface takes arrays and opaque group numbers, never subject ids. Custody (where
the keys come from, the MAC-checked settings, the budget) is :mod:`vault.decider.keeper`'s;
the process boundary is :mod:`vault.decider.process`'s.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vault.domain.errors import FailedPrecondition
from vault.he import HeParams, SecretContext, poly

# What may leave (the release policy; the servicer only says who asks):
# - decisions, made on the score flooded with uniform noise in [-DECISION_NOISE,
#   DECISION_NOISE]: a caller bisecting a probe along a line learns where the decision
#   flips only to about the release precision, never to the exact value (4e-7 before). The
#   cost: a score within DECISION_NOISE of the threshold is decided at random, accepted
#   with probability (score - threshold + DECISION_NOISE) / (2 * DECISION_NOISE) (see
#   docs/SECURITY.md for the measured FRR/FAR effect);
# - at most MAX_TOP_K subjects, all at or above the threshold, best first;
# - scores only when asked and granted: the same flooded value, rounded to SCORE_DECIMALS.
SCORE_DECIMALS = 2
DECISION_NOISE = 0.005
NOISE_BOUND = DECISION_NOISE  # released scores carry the decision's noise, then rounding
MAX_TOP_K = 10


@dataclass(frozen=True)
class ScoreCiphertext:
    """A score ciphertext (2, 1, N) at the score prime, and which coefficients of its
    plaintext are scores the caller may learn: their positions, the group (subject) of
    each, and where the template sits (tier, loc, slot) so the caller can name it."""

    data: np.ndarray = field(repr=False)
    ntt: bool
    positions: np.ndarray = field(repr=False)
    groups: np.ndarray = field(repr=False)
    slots: np.ndarray = field(repr=False)
    tier: int
    loc: int
    # The same scores for the probe's low digit (HeParams.probe_low_bits), or None.
    low: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class GroupScore:
    """A group that reached the threshold, its released score (None unless scores were
    granted), and the template that gave it."""

    group: int
    score: float | None
    tier: int
    loc: int
    slot: int

    def __repr__(self) -> str:  # scores stay out of logs and tracebacks
        return f"GroupScore(group={self.group}, score=***)"


@dataclass(frozen=True)
class Moves:
    """Coefficient moves for a blind re-encryption: target ``dst_ct[i]`` gets, at
    coefficient ``dst_pos[i]``, source ``src_ct[i]``'s coefficient ``src_pos[i]``."""

    targets: int
    src_ct: np.ndarray
    src_pos: np.ndarray
    dst_ct: np.ndarray
    dst_pos: np.ndarray


def _top_groups(value: np.ndarray, group: np.ndarray, top_k: int) -> np.ndarray:
    """Indices of the best value of each of the ``top_k`` best groups, best first.

    Looks at the largest values only, widening until it has ``top_k`` distinct groups:
    a group absent from the m largest values cannot beat one present. (Sorting all the
    scores of a million-template gallery by group would cost more than scoring it.)
    """
    size = value.size
    m = min(size, max(8 * top_k, 64))
    while True:
        idx = np.argpartition(-value, m - 1)[:m] if m < size else np.arange(size)
        idx = idx[np.argsort(-value[idx], kind="stable")]
        _, first = np.unique(group[idx], return_index=True)
        if first.size >= top_k or m == size:
            return idx[np.sort(first)][:top_k]
        m = min(size, 4 * m)


class SecretKeys:
    """Holds the secret contexts of every (collection, key version) it was given."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._contexts: dict[tuple[str, int], SecretContext] = {}
        self._rng = np.random.Generator(np.random.PCG64(secrets.randbits(128)))

    def load(self, collection_id: str, key_version: int, secret_context: bytes,
             params: HeParams) -> None:
        """Deserialize and hold one key version's secret context."""
        ctx = SecretContext(secret_context, params)
        with self._lock:
            self._contexts[(collection_id, key_version)] = ctx

    def forget(self, collection_id: str, key_version: int) -> None:
        """Drop one key version's secret context."""
        with self._lock:
            ctx = self._contexts.pop((collection_id, key_version), None)
        if ctx is not None:
            ctx.wipe()

    def _context(self, collection_id: str, key_version: int) -> SecretContext:
        with self._lock:
            ctx = self._contexts.get((collection_id, key_version))
        if ctx is None:
            raise FailedPrecondition("no decryption key loaded for this collection key version")
        return ctx

    # -- decisions ------------------------------------------------------------------------

    def decide(self, collection_id: str, key_version: int, parts: Sequence[ScoreCiphertext],
               threshold: float, top_k: int, release_scores: bool = False) -> list[GroupScore]:
        """The groups whose flooded best score reaches ``threshold``, best first, at most
        ``min(top_k, MAX_TOP_K)``; with ``release_scores``, their flooded scores rounded
        to :data:`SCORE_DECIMALS`."""
        ctx = self._context(collection_id, key_version)
        top_k = max(1, min(int(top_k), MAX_TOP_K))
        params = ctx.public.params
        q = ctx.public.moduli[0]
        scale = params.template_scale * params.probe_scale
        values, groups, origin = [], [], []
        for index, part in enumerate(parts):
            if part.positions.size == 0:
                continue
            plains = [ctx.decrypt_at(ct, part.ntt, part.positions)
                      for ct in (part.data, part.low) if ct is not None]
            values.append(poly.combine_digits(plains, q, params.probe_low_bits) / scale)
            groups.append(part.groups.astype(np.int64))
            origin.append(np.stack([np.full(part.slots.size, index), part.slots]))
        if not values:
            return []
        value = np.concatenate(values)
        group = np.concatenate(groups)
        where = np.concatenate(origin, axis=1)
        # Fresh noise on every score, before the comparison: the exact decrypted value
        # decides nothing and never leaves.
        with self._lock:
            value = value + self._rng.uniform(-DECISION_NOISE, DECISION_NOISE, size=value.size)
        # A slot deleted while it was scored arrives with owner -1: never released.
        keep = np.flatnonzero((value >= threshold) & (group >= 0))
        chosen = keep[_top_groups(value[keep], group[keep], top_k)]
        released: list[float | None] = [None] * chosen.size
        if release_scores:
            # Never shown below the threshold as rounded up to the release precision (the
            # inner rounding drops float32 dust such as 0.9200000167).
            floor = math.ceil(round(threshold * 10**SCORE_DECIMALS, 4)) / 10**SCORE_DECIMALS
            shown = np.clip(np.round(value[chosen], SCORE_DECIMALS), -1.0, 1.0)
            released = np.maximum(shown, min(floor, 1.0)).tolist()
        out = []
        for i, score in zip(chosen.tolist(), released):
            part = parts[int(where[0, i])]
            out.append(GroupScore(int(group[i]), None if score is None else float(score),
                                  part.tier, part.loc, int(where[1, i])))
        return out

    # -- blind re-encryption --------------------------------------------------------------

    def reencrypt(self, collection_id: str, key_version: int, masked: np.ndarray, ntt: bool,
                  moves: Moves, encrypt: Callable[[np.ndarray], np.ndarray],
                  lift_to: tuple[int, ...] = ()) -> np.ndarray:
        """Fresh ciphertexts (targets, 2, levels, N), coefficient form, of the masked
        plaintexts of ``masked`` (k, 2, levels, N) rearranged by ``moves``.

        The plaintexts decrypted here are uniformly random (the caller masked them); they
        are encrypted by ``encrypt`` (fresh public-key encryptions, possibly under another
        key pair: a key switch) and never returned. ``lift_to``: the primes of the result
        when it has more than the input (one prime in): each value, an integer in [0, q0),
        is reduced mod each of them, the new key's score prime too (the caller's mask
        avoided wrap-around, see
        :func:`vault.he.poly.uniform_interior`).
        """
        ctx = self._context(collection_id, key_version)
        plain = np.stack([ctx.decrypt(ct, ntt) for ct in masked])  # (k, levels, N)
        levels = len(lift_to) if lift_to else plain.shape[1]
        target = np.zeros((moves.targets, levels, plain.shape[2]), np.uint64)
        target[moves.dst_ct, :plain.shape[1], moves.dst_pos] = plain[moves.src_ct, :, moves.src_pos]
        if lift_to:
            if plain.shape[1] != 1:
                raise ValueError("lifting starts from the score prime alone")
            for level, q in reversed(list(enumerate(lift_to))):  # level 0, the source, last
                target[:, level, :] = target[:, 0, :] % np.uint64(q)
        del plain
        return encrypt(target)
