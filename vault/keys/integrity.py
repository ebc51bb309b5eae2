"""Record MACs and blind indexes, keyed in the HSM.

Inputs are encoded canonically (a domain tag, then each field length-prefixed), so that
two different records can never produce the same MAC input. HE ciphertexts are malleable
and the public key is public: without these MACs anyone who can write the database could
swap, replay or forge templates.
"""

from __future__ import annotations

import hmac
import struct

from vault.keys.hsm import INDEX, MAC, Hsm

_FIELD = struct.Struct(">I")


def encode(tag: str, *fields: str | bytes | int | None) -> bytes:
    """Canonical, injective encoding of a tagged tuple of fields."""
    out = [b"vault.v1/" + tag.encode(), b"\x00"]
    for value in fields:
        if value is None:
            raw = b"N"
        elif isinstance(value, int):
            raw = b"I" + struct.pack(">q", value)
        elif isinstance(value, str):
            raw = b"S" + value.encode()
        else:
            raw = b"B" + bytes(value)
        out.append(_FIELD.pack(len(raw)))
        out.append(raw)
    return b"".join(out)


class Integrity:
    """MACs of stored rows and HMAC blind indexes of personal identifiers."""

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm

    def mac(self, tag: str, *fields: str | bytes | int | None) -> bytes:
        return self._hsm.hmac(MAC, encode(tag, *fields))

    def check(self, expected: bytes, tag: str, *fields: str | bytes | int | None) -> bool:
        """True when ``expected`` is the MAC of the fields (constant-time compare)."""
        return hmac.compare_digest(expected, self.mac(tag, *fields))

    def subject_index(self, collection_id: str, subject_id: str) -> bytes:
        """Blind index of a subject id, per collection (so collections cannot be joined)."""
        return self._hsm.hmac(INDEX, encode("subject", collection_id, subject_id))

    def request_index(self, collection_id: str, request_id: str) -> bytes:
        return self._hsm.hmac(INDEX, encode("request", collection_id, request_id))
