"""What operations answer: collection descriptions, match results, release settings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CollectionPolicy:
    """A collection's release settings, stored as JSON in its row, under its MAC."""

    require_purpose: bool = False

    def to_json(self) -> str:
        """The policy as stored in the collection row ('' for the defaults)."""
        return "" if self == CollectionPolicy() else json.dumps(dataclasses.asdict(self),
                                                                 sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CollectionPolicy:
        """The policy of a collection row."""
        return cls(**json.loads(text)) if text else cls()


@dataclass(frozen=True)
class CollectionInfo:
    """What GetCollection answers (no template, no key)."""

    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    template_count: int
    min_key_version: int = 1
    require_purpose: bool = False


@dataclass(frozen=True)
class Candidate:
    """A subject named by a match (its score only when scores were granted)."""

    subject_id: str = field(repr=False)
    score: float | None = field(repr=False, default=None)  # None unless scores were granted
    subject_hmac: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class MatchResult:
    """A decision, the subjects it names, and the threshold it was made at (audited)."""

    matched: bool
    candidates: list[Candidate]
    threshold: float = 0.0
    scores_released: bool = False


# Called with the protected probe before it is scored (vault.api.budget's probing guard).
Observer = Callable[[np.ndarray], None]
