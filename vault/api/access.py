"""Who may call what: roles from client certificates, and per-client rate limits.

With TLS, the server requires a client certificate signed by the configured client CA
(mutual TLS); a client without one is refused in the handshake. The caller's identity is
the certificate's common name and its roles are its organizational unit (OU) values:

- ``enroller``: Enroll, ImportTemplates
- ``matcher``: Match, decisions only
- ``analyst``: Match, and the only role that may ask for scores (``release_scores``:
  threshold tuning, benchmarks), within its score budget (:mod:`vault.api.budget`)
- ``admin``: CreateCollection, UpdateCollection, DeleteCollection, DeleteSubject, UnlockSubject, the key
  lifecycle, and Enroll with ``allow_new_face``
- any role: GetCollection, ListCollections

A call that reaches a method without a verified certificate gets UNAUTHENTICATED; one
whose certificate lacks the method's role gets PERMISSION_DENIED. Without TLS (the
embedded default, loopback only) every caller has every role: the server says so at
start.

Rate limits: a token bucket per caller identity (without TLS: the peer address without
its port, so that a new connection per call does not get a new bucket), refilled at
``rate`` calls per second up to ``2 * rate``; a call beyond it gets RESOURCE_EXHAUSTED
with how long to wait.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from vault.domain.errors import PermissionDenied, ResourceExhausted, Unauthenticated

ROLES = frozenset({"enroller", "matcher", "analyst", "admin"})
SCORE_ROLES = frozenset({"analyst"})
METHOD_ROLES: dict[str, frozenset[str]] = {
    "Enroll": frozenset({"enroller", "admin"}),  # admins: a new face (allow_new_face)
    "ImportTemplates": frozenset({"enroller"}),
    "Match": frozenset({"matcher", "analyst"}),
    "GetCollection": ROLES,
    "CreateCollection": frozenset({"admin"}),
    "UpdateCollection": frozenset({"admin"}),
    "ListCollections": ROLES,  # what any role may GetCollection
    "DeleteCollection": frozenset({"admin"}),
    "DeleteSubject": frozenset({"admin"}),
    "ListKeyVersions": frozenset({"admin"}),
    "RotateMasterKey": frozenset({"admin"}),
    "RewrapKeys": frozenset({"admin"}),
    "RotateCollectionKey": frozenset({"admin"}),
    "GetKeyJob": frozenset({"admin"}),
    "SetMinKeyVersion": frozenset({"admin"}),
    "UnlockSubject": frozenset({"admin"}),
}


@dataclass(frozen=True)
class Caller:
    """Who is calling: an identity (certificate CN, or the peer address without TLS) and
    the roles it holds."""

    identity: str
    roles: frozenset[str]


def caller(context: grpc.ServicerContext, tls: bool) -> Caller:
    """The caller of an RPC; UNAUTHENTICATED on a TLS server without a verified cert."""
    if not tls:
        return Caller(peer_address(context.peer() or ""), ROLES)
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        raise Unauthenticated("a client certificate signed by the vault's client CA is required")
    cert = x509.load_pem_x509_certificate(pems[0])
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    identity = str(names[0].value) if names else cert.subject.rfc4514_string()
    return Caller(identity, frozenset(str(u.value) for u in units) & ROLES)


def credential(who: Caller, tls: bool) -> str:
    """What attempt limits count per: the certificate's identity; without TLS (loopback,
    where peer addresses change with every connection) one shared local credential."""
    return who.identity if tls else "local"


def peer_address(peer: str) -> str:
    """``ipv4:10.0.0.1:5123`` -> ``ipv4:10.0.0.1``, ``ipv6:[::1]:5123`` -> ``ipv6:[::1]``."""
    scheme, _, rest = peer.partition(":")
    if scheme in ("ipv4", "ipv6") and ":" in rest:
        return f"{scheme}:{rest.rsplit(':', 1)[0]}"
    return peer


def authorize_scores(who: Caller) -> None:
    """PERMISSION_DENIED unless ``who`` may ask for scores."""
    if not SCORE_ROLES & who.roles:
        held = ", ".join(sorted(who.roles)) or "none"
        raise PermissionDenied("release_scores needs the role analyst; this client "
                               f"certificate has: {held}")


def authorize(who: Caller, method: str) -> None:
    """PERMISSION_DENIED unless ``who`` holds a role the method needs."""
    needed = METHOD_ROLES.get(method, frozenset({"admin"}))
    if not needed & who.roles:
        held = ", ".join(sorted(who.roles)) or "none"
        raise PermissionDenied(f"{method} needs the role {' or '.join(sorted(needed))}; "
                               f"this client certificate has: {held}")


class RateLimiter:
    """Token buckets per caller identity (at most ``max_clients`` remembered)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = 2 * rate
        self._clock = clock
        self._max = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, identity: str) -> None:
        """Spend one token of ``identity``; RESOURCE_EXHAUSTED when there is none."""
        if self.rate <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(identity, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1:
                self._buckets[identity] = (tokens, now)
                wait = math.ceil((1 - tokens) / self.rate * 1000)
                raise ResourceExhausted(f"rate limit of {self.rate:g} calls/s per client reached; "
                                        f"retry in {wait} ms")
            self._buckets[identity] = (tokens - 1, now)
            while len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
