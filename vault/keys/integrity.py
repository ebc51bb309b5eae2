"""Record MACs and blind indexes, keyed in the HSM.

Inputs are encoded canonically (a domain tag, then each field length-prefixed), so that
two different records can never produce the same MAC input. HE ciphertexts are malleable
and the public key is public: without these MACs anyone who can write the database could
swap, replay or forge templates.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

from vault.domain.records import Field
from vault.keys.hsm import INDEX, MAC
from vault.keys.roles import Mac

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

    def __init__(self, hsm: Mac) -> None:
        self._hsm = hsm

    def mac(self, tag: str, *fields: str | bytes | int | None) -> bytes:
        return self._hsm.hmac(MAC, encode(tag, *fields))

    def check(self, expected: bytes, tag: str, *fields: str | bytes | int | None) -> bool:
        """True when ``expected`` is the MAC of the fields (constant-time compare)."""
        return hmac.compare_digest(expected, self.mac(tag, *fields))

    def check_all(self, rows: Sequence[tuple[bytes, tuple[str, *tuple[Field, ...]]]]) -> bool:
        """True when every ``(expected, (tag, *fields))`` holds: one token call for all."""
        macs = self._hsm.hmac_many(MAC, [encode(*fields) for _, fields in rows])
        held = [hmac.compare_digest(expected, mac)
                for (expected, _), mac in zip(rows, macs, strict=True)]
        return all(held)

    def subject_index(self, collection_id: str, subject_id: str) -> bytes:
        """Blind index of a subject id, per collection (so collections cannot be joined)."""
        return self._hsm.hmac(INDEX, encode("subject", collection_id, subject_id))

    def request_index(self, collection_id: str, request_id: str) -> bytes:
        return self._hsm.hmac(INDEX, encode("request", collection_id, request_id))


_DIGEST_MOD = 1 << 256


class LiveSet:
    """An order-independent commitment to the live set of one (collection, key version).

    The digest is the sum mod 2^256 of one keyed leaf per live template (its id, subject
    HMAC, place and row MAC) and per journal page and block row (its place, generation
    and row MAC): an enrollment, a move or a deletion changes it in O(1), inside the
    transaction that changes the rows. The leaves are keyed (BLAKE2b under a data key
    wrapped by the HSM) so that nobody without the key can compute or combine them; the
    state row (counter, digest) carries a MAC computed in the HSM. Deleting, restoring or
    replaying any row changes the sum of what is stored, and the load finds it.
    """

    def __init__(self, key: bytes, integrity: Integrity) -> None:
        self._key = key
        self._integrity = integrity

    def _leaf(self, tag: str, *fields: str | bytes | int | None) -> int:
        return int.from_bytes(hashlib.blake2b(encode(tag, *fields), key=self._key,
                                              digest_size=32).digest(), "big")

    def template(self, collection_id: str, key_version: int, template_id: str,
                 subject_hmac: bytes, tier: int, loc: int, slot: int, mac: bytes) -> int:
        """The leaf of one live template row."""
        return self._leaf("live-template", collection_id, key_version, template_id, subject_hmac,
                          tier, loc, slot, mac)

    def holder(self, collection_id: str, key_version: int, tier: int, loc: int,
               generation: int, mac: bytes) -> int:
        """The leaf of one journal page (tier 0) or block (tier 1) row."""
        return self._leaf("live-holder", collection_id, key_version, tier, loc, generation, mac)

    def collection_row(self, collection_id: str, key_version: int, revision: int,
                       mac: bytes) -> int:
        """The leaf of a collection's row in the live set of its current key version."""
        return self._leaf("collection-row", collection_id, key_version, revision, mac)

    def attempt(self, collection_id: str, subject_hmac: bytes, credential_hmac: bytes,
                mac: bytes) -> int:
        """The leaf of one attempt-limit row (a collection's attempt set: key version -1)."""
        return self._leaf("attempt-row", collection_id, subject_hmac, credential_hmac, mac)

    @staticmethod
    def add(digest: bytes, delta: int) -> bytes:
        return ((int.from_bytes(digest, "big") + delta) % _DIGEST_MOD).to_bytes(32, "big")

    def seal(self, collection_id: str, key_version: int, counter: int, digest: bytes) -> bytes:
        """The HSM MAC of a state row."""
        return self._integrity.mac("collection-state", collection_id, key_version, counter, digest)

    def check(self, mac: bytes, collection_id: str, key_version: int, counter: int,
              digest: bytes) -> bool:
        return self._integrity.check(mac, "collection-state", collection_id, key_version, counter,
                                     digest)
