"""The HSM's roles as the vault uses them, one small Protocol each (as tink-py has Mac,
Aead and PublicKeySign primitives): code names the role it needs. :class:`vault.keys.hsm.Hsm`
implements them all against a PKCS#11 token; the fakes in :mod:`vault.testing` implement
them by delegating to a real one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Mac(Protocol):
    """HMAC-SHA256 under named token keys that never leave it (row MACs, blind indexes,
    derived seeds)."""

    def hmac(self, name: str, data: bytes, version: int = 1) -> bytes: ...

    def hmac_many(self, name: str, datas: Sequence[bytes], version: int = 1) -> list[bytes]: ...


class KeyWrap(Protocol):
    """Wrapping of data keys under the token's versioned key-encryption keys (AES-GCM)."""

    def wrap(self, secret: bytes, aad: bytes, kek_version: int | None = None) -> bytes: ...

    def unwrap(self, blob: bytes, aad: bytes) -> bytes: ...

    def rewrap(self, blob: bytes, aad: bytes, version: int | None = None) -> bytes: ...

    def wrapped_version(self, blob: bytes) -> int: ...

    def current_kek_version(self) -> int: ...

    def create_kek(self) -> int: ...

    def destroy_kek(self, version: int) -> None: ...

    def versions(self, name: str) -> list[int]: ...


class Signer(Protocol):
    """The audit log's signing key pair (the private half never leaves the token)."""

    def ensure_audit_key(self) -> bool: ...

    def audit_sign(self, data: bytes) -> bytes: ...

    def audit_public_key(self) -> bytes: ...


class Counters(Protocol):
    """Monotonic counters kept in the token (rollback detection)."""

    def counter(self, counter_label: str) -> int | None: ...

    def has_counters(self) -> bool: ...

    def set_counter(self, counter_label: str, value: int, backward: bool = False) -> int: ...


class Token(Protocol):
    """The token itself: reachability, provisioning, randomness."""

    def ping(self) -> None: ...

    def close(self) -> None: ...

    def random(self, nbytes: int) -> bytes: ...

    def ensure_keys(self, create: bool = True) -> list[str]: ...

    def key_attributes(self, key_label: str) -> dict[str, bool]: ...


class HsmRoles(Mac, KeyWrap, Signer, Counters, Token, Protocol):
    """Every role: what the vault as a whole is given."""
