"""Envelope encryption: a fresh data key per sealed value, wrapped by the HSM KEK.

``seal`` output: 2-byte length of the wrapped data key, the wrapped key (its header names
the KEK version, see :meth:`Hsm.wrap`), a 12-byte nonce, then AES-256-GCM of the value.
The same associated data binds both layers, so a sealed value cannot be moved to another
row (another collection, subject or key version) and opened there.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vault.domain.errors import DataLoss
from vault.keys.hsm import wrapped_version
from vault.keys.roles import KeyWrap

_LEN = struct.Struct(">H")


def seal(hsm: KeyWrap, value: bytes, aad: bytes) -> bytes:
    """Encrypt ``value`` under a fresh data key wrapped in the HSM."""
    data_key = AESGCM.generate_key(bit_length=256)
    wrapped = hsm.wrap(data_key, aad)
    nonce = os.urandom(12)
    return _LEN.pack(len(wrapped)) + wrapped + nonce + AESGCM(data_key).encrypt(nonce, value, aad)


def _split(blob: bytes) -> tuple[bytes, bytes]:
    """(wrapped data key, nonce and ciphertext) of a sealed value."""
    if len(blob) < _LEN.size:
        raise DataLoss("sealed value is truncated")
    (n,) = _LEN.unpack_from(blob)
    return blob[_LEN.size:_LEN.size + n], blob[_LEN.size + n:]


def open_sealed(hsm: KeyWrap, blob: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`seal`; raises DataLoss when the blob or ``aad`` do not match."""
    wrapped, rest = _split(blob)
    if len(rest) < 12 + 16:
        raise DataLoss("sealed value is truncated")
    data_key = hsm.unwrap(wrapped, aad)
    try:
        return AESGCM(data_key).decrypt(rest[:12], rest[12:], aad)
    except InvalidTag as exc:
        raise DataLoss("sealed value failed authentication") from exc


def sealed_kek_version(blob: bytes) -> int:
    """The KEK version that wraps a sealed value's data key."""
    return wrapped_version(_split(blob)[0])


def rewrap_sealed(hsm: KeyWrap, blob: bytes, aad: bytes, version: int | None = None) -> bytes:
    """The same sealed value with its data key rewrapped under the current KEK version:
    the value itself is not decrypted (master key rotation)."""
    wrapped, rest = _split(blob)
    rewrapped = hsm.rewrap(wrapped, aad, version)
    return _LEN.pack(len(rewrapped)) + rewrapped + rest


class DataKey:
    """A long-lived data key held in memory after one unwrap (for per-row AES-GCM, where a
    round trip to the HSM per row would be too slow). Its repr hides the key."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def encrypt(self, value: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, value, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except (InvalidTag, ValueError) as exc:
            raise DataLoss("encrypted field failed authentication") from exc

    def __repr__(self) -> str:
        return "DataKey(***)"
