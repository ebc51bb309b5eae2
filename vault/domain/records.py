"""The stored records, each knowing what its MAC covers, and the states they take.

Rows carry no plaintext: subject and request ids appear only as HMACs (blind indexes),
ciphertexts are CKKS under the collection's public key, secrets are wrapped by the HSM.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# What a MAC may cover (vault.keys.integrity.encode).
Field = str | bytes | int | None

LIVE = 1
DELETED = 2
# Where a template's encrypted values sit: a journal page (template-major, written by
# single enrollments) or a block (dimension-major, written by imports and checkpoints).
PAGE = 0
BLOCK = 1
# Blocks: CLUSTERED ones come from an import chunk's balanced clustering and carry a
# sketch (centroid) for the pre-filter; MIXED ones are filled in arrival order.
CLUSTERED = 1
MIXED = 2
# Key rotation job states (KeyJobRow.state).
RUNNING, DONE, FAILED = "running", "done", "failed"


@dataclass(frozen=True)
class CollectionRow:
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    min_key_version: int
    mac: bytes
    # The embedding model's public population mean (float64 bytes), or None: see
    # vault.protector (wolves).
    reference_mean: bytes | None = None
    # Release settings (vault.service.CollectionPolicy as JSON; '' = defaults), under the MAC.
    policy: str = ""
    # One more at every write of the row, so that an older copy put back is told from the
    # current one (vault.core.Core.current; a leaf of the live set from revision 1 on).
    # 0: a row written before revisions, whose MAC does not cover one.
    revision: int = 0

    def mac_fields(self) -> tuple[str, *tuple[Field, ...]]:
        """What this row's MAC (keyed in the HSM) covers: every field but the MAC."""
        fields = ("collection", self.collection_id, self.dimension, float(self.threshold).hex(),
                  self.key_version, self.min_key_version, self.reference_mean, self.policy)
        return (*fields, self.revision) if self.revision else fields


@dataclass(frozen=True)
class AttemptRow:
    """Verification attempts of one subject by one credential (vault.attempts)."""

    collection_id: str
    subject_hmac: bytes
    credential_hmac: bytes
    failures: int  # reservations in flight included
    since: float  # first failure of the current run
    locked_until: float
    mac: bytes


@dataclass(frozen=True)
class CollectionKeyRow:
    collection_id: str
    key_version: int
    he_params: str
    public_context: bytes
    sealed_secret_context: bytes


@dataclass(frozen=True)
class TemplateRow:
    template_id: str
    collection_id: str
    subject_hmac: bytes
    key_version: int
    tier: int
    loc: int
    slot: int
    request_hmac: bytes | None
    state: int
    erased: int
    mac: bytes

    def __repr__(self) -> str:
        return (f"TemplateRow(template_id={self.template_id!r}, tier={self.tier}, "
                f"loc={self.loc}, slot={self.slot})")

    def mac_fields(self) -> tuple[str, *tuple[Field, ...]]:
        """What this row's MAC (keyed in the HSM) covers: every field but the MAC."""
        return ("template", self.collection_id, self.template_id, self.subject_hmac,
                self.key_version, self.tier, self.loc, self.slot, self.request_hmac, self.state,
                self.erased)


@dataclass(frozen=True)
class PageRow:
    collection_id: str
    key_version: int
    page_no: int
    generation: int
    fill: int
    ciphertext: bytes
    mac: bytes

    def __repr__(self) -> str:
        return f"PageRow(page_no={self.page_no}, generation={self.generation}, fill={self.fill})"

    def mac_fields(self) -> tuple[str, *tuple[Field, ...]]:
        """What this row's MAC (keyed in the HSM) covers: every field but the MAC."""
        return ("page", self.collection_id, self.key_version, self.page_no, self.generation,
                self.fill, hashlib.sha256(self.ciphertext).digest())


@dataclass(frozen=True)
class BlockRow:
    collection_id: str
    key_version: int
    block_no: int
    kind: int
    generation: int
    levels: int
    fill: int
    digest: bytes
    sketch: bytes | None
    mac: bytes

    def __repr__(self) -> str:
        return f"BlockRow(block_no={self.block_no}, generation={self.generation}, fill={self.fill})"

    def mac_fields(self) -> tuple[str, *tuple[Field, ...]]:
        """What this row's MAC (keyed in the HSM) covers: every field but the MAC."""
        return ("block", self.collection_id, self.key_version, self.block_no, self.kind,
                self.generation, self.levels, self.fill, self.digest, self.sketch)


@dataclass(frozen=True)
class KeyJobRow:
    """A collection key rotation: state 'running', 'done' or 'failed'."""

    job_id: str
    collection_id: str
    from_version: int
    to_version: int
    state: str
    blocks_done: int
    blocks_total: int
    error: str | None
