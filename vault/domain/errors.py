"""Errors the vault raises on purpose. No transport here: vault.api.status maps each class
to its gRPC status at the edge, so that store, HSM and decider do not depend on grpc.

Messages are written for the caller and must never contain biometric data, subject ids,
scores or key material: they name the field or the condition, nothing more.
"""

from __future__ import annotations


class VaultError(Exception):
    """Base class: a failure of a precise kind and a safe message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(VaultError):
    """The request is malformed: the message names the field."""


class NotFound(VaultError):
    """The named collection, subject or job does not exist."""


class AlreadyExists(VaultError):
    """The collection or request id exists already."""


class Unauthenticated(VaultError):
    """No valid credential."""


class PermissionDenied(VaultError):
    """The credential may not do this."""


class FailedPrecondition(VaultError):
    """The vault's state refuses the request until something changes."""


class ResourceExhausted(VaultError):
    """A budget or attempt limit is used up."""


class Unavailable(VaultError):
    """A dependency is down for now: retrying may succeed."""


class HsmUnavailable(Unavailable):
    """The PKCS#11 token cannot be reached (module, token, PIN or session)."""


class HsmPinRejected(HsmUnavailable):
    """The token refused the PIN. Not retried by itself: real HSMs lock after a few tries."""


class Refused(FailedPrecondition):
    """The vault must not serve in this configuration until an operator acts: the server
    exits with this message rather than waiting (token placement, binding, rollback)."""


class WrongToken(Refused):
    """The token answers but is not the one this data directory was made with."""


class Cancelled(VaultError):
    """The caller went away (deadline or cancellation): the work was abandoned."""


class DataLoss(VaultError):
    """Stored data failed an integrity check (MAC mismatch, tampered or replayed row)."""
