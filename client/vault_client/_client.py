"""``VaultClient``: one channel to the vault and a typed method per call."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from vault_client.v1 import vault_pb2 as pb
from vault_client.v1 import vault_pb2_grpc

SERVICE = "vault.v1.TemplateVault"
# Safe to send twice: Enroll always carries a request id (the server answers a repeat with
# the first answer and stores nothing), the others only read. Match is left out on
# purpose: a failed 1:1 attempt counts against the subject's lock and the budgets.
IDEMPOTENT = ("Enroll", "GetCollection", "ListCollections", "ListKeyVersions", "GetKeyJob")
DEFAULT_TIMEOUT = 30.0
MAX_BATCH = 256  # items per ImportTemplates message: 256 x 512 floats stays under 1 MiB

Embedding = Sequence[float]


def retry_service_config(attempts: int = 4, replicas: bool = False) -> str:
    """gRPC service config (JSON) retrying the idempotent calls on UNAVAILABLE;
    ``replicas``: calls go round the target's addresses (a standby answers an enrollment
    UNAVAILABLE, and the retry reaches the next replica, the primary in the end)."""
    balance = {"loadBalancingConfig": [{"round_robin": {}}]} if replicas else {}
    return json.dumps({**balance, "methodConfig": [{
        "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT],
        "retryPolicy": {"maxAttempts": attempts, "initialBackoff": "0.2s",
                        "maxBackoff": "3s", "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"]},
    }]})


def item_request_id(collection_id: str, subject_id: str, embedding: Embedding) -> str:
    """A request id for one import item, from what it is: the same item sent again is a
    retry, a second capture of the same subject is a new item (never key it by subject)."""
    digest = hashlib.sha256(collection_id.encode() + b"\0" + subject_id.encode() + b"\0")
    digest.update(struct.pack(f"<{len(embedding)}f", *map(float, embedding)))
    return "item-" + digest.hexdigest()[:32]


@dataclass(frozen=True)
class Collection:
    collection_id: str
    dimension: int
    threshold: float
    key_version: int
    template_count: int
    require_purpose: bool


@dataclass(frozen=True)
class Enrolled:
    template_id: str
    key_version: int


@dataclass(frozen=True)
class Candidate:
    subject_id: str
    score: float | None  # only when scores were released (analyst), 2 decimals


@dataclass
class ImportReport:
    """What an import stored: ``new`` + ``replayed`` items are stored, ``failed`` are not
    (``errors``: message -> count)."""

    total: int
    new: int = 0
    replayed: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def stored(self) -> int:
        return self.new + self.replayed

    def summary(self) -> str:
        return f"{self.new} new, {self.replayed} already stored, {self.failed} failed"


def _read(value: str | bytes | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _floats(embedding: Embedding) -> list[float]:
    return [float(x) for x in embedding]


class CollectionList(list[Collection]):
    """Collections served, by id; ``damaged`` maps each collection the vault will not
    serve (its record failed its integrity check) to the reason, so none goes unseen."""

    def __init__(self) -> None:
        super().__init__()
        self.damaged: dict[str, str] = {}


def _collection(c: pb.Collection) -> Collection:
    return Collection(c.collection_id, c.dimension, round(c.threshold, 4), c.key_version,
                      c.template_count, c.require_purpose)


class VaultClient:
    """A connection to the vault. ``tls_ca`` (with ``tls_cert`` and ``tls_key``, whose
    certificate's OU values are the caller's roles) makes it mutual TLS; paths or PEM
    bytes. ``timeout``: each call's deadline in seconds unless the call gives its own.
    ``target``: one address, or the replicas of one vault (``ipv4:HOST:PORT,HOST:PORT``):
    calls then go round them, and an enrollment a standby refuses is retried on the next."""

    def __init__(self, target: str = "127.0.0.1:50051", *, tls_ca: str | bytes | Path | None = None,
                 tls_cert: str | bytes | Path | None = None,
                 tls_key: str | bytes | Path | None = None, server_name: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retry_attempts: int = 4) -> None:
        options = [("grpc.enable_retries", 1),
                   # Several replicas ("ipv4:HOST:PORT,HOST:PORT", or a name with several
                   # addresses listed with commas): round robin, retried on the next one.
                   ("grpc.service_config", retry_service_config(retry_attempts,
                                                                replicas="," in target)),
                   ("grpc.max_send_message_length", 1 << 20)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(_read(tls_ca), _read(tls_key), _read(tls_cert))
            self.channel = grpc.secure_channel(target, creds, options=options)
        self.stub = vault_pb2_grpc.TemplateVaultStub(self.channel)
        self.timeout = timeout

    @classmethod
    def from_env(cls, **kwargs: object) -> VaultClient:
        """From VAULT_TARGET (or VAULT_LISTEN), VAULT_TLS_CA, VAULT_TLS_CLIENT_CERT and
        VAULT_TLS_CLIENT_KEY, as the ``vault`` command line reads them."""
        env = os.environ.get
        return cls(env("VAULT_TARGET") or env("VAULT_LISTEN", "127.0.0.1:50051"),
                   tls_ca=env("VAULT_TLS_CA"), tls_cert=env("VAULT_TLS_CLIENT_CERT"),
                   tls_key=env("VAULT_TLS_CLIENT_KEY"), **kwargs)  # type: ignore[arg-type]

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> VaultClient:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _t(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def create_collection(self, collection_id: str, dimension: int,
                          threshold: float | None = None, *, require_purpose: bool = False,
                          reference_mean: Embedding | None = None,
                          timeout: float | None = None) -> Collection:
        """Create a collection (admin). ``threshold`` is required by the server: left None,
        the request goes without one and the server answers INVALID_ARGUMENT."""
        request = pb.CreateCollectionRequest(collection_id=collection_id, dimension=dimension,
                                             require_purpose=require_purpose,
                                             reference_mean=_floats(reference_mean or []))
        if threshold is not None:
            request.threshold = threshold
        return _collection(self.stub.CreateCollection(request, timeout=self._t(timeout)))

    def get_collection(self, collection_id: str, *, timeout: float | None = None) -> Collection:
        return _collection(self.stub.GetCollection(
            pb.GetCollectionRequest(collection_id=collection_id), timeout=self._t(timeout)))

    def list_collections(self, *, page_size: int = 0,
                         timeout: float | None = None) -> CollectionList:
        """Every collection, by id (all pages of ListCollections); those the vault found
        damaged are in the answer's ``damaged`` (id -> reason), not among the served."""
        found, token = CollectionList(), ""
        while True:
            page = self.stub.ListCollections(pb.ListCollectionsRequest(
                page_size=page_size, page_token=token), timeout=self._t(timeout))
            found += [_collection(c) for c in page.collections]
            found.damaged.update({d.collection_id: d.reason for d in page.damaged})
            token = page.next_page_token
            if not token:
                return found

    def delete_collection(self, collection_id: str, *, timeout: float | None = None) -> int:
        """Crypto-shred a collection (admin); returns how many templates it held. Rotate
        the master key afterwards so old backups cannot open it either."""
        return int(self.stub.DeleteCollection(pb.DeleteCollectionRequest(
            collection_id=collection_id), timeout=self._t(timeout)).templates_deleted)

    def enroll(self, collection_id: str, subject_id: str, embedding: Embedding, *,
               request_id: str | None = None, allow_new_face: bool = False,
               timeout: float | None = None) -> Enrolled:
        """Enroll one embedding. Without ``request_id`` a fresh one is drawn, so gRPC's own
        retries of this call store it once; pass your own to make your retries safe too."""
        r = self.stub.Enroll(pb.EnrollRequest(
            collection_id=collection_id, subject_id=subject_id, embedding=_floats(embedding),
            request_id=request_id or uuid.uuid4().hex, allow_new_face=allow_new_face),
            timeout=self._t(timeout))
        return Enrolled(r.template_id, r.key_version)

    def verify(self, collection_id: str, subject_id: str, embedding: Embedding, *,
               purpose: str = "", timeout: float | None = None) -> bool:
        """1:1: does the probe match ``subject_id`` at the collection's threshold?"""
        r = self.stub.Match(pb.MatchRequest(collection_id=collection_id, subject_id=subject_id,
                                            embedding=_floats(embedding), purpose=purpose),
                            timeout=self._t(timeout))
        return r.matched

    def identify(self, collection_id: str, embedding: Embedding, top_k: int = 1, *,
                 purpose: str = "", release_scores: bool = False,
                 timeout: float | None = None) -> list[Candidate]:
        """1:N: the subjects above the collection's threshold, best first (at most
        ``top_k``). Scores only with ``release_scores`` and the analyst role."""
        r = self.stub.Match(pb.MatchRequest(collection_id=collection_id,
                                            embedding=_floats(embedding), top_k=top_k,
                                            purpose=purpose, release_scores=release_scores),
                            timeout=self._t(timeout))
        return [Candidate(c.subject_id, round(c.score, 2) if r.scores_released else None)
                for c in r.candidates]

    def delete_subject(self, collection_id: str, subject_id: str, *,
                       timeout: float | None = None) -> int:
        """Delete every template of the subject; returns how many."""
        return self.stub.DeleteSubject(pb.DeleteSubjectRequest(
            collection_id=collection_id, subject_id=subject_id),
            timeout=self._t(timeout)).deleted_templates

    def import_templates(self, collection_id: str,
                         items: Iterable[tuple[str, Embedding] | tuple[str, Embedding, str]], *,
                         batch: int = MAX_BATCH, timeout: float | None = 3600.0,
                         on_progress: Callable[[int, int], None] | None = None,
                         attempts: int = 3) -> ImportReport:
        """Stream ``(subject_id, embedding[, request_id])`` items into a collection.

        Items without a request id get :func:`item_request_id`. An import cut off by
        UNAVAILABLE is sent again (up to ``attempts`` times): what the cut-off pass stored
        comes back as replayed and is counted as new. ``on_progress(done, total)`` after
        each answer."""
        listed = [(s, _floats(e), (rest[0] if rest else "")) for s, e, *rest in items]
        prepared = [(s, e, r or item_request_id(collection_id, s, e)) for s, e, r in listed]
        stored_new: set[int] = set()
        for attempt in range(attempts):
            report = ImportReport(total=len(prepared))
            try:
                for response in self.stub.ImportTemplates(
                        self._batches(collection_id, prepared, batch), timeout=timeout):
                    for result in response.results:
                        self._count(report, result, stored_new)
                    if on_progress is not None:
                        on_progress(report.stored + report.failed, report.total)
                return report
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == attempts:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _count(report: ImportReport, result: pb.ImportResult, stored_new: set[int]) -> None:
        if result.code != 0:
            report.failed += 1
            report.errors[result.message] = report.errors.get(result.message, 0) + 1
        elif result.replayed and result.index not in stored_new:
            report.replayed += 1
        else:
            stored_new.add(result.index)
            report.new += 1

    @staticmethod
    def _batches(collection_id: str, items: list[tuple[str, list[float], str]],
                 batch: int) -> Iterator[pb.ImportTemplatesRequest]:
        for start in range(0, len(items), batch):
            msg = pb.ImportTemplatesRequest(collection_id=collection_id)
            for subject_id, embedding, request_id in items[start:start + batch]:
                msg.items.add(subject_id=subject_id, embedding=embedding, request_id=request_id)
            yield msg
