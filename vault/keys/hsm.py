"""The PKCS#11 client: every key of the vault lives in the token, found by label.

Low-level layer. python-pkcs11 with SoftHSM is not thread safe (a session per thread
crashed or hung on these machines), so every call goes through one lock and one session,
logged in once per process. Any PKCS#11 failure that means "the token is not usable"
becomes :class:`HsmUnavailable`; the session is dropped and reopened on the next call, so
service resumes by itself when the token comes back.

Keys (labels, ``vN`` is the version):

- ``vault/kek/vN``: AES-256, non-extractable, sensitive. Wraps data keys (AES-GCM inside
  the token; SoftHSM cannot wrap with GCM, and we wrap bytes, not token objects).
- ``vault/mac/v1``: HMAC-SHA256, non-extractable. Record MACs (integrity of stored rows).
- ``vault/index/v1``: HMAC-SHA256, non-extractable. Blind index of subject and request ids.
- ``vault/transform/v1``: HMAC-SHA256, non-extractable. Master key from which each
  collection's cancellable-transform seed is derived, per key version.
- ``vault/audit/v1``: Ed25519 key pair, private half non-extractable. Signs the audit log's
  checkpoints; the public half verifies them, in the token or exported.

Data objects (CKO_DATA, private): ``vault/rollback/<vault id>`` holds the sequence number
of a data directory's latest signed audit checkpoint (:mod:`vault.custody`).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11.exceptions import PKCS11Error
from pkcs11.mechanisms import GCMParams

from vault.domain.errors import DataLoss, HsmPinRejected, HsmUnavailable, WrongToken

T = TypeVar("T")

KEK = "kek"
MAC = "mac"
INDEX = "index"
TRANSFORM = "transform"
AUDIT = "audit"
# DER of the Ed25519 curve OID 1.3.101.112, for CKA_EC_PARAMS.
_ED25519_PARAMS = bytes.fromhex("06032b6570")
_HMAC_KEYS = (MAC, INDEX, TRANSFORM)
_COUNTER = struct.Struct(">Q")
COUNTER_PREFIX = "vault/rollback/"
_LABEL = re.compile(r"^vault/(?P<name>[a-z]+)/v(?P<version>[0-9]+)$")

# Wrapped-blob layout: magic, KEK version, 12-byte nonce, AES-GCM ciphertext and tag.
# The KEK version in every blob is what lets rotation rewrap and retire old versions.
_WRAP_MAGIC = b"VW1"
_WRAP_HEADER = struct.Struct(">3sI12s")


@dataclass(frozen=True)
class HsmConfig:
    """Where the token is: module path, token label and user PIN."""

    module: str
    token_label: str
    pin: str

    def __repr__(self) -> str:  # the PIN never appears in logs or tracebacks
        return f"HsmConfig(module={self.module!r}, token_label={self.token_label!r}, pin=***)"


def label(name: str, version: int) -> str:
    """Token label of a key: ``vault/<name>/v<version>``."""
    return f"vault/{name}/v{version}"


def _versions_in(session: pkcs11.Session, name: str) -> list[int]:
    """Versions of key ``name`` in the token, ascending."""
    found = []
    for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
        m = _LABEL.match(obj.label or "")
        if m and m.group("name") == name:
            found.append(int(m.group("version")))
    return sorted(found)


def _generate(session: pkcs11.Session, name: str, version: int) -> None:
    """Create key ``name`` version ``version`` in the token."""
    # Non-extractable and sensitive: the key's value can never leave the token.
    template = {Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True}
    if name == KEK:
        session.generate_key(
            KeyType.AES, 256, label=label(name, version), store=True, template=template,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
        )
    else:
        session.generate_key(
            KeyType.GENERIC_SECRET, 256, label=label(name, version), store=True,
            template=template, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
        )


def wrapped_version(blob: bytes) -> int:
    """KEK version named in a wrapped blob's header."""
    if len(blob) < _WRAP_HEADER.size:
        raise DataLoss("wrapped key is truncated")
    magic, version, _ = _WRAP_HEADER.unpack_from(blob)
    if magic != _WRAP_MAGIC:
        raise DataLoss("wrapped key has an unknown format")
    return int(version)


def _counter_objects(session: pkcs11.Session, counter_label: str) -> list[pkcs11.Object]:
    return list(session.get_objects({Attribute.CLASS: ObjectClass.DATA,
                                     Attribute.LABEL: counter_label}))


class Hsm:
    """Serialised access to the vault's keys in a PKCS#11 token."""

    def __init__(self, config: HsmConfig) -> None:
        self._config = config
        self._lock = threading.RLock()
        self._session: pkcs11.Session | None = None
        self._pid = os.getpid()
        self._keys: dict[str, pkcs11.SecretKey] = {}
        self._lib: pkcs11.lib | None = None

    # -- session management ---------------------------------------------------------

    def _open(self) -> pkcs11.Session:
        if self._session is not None and self._pid == os.getpid():
            return self._session
        # After a fork the inherited session belongs to the parent: start afresh.
        self._pid = os.getpid()
        self._session = None
        self._keys.clear()
        if not os.path.exists(self._config.module):
            raise HsmUnavailable("HSM unavailable: PKCS#11 module not found")
        try:
            if self._lib is None:
                self._lib = pkcs11.lib(self._config.module)
            else:
                # Re-read the token store: the token may have been restored meanwhile.
                self._lib.reinitialize()
            lib = self._lib
            token = lib.get_token(token_label=self._config.token_label)
            try:
                self._session = token.open(rw=True, user_pin=self._config.pin)
            except pkcs11.exceptions.UserAlreadyLoggedIn:
                # Login state is per process: another client here already logged in.
                self._session = token.open(rw=True)
        except pkcs11.exceptions.PinIncorrect as exc:
            raise HsmPinRejected("HSM unavailable: the token rejected the PIN") from exc
        except pkcs11.exceptions.NoSuchToken as exc:
            raise HsmUnavailable("HSM unavailable: token not found") from exc
        except (PKCS11Error, OSError, RuntimeError) as exc:
            raise HsmUnavailable(f"HSM unavailable: {type(exc).__name__}") from exc
        return self._session

    def _call(self, fn: Callable[[pkcs11.Session], T]) -> T:
        """Run ``fn`` with the session under the lock; token failures drop the session.

        A session handle found invalid (another client in this process re-initialised the
        shared library, or the token closed it) ran nothing: ``fn`` is run once more on a
        fresh session before the token counts as unavailable."""
        with self._lock:
            for retry in (True, False):
                session = self._open()
                try:
                    return fn(session)
                except HsmUnavailable:
                    raise
                except pkcs11.exceptions.SessionHandleInvalid as exc:
                    self._drop()
                    if not retry:
                        raise HsmUnavailable(f"HSM unavailable: {type(exc).__name__}") from exc
                except (PKCS11Error, OSError, RuntimeError) as exc:
                    self._drop()
                    raise HsmUnavailable(f"HSM unavailable: {type(exc).__name__}") from exc
            raise AssertionError("unreachable")

    def _drop(self) -> None:
        session, self._session = self._session, None
        self._keys.clear()
        if session is not None:
            with contextlib.suppress(Exception):  # the session is already broken
                session.close()

    def close(self) -> None:
        """Close the session (the next call reopens it)."""
        with self._lock:
            self._drop()

    def ping(self) -> None:
        """Raise :class:`HsmUnavailable` unless the token answers with a key operation.

        (Random numbers alone keep coming from a session whose token store is gone.)"""
        self.hmac(MAC, b"vault.v1/ping")

    # -- key lookup and provisioning ---------------------------------------------------

    def _key(self, session: pkcs11.Session, key_label: str) -> pkcs11.SecretKey:
        key = self._keys.get(key_label)
        if key is None:
            try:
                key = session.get_key(label=key_label, object_class=ObjectClass.SECRET_KEY)
            except pkcs11.exceptions.NoSuchKey as exc:
                raise HsmUnavailable(f"HSM key missing: {key_label}") from exc
            self._keys[key_label] = key
        return key

    def versions(self, name: str) -> list[int]:
        """Versions of key ``name`` present in the token, ascending."""
        return self._call(lambda session: _versions_in(session, name))

    def ensure_keys(self, create: bool = True) -> list[str]:
        """Key ceremony: create every missing key. Returns the labels it created.

        With ``create=False`` (a database already holds keys wrapped by this token) a
        missing key is an error: new keys could not read the database, and an empty or
        swapped token must not be silently re-keyed.
        """

        def run(session: pkcs11.Session) -> list[str]:
            missing = []
            present = {obj.label for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})}
            if not any(_LABEL.match(lbl or "") and lbl.startswith("vault/kek/") for lbl in present):
                missing.append((KEK, 1))
            missing += [(name, 1) for name in _HMAC_KEYS if label(name, 1) not in present]
            if missing and not create:
                raise WrongToken("wrong token: it does not hold the keys of this data directory "
                                 f"({len(missing)} missing); refusing to create new ones: "
                                 "start it with its own token (--hsm-dir, --hsm-token)")
            for name, version in missing:
                _generate(session, name, version)
            return [label(name, version) for name, version in missing]

        return self._call(run)

    def key_attributes(self, key_label: str) -> dict[str, bool]:
        """The protection attributes of a key (for tests and `vault keys` listings)."""

        def run(session: pkcs11.Session) -> dict[str, bool]:
            key = self._key(session, key_label)
            return {
                "extractable": bool(key[Attribute.EXTRACTABLE]),
                "sensitive": bool(key[Attribute.SENSITIVE]),
                "token": bool(key[Attribute.TOKEN]),
            }

        return self._call(run)

    # -- operations ----------------------------------------------------------------------

    def ensure_audit_key(self) -> bool:
        """Create the audit signing key pair if it is missing; True if it was created.

        Unlike :meth:`ensure_keys` this never needs a guard: the audit key protects no
        stored data, only the log entries signed from now on."""

        def run(session: pkcs11.Session) -> bool:
            found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                              Attribute.LABEL: label(AUDIT, 1)}))
            if found:
                return False
            params = session.create_domain_parameters(
                KeyType.EC_EDWARDS, {Attribute.EC_PARAMS: _ED25519_PARAMS}, local=True)
            params.generate_keypair(
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN, store=True, label=label(AUDIT, 1),
                private_template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True})
            return True

        return self._call(run)

    def audit_sign(self, data: bytes) -> bytes:
        """Ed25519 signature of ``data`` by the audit key (inside the token)."""

        def run(session: pkcs11.Session) -> bytes:
            key = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label(AUDIT, 1))
            return bytes(key.sign(data, mechanism=Mechanism.EDDSA))

        return self._call(run)

    def audit_public_key(self) -> bytes:
        """The raw 32-byte Ed25519 public key of the audit key."""

        def run(session: pkcs11.Session) -> bytes:
            key = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label(AUDIT, 1))
            point = bytes(key[Attribute.EC_POINT])
            return point[2:] if len(point) == 34 and point[0] == 0x04 else point  # DER OCTET STRING

        return self._call(run)

    def random(self, nbytes: int) -> bytes:
        """Random bytes from the token's generator."""
        return self._call(lambda s: bytes(s.generate_random(nbytes * 8)))

    def hmac_many(self, name: str, datas: Sequence[bytes], version: int = 1) -> list[bytes]:
        """:meth:`hmac` of each of ``datas``, in one session call: the vault's one token
        lock is taken once for a batch (a 1:N release checks its candidates' rows so)."""
        key_label = label(name, version)

        def run(session: pkcs11.Session) -> list[bytes]:
            key = self._key(session, key_label)
            return [bytes(key.sign(d, mechanism=Mechanism.SHA256_HMAC)) for d in datas]

        return self._call(run) if datas else []

    def hmac(self, name: str, data: bytes, version: int = 1) -> bytes:
        """HMAC-SHA256 of ``data`` under HMAC key ``name`` (computed inside the token)."""
        return self.hmac_many(name, [data], version)[0]

    def create_kek(self) -> int:
        """A new version of the key-encryption key (non-extractable, in the token); new
        wraps use it from now on. Returns its version."""

        def run(session: pkcs11.Session) -> int:  # one session: the scan and the new key
            version = max(_versions_in(session, KEK), default=0) + 1
            _generate(session, KEK, version)
            return version

        return self._call(run)

    def destroy_kek(self, version: int) -> None:
        """Destroy one KEK version in the token. Refuses the newest: blobs could not be
        unwrapped any more. Whatever is still wrapped under it becomes unreadable."""
        if version >= self.current_kek_version():
            raise ValueError("refusing to destroy the current key-encryption key")
        key_label = label(KEK, version)

        def run(session: pkcs11.Session) -> None:
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                            Attribute.LABEL: key_label}):
                obj.destroy()
            self._keys.pop(key_label, None)

        self._call(run)

    def rewrap(self, blob: bytes, aad: bytes, version: int | None = None) -> bytes:
        """The same key material wrapped under the current (or given) KEK version."""
        version = version or self.current_kek_version()
        if self.wrapped_version(blob) == version:
            return blob
        return self.wrap(self.unwrap(blob, aad), aad, version)

    def current_kek_version(self) -> int:
        versions = self.versions(KEK)
        if not versions:
            raise HsmUnavailable("HSM key missing: no key-encryption key")
        return versions[-1]

    def wrap(self, secret: bytes, aad: bytes, kek_version: int | None = None) -> bytes:
        """Encrypt key material under the key-encryption key (AES-GCM in the token).

        ``aad`` binds the blob to its purpose, so a wrapped key cannot be moved to
        another slot of the database and unwrapped there.
        """
        version = kek_version or self.current_kek_version()

        def run(session: pkcs11.Session) -> bytes:
            nonce = session.generate_random(96)
            kek = self._key(session, label(KEK, version))
            body = kek.encrypt(secret, mechanism=Mechanism.AES_GCM,
                               mechanism_param=GCMParams(nonce, aad))
            return _WRAP_HEADER.pack(_WRAP_MAGIC, version, nonce) + bytes(body)

        return self._call(run)

    wrapped_version = staticmethod(wrapped_version)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        """Inverse of :meth:`wrap`. A modified blob or wrong ``aad`` raises DataLoss."""
        version = self.wrapped_version(blob)
        _, _, nonce = _WRAP_HEADER.unpack_from(blob)
        body = blob[_WRAP_HEADER.size:]

        def run(session: pkcs11.Session) -> bytes | None:
            kek = self._key(session, label(KEK, version))
            try:
                return bytes(kek.decrypt(body, mechanism=Mechanism.AES_GCM,
                                         mechanism_param=GCMParams(nonce, aad)))
            except PKCS11Error:
                # SoftHSM reports a failed GCM tag as a general error: tell a bad blob
                # from a broken token by asking the token something harmless.
                session.generate_random(64)
                return None

        result = self._call(run)
        if result is None:
            raise DataLoss("wrapped key failed authentication")
        return result

    # -- rollback counters (data objects) ----------------------------------------------

    def counter(self, counter_label: str) -> int | None:
        """The value of a monotonic counter kept in the token, None if there is none."""
        return self._call(lambda session: _read_counter(session, counter_label))

    def has_counters(self) -> bool:
        """True if the token keeps any rollback counter (it already serves a vault)."""
        return self._call(lambda session: any(
            str(obj[Attribute.LABEL]).startswith(COUNTER_PREFIX)
            for obj in session.get_objects({Attribute.CLASS: ObjectClass.DATA})))

    def set_counter(self, counter_label: str, value: int, backward: bool = False) -> int:
        """Raise the counter to ``value`` (never lower unless ``backward``); returns it."""
        return self._call(lambda session: _raise_counter(session, counter_label, value, backward))


def _read_counter(session: pkcs11.Session, counter_label: str) -> int | None:
    values = [_COUNTER.unpack(bytes(obj[Attribute.VALUE]))[0]
              for obj in _counter_objects(session, counter_label)]
    return max(values, default=None)


def _raise_counter(session: pkcs11.Session, counter_label: str, value: int,
                   backward: bool) -> int:
    """SoftHSM refuses to change a data object's CKA_VALUE, so the new value is a new
    object and the old ones are destroyed after it exists: a crash in between leaves
    two, and readers take the larger."""
    old = _counter_objects(session, counter_label)
    current = max((_COUNTER.unpack(bytes(o[Attribute.VALUE]))[0] for o in old), default=None)
    if current is not None and (current == value or (current > value and not backward)):
        return int(current)
    session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                           Attribute.PRIVATE: True, Attribute.MODIFIABLE: False,
                           Attribute.LABEL: counter_label, Attribute.APPLICATION: "vault",
                           Attribute.VALUE: _COUNTER.pack(value)})
    for obj in old:
        obj.destroy()
    return value
