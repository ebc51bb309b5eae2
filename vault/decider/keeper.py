"""The decider's custody: keys unsealed through its own HSM client, settings checked there.

:class:`Keeper` implements :class:`vault.decider.Decider`. It runs in the serving process
(tests, ``--decider inprocess``) or alone in :mod:`vault.decider.child`; either way it
trusts nothing its caller (the matcher) chooses that would widen what it releases:

- the threshold and dimension come from the collection row, whose MAC the keeper checks
  in the HSM itself (a caller-chosen threshold is refused unless ``allow_override``,
  which only the in-process tests use);
- only declared score coefficients are decrypted: at most N per ciphertext, each once, and
  in a journal page's product only those at multiples of D (the others are partial
  correlations of a template);
- score ciphertexts are budgeted per second (:class:`Rate`), and sealed subject ids are
  opened at most :data:`MAX_TOP_K` per call, also budgeted;
- what leaves is what :class:`vault.decider.release.SecretKeys` releases: decisions on
  flooded scores, rounded granted scores, fresh ciphertexts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from vault import he
from vault.crypto import aad
from vault.decider.release import MAX_TOP_K, GroupScore, Moves, ScoreCiphertext, SecretKeys
from vault.domain.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
)
from vault.domain.records import CollectionKeyRow, CollectionRow
from vault.gallery.blocks import encrypt_plaintexts
from vault.he import HeParams, PublicContext
from vault.keys import envelope
from vault.keys.integrity import Integrity
from vault.keys.roles import HsmRoles
from vault.protector import Protector

PII_KEY = "pii"
# Score ciphertexts (4,096 scores each) decrypted per second, and the burst allowed: a 1:N
# over a million templates decrypts about 60 (routing) to 250 (all blocks).
SCORE_CIPHERTEXTS_PER_SECOND = 20_000.0
SUBJECT_OPENS_PER_SECOND = 2_000.0

# (public context object, its serialized bytes, for encryption workers) -> fresh ciphertexts
Encrypt = Callable[[PublicContext, bytes, np.ndarray], np.ndarray]


def _encrypt_here(ctx: PublicContext, _public: bytes, plain: np.ndarray) -> np.ndarray:
    return encrypt_plaintexts(ctx, plain)


class Rate:
    """A token bucket: ``rate`` units per second, bursts of twice that."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = 2 * rate
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, units: float, what: str) -> None:
        """Spend ``units`` or raise RESOURCE_EXHAUSTED naming ``what``."""
        with self._lock:
            now = self._clock()
            self._tokens = min(2 * self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if units > self._tokens:
                raise ResourceExhausted(f"the decider's budget of {what} per second is used up")
            self._tokens -= units


class Keeper:
    """The key holder (see the module docstring)."""

    def __init__(self, hsm: HsmRoles, encrypt: Encrypt = _encrypt_here, allow_override: bool = True,
                 score_rate: float = SCORE_CIPHERTEXTS_PER_SECOND,
                 open_rate: float = SUBJECT_OPENS_PER_SECOND,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._hsm = hsm
        self._integrity = Integrity(hsm)
        self._keys = SecretKeys()
        self._transforms = Protector(hsm)
        self._publics: dict[tuple[str, int], bytes] = {}
        self._pii: envelope.DataKey | None = None
        self._encrypt = encrypt
        self._allow_override = allow_override
        self._scores = Rate(score_rate, clock)
        self._opens = Rate(open_rate, clock)
        self._checked: set[CollectionRow] = set()
        self._lock = threading.Lock()

    # -- keys ----------------------------------------------------------------------------

    def init_pii(self, wrapped: bytes | None) -> bytes | None:
        """See :meth:`vault.decider.Decider.init_pii`."""
        bound = aad.data_key(PII_KEY, 1)
        made = None
        if wrapped is None:
            key = self._hsm.random(32)
            made = self._hsm.wrap(key, bound)
        else:
            key = self._hsm.unwrap(wrapped, bound)
        self._pii = envelope.DataKey(key)
        del key
        return made

    def bind(self, wrapped_pii: Callable[[], bytes | None],
             key_row: Callable[[str, int], CollectionKeyRow | None]) -> None:
        """Nothing to re-read: this keeper lives as long as its caller."""

    def create_key(self, collection_id: str, key_version: int,
                   params: HeParams) -> tuple[bytes, bytes]:
        """See :meth:`vault.decider.Decider.create_key`."""
        secret, public = he.generate(params)
        params_json = params.to_json()
        sealed = envelope.seal(self._hsm, secret,
                               aad.secret_context(collection_id, key_version, params_json))
        self._keys.load(collection_id, key_version, secret, params)
        del secret
        with self._lock:
            self._publics[(collection_id, key_version)] = public
        return public, sealed

    def load(self, key: CollectionKeyRow) -> None:
        """See :meth:`vault.decider.Decider.load`."""
        cid, version = key.collection_id, key.key_version
        secret = envelope.open_sealed(self._hsm, key.sealed_secret_context,
                                      aad.secret_context(cid, version, key.he_params))
        self._keys.load(cid, version, secret, HeParams.from_json(key.he_params))
        del secret
        with self._lock:
            self._publics[(cid, version)] = key.public_context

    def forget(self, collection_id: str, key_version: int) -> None:
        """See :meth:`vault.decider.Decider.forget`."""
        self._keys.forget(collection_id, key_version)
        self._transforms.forget(collection_id, key_version)
        with self._lock:
            self._publics.pop((collection_id, key_version), None)

    def _context(self, collection_id: str, key_version: int) -> he.SecretContext:
        return self._keys._context(collection_id, key_version)

    # -- decisions -----------------------------------------------------------------------

    def _settings(self, row: CollectionRow) -> CollectionRow:
        """The row, once its MAC held in this keeper's own HSM session."""
        with self._lock:
            known = row in self._checked
        if not known:
            if not self._integrity.check(row.mac, *row.mac_fields()):
                raise DataLoss("collection record failed its integrity check (decider)")
            with self._lock:
                if len(self._checked) > 1024:
                    self._checked.clear()
                self._checked.add(row)
        return row

    def decide(self, row: CollectionRow, parts: Sequence[ScoreCiphertext], top_k: int,
               release_scores: bool = False, threshold: float | None = None,
               decoy: bool = False) -> list[GroupScore]:
        """See :meth:`vault.decider.Decider.decide` and the module docstring."""
        row = self._settings(row)
        if threshold is not None and threshold != row.threshold and not self._allow_override:
            raise PermissionDenied("the decider applies the collection's own threshold")
        n = self._context(row.collection_id, row.key_version).public.params.slots
        for part in parts:
            _check_part(part, n, row.dimension)
        self._scores.take(len(parts), "score ciphertexts")
        at = row.threshold if threshold is None else threshold
        decided = self._keys.decide(row.collection_id, row.key_version, parts,
                                    2.0 if decoy else at, top_k, release_scores and not decoy)
        return [] if decoy else decided

    def reencrypt(self, collection_id: str, key_version: int, masked: np.ndarray, ntt: bool,
                  moves: Moves, target_version: int,
                  lift_to: Sequence[int] = ()) -> np.ndarray:
        """See :meth:`vault.decider.Decider.reencrypt`."""
        target = self._context(collection_id, target_version).public
        with self._lock:
            public = self._publics.get((collection_id, target_version))
        if public is None:
            raise FailedPrecondition("no public key loaded for the target key version")
        return self._keys.reencrypt(collection_id, key_version, masked, ntt, moves,
                                    lambda plain: self._encrypt(target, public, plain),
                                    tuple(int(q) for q in lift_to))

    # -- what moves with the keys: transforms and subject ids ----------------------------

    def transform(self, collection_id: str, key_version: int, dimension: int,
                  x: np.ndarray) -> np.ndarray:
        """See :meth:`vault.decider.Decider.transform` (unit vectors only)."""
        x = np.asarray(x, np.float64)
        if x.ndim not in (1, 2) or x.shape[-1] != dimension or not np.all(np.isfinite(x)):
            raise InvalidArgument("the decider transforms finite vectors of the collection's "
                                  "dimension only")
        if np.any(np.abs(np.linalg.norm(x, axis=-1) - 1.0) > 1e-6):
            raise InvalidArgument("the decider transforms unit vectors only")
        return self._transforms.transform(collection_id, key_version, dimension).apply(x)

    def change(self, collection_id: str, from_version: int, to_version: int,
               dimension: int) -> np.ndarray:
        """See :meth:`vault.decider.Decider.change`."""
        old = self._transforms.transform(collection_id, from_version, dimension)
        return old.change_to(self._transforms.transform(collection_id, to_version, dimension))

    def _pii_key(self) -> envelope.DataKey:
        if self._pii is None:
            raise FailedPrecondition("the decider holds no PII key yet")
        return self._pii

    def seal_subjects(self, collection_id: str,
                      items: Sequence[tuple[bytes, str]]) -> list[bytes]:
        """See :meth:`vault.decider.Decider.seal_subjects`."""
        key = self._pii_key()
        return [key.encrypt(subject_id.encode(), aad.subject_id(collection_id, bytes(h)))
                for h, subject_id in items]

    def open_subjects(self, collection_id: str,
                      items: Sequence[tuple[bytes, bytes]]) -> list[str]:
        """See :meth:`vault.decider.Decider.open_subjects`."""
        if len(items) > MAX_TOP_K:
            raise InvalidArgument(f"the decider opens at most {MAX_TOP_K} subject ids per call")
        self._opens.take(len(items), "subject ids opened")
        key = self._pii_key()
        return [key.decrypt(bytes(sealed), aad.subject_id(collection_id, bytes(h))).decode()
                for h, sealed in items]

    def close(self) -> None:
        """Nothing to release beyond memory."""


def _check_part(part: ScoreCiphertext, n: int, dimension: int) -> None:
    """INVALID_ARGUMENT unless the part asks only for declared score coefficients."""
    pos = np.asarray(part.positions)
    if part.data.shape != (2, 1, n) or pos.ndim != 1:
        raise InvalidArgument("a score ciphertext must be (2, 1, N) at the score prime")
    if pos.size > n or not (pos.size == np.asarray(part.groups).size == np.asarray(part.slots).size):
        raise InvalidArgument("score positions, groups and slots must match, at most N")
    if pos.size and (pos.min() < 0 or pos.max() >= n or np.unique(pos).size != pos.size):
        raise InvalidArgument("score positions must be distinct coefficients of the ciphertext")
    if part.ntt and np.any(pos % dimension):
        # A page product's other coefficients are partial correlations of a template.
        raise InvalidArgument("a journal page's scores sit at multiples of the dimension")
