"""Every associated-data string the vault binds a sealed value to, built in one place so
that the writer and the reader of a value cannot disagree about what it is bound to."""

from __future__ import annotations

from vault.keys.integrity import encode


def data_key(name: str, version: int) -> bytes:
    """A data key wrapped by the HSM key-encryption key."""
    return encode("data-key", name, version)


def secret_context(collection_id: str, key_version: int, params_json: str) -> bytes:
    """A sealed CKKS secret key: its collection, key version and parameters."""
    return encode("ckks-secret", collection_id, key_version, params_json)


def subject_id(collection_id: str, subject_hmac: bytes) -> bytes:
    """A subject id sealed under the PII data key, bound to its blind index."""
    return encode("subject-id", collection_id, subject_hmac)


def sketch(collection_id: str, key_version: int, block_no: int) -> bytes:
    """A block's pre-filter centroid sealed under the sketch data key."""
    return encode("sketch", collection_id, key_version, block_no)


def audit_subject(collection_id: str, sealed_subject_id: bytes) -> bytes:
    """The per-subject key of erasable audit references (vault.ops.match)."""
    return encode("audit-subject", collection_id, sealed_subject_id)
