"""The decider: the only holder of the CKKS secret keys, the PII data key and the
collection transforms, behind one narrow interface (:class:`Decider`).

Two implementations:

- :class:`vault.decider.keeper.Keeper`, in process (tests, ``vault serve --decider
  inprocess``): the keys live in the serving process;
- :class:`vault.decider.process.ProcessDecider`, what ``vault serve`` runs by default: a
  child process (:mod:`vault.decider.child`) with its own PKCS#11 session that unseals the
  keys itself and answers over a Unix socket only its parent may use. The serving process
  then holds no secret key, no PII key and no transform.

The caller never passes a key: it passes *where* a sealed one is (the collection key row
from the store) and the collection row with its MAC, which the decider checks through its
own session before applying the threshold it carries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from vault.decider.release import (
    DECISION_NOISE,
    MAX_TOP_K,
    NOISE_BOUND,
    SCORE_DECIMALS,
    GroupScore,
    Moves,
    ScoreCiphertext,
    SecretKeys,
)
from vault.domain.records import CollectionKeyRow, CollectionRow
from vault.he import HeParams

__all__ = ["DECISION_NOISE", "MAX_TOP_K", "NOISE_BOUND", "SCORE_DECIMALS", "Decider",
           "GroupScore", "Moves", "ScoreCiphertext", "SecretKeys"]


class Decider(Protocol):
    """What the operations ask of the key holder (every array is raw, no key crosses)."""

    def init_pii(self, wrapped: bytes | None) -> bytes | None:
        """Unwrap the PII data key from its wrapped blob (None: create one); returns the
        new wrapped blob for the store when one was created."""

    def bind(self, wrapped_pii: Callable[[], bytes | None],
             key_row: Callable[[str, int], CollectionKeyRow | None]) -> None:
        """Where the sealed keys can be read again (the store), for a restarted decider."""

    def create_key(self, collection_id: str, key_version: int,
                   params: HeParams) -> tuple[bytes, bytes]:
        """A fresh key pair for a key version, held from now on: (public context, secret
        context sealed under the HSM's KEK), what the store keeps."""

    def load(self, key: CollectionKeyRow) -> None:
        """Unseal and hold the secret key of a stored key version."""

    def forget(self, collection_id: str, key_version: int) -> None:
        """Drop a key version's secret key and transform."""

    def decide(self, row: CollectionRow, parts: Sequence[ScoreCiphertext], top_k: int,
               release_scores: bool = False, threshold: float | None = None,
               decoy: bool = False) -> list[GroupScore]:
        """Decisions on score ciphertexts at the threshold of ``row`` (its MAC checked by
        the decider); ``decoy``: decrypt and release nothing."""

    def reencrypt(self, collection_id: str, key_version: int, masked: np.ndarray, ntt: bool,
                  moves: Moves, target_version: int,
                  lift_to: tuple[int, ...] = ()) -> np.ndarray:
        """Blind re-encryption (:meth:`SecretKeys.reencrypt`) under the public key of
        ``target_version`` (the same version, or a rotation's target)."""

    def transform(self, collection_id: str, key_version: int, dimension: int,
                  x: np.ndarray) -> np.ndarray:
        """The key version's keyed rotation applied to unit vectors (D,) or (n, D)."""

    def change(self, collection_id: str, from_version: int, to_version: int,
               dimension: int) -> np.ndarray:
        """The orthogonal matrix taking templates of one version to another (rotation)."""

    def seal_subjects(self, collection_id: str,
                      items: Sequence[tuple[bytes, str]]) -> list[bytes]:
        """(subject HMAC, subject id) pairs sealed under the PII key."""

    def open_subjects(self, collection_id: str,
                      items: Sequence[tuple[bytes, bytes]]) -> list[str]:
        """(subject HMAC, sealed id) pairs opened (names decided subjects only; budgeted)."""

    def close(self) -> None:
        """Release the keys (and the child process)."""
