"""Errors the vault raises on purpose, each tied to one gRPC status.

Messages are written for the caller and must never contain biometric data, subject ids,
scores or key material: they name the field or the condition, nothing more.
"""

from __future__ import annotations

import grpc


class VaultError(Exception):
    """Base class: a failure with a precise gRPC status and a safe message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(VaultError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VaultError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VaultError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(VaultError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(VaultError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(VaultError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(VaultError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(VaultError):
    code = grpc.StatusCode.UNAVAILABLE


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

    code = grpc.StatusCode.CANCELLED


class DataLoss(VaultError):
    """Stored data failed an integrity check (MAC mismatch, tampered or replayed row)."""

    code = grpc.StatusCode.DATA_LOSS
