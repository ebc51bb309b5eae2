"""``vault.v1.TemplateVault`` servicer: protobuf in, service call, protobuf out.

Every method runs through :func:`_guard`: a :class:`VaultError` becomes its precise status
and safe message; anything unexpected becomes INTERNAL with an opaque reference (logged
by exception type only), never UNKNOWN and never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from vault import logs
from vault.api import access
from vault.api.budget import Budgets, Tripped
from vault.api.codec import Undecodable
from vault.api.status import code_of
from vault.domain.errors import InvalidArgument, PermissionDenied, VaultError
from vault.domain.records import KeyJobRow
from vault.ops.imports import ImportItem, ImportResult
from vault.service import CollectionInfo, MatchResult, Vault
from vault.v1 import vault_pb2, vault_pb2_grpc
from vault.validation import check_collection_id, check_purpose, check_subject_id

log = logs.get("vault.api")
F = TypeVar("F", bound=Callable[..., Any])


def _abort(exc: Exception, name: str, context: grpc.ServicerContext,
           audit: _Audit | None) -> grpc.StatusCode:
    """Map a failure to its status, record it, and abort the call."""
    if isinstance(exc, VaultError):
        if audit is not None:
            audit.failed(code_of(exc))
        context.abort(code_of(exc), exc.message)
    if isinstance(exc, grpc.RpcError) or context.code() is not None:
        raise exc  # context.abort() itself, already carrying a status
    ref = secrets.token_hex(6)
    log.error("internal error", method=name, error_type=type(exc).__name__, ref=ref)
    if audit is not None:
        audit.failed(grpc.StatusCode.INTERNAL)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {ref})")
    raise AssertionError("unreachable")


def _code_of(exc: Exception) -> grpc.StatusCode:
    return code_of(exc) if isinstance(exc, VaultError) else grpc.StatusCode.INTERNAL


class _Call:
    """One RPC in progress: its audit entries once admitted, and for a stream, how many
    items it has stored (for its log line)."""

    def __init__(self) -> None:
        self.audit: _Audit | None = None
        self.count: Callable[[], int] | None = None


@contextlib.contextmanager
def _handled(name: str, context: grpc.ServicerContext) -> Iterator[_Call]:
    """The body of every RPC runs in here: a failure becomes its status (:func:`_abort`),
    and one log line records the outcome."""
    call = _Call()
    start = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield call
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        code = _code_of(exc)
        _abort(exc, name, context, call.audit)
    finally:
        fields = {} if call.count is None else {"count": call.count()}
        log.info("rpc", method=name, code=code.name,
                 duration_ms=round((time.perf_counter() - start) * 1e3, 2), **fields)


def _guard(method: F) -> F:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: TemplateVaultServicer, request: Any, context: grpc.ServicerContext) -> Any:
        with _handled(name, context) as call:
            call.audit = self._admit(name, request, context)
            response = method(self, request, context)
            if call.audit is not None:
                call.audit.end(response)
            return response

    return wrapper  # type: ignore[return-value]


class _Audit:
    """The two audit entries of one admitted RPC (see :mod:`vault.audit`): subjects as
    per-entry references only (:meth:`Vault.audit_subject_ref`)."""

    def __init__(self, vault: Vault, method: str, actor: str, collection_id: str,
                 subject_hmac: bytes | None, detail: dict[str, Any]) -> None:
        assert vault.audit is not None  # begin() makes none without an audit log
        self.vault, self.log, self.method, self.actor = vault, vault.audit, method, actor
        self.collection_id, self.subject_hmac, self.detail = collection_id, subject_hmac, detail
        self.ref = secrets.token_hex(8)

    @classmethod
    def begin(cls, vault: Vault, method: str, request: Any, actor: str) -> _Audit | None:
        """Write the request entry; raises (refusing the request) if it cannot be written."""
        if vault.audit is None:
            return None
        cid = getattr(request, "collection_id", "")
        try:
            cid = check_collection_id(cid)
        except VaultError:
            cid = "<invalid>" if cid else ""
        subject_hmac = None
        subject_id = getattr(request, "subject_id", "")
        if cid and cid != "<invalid>" and subject_id:
            try:
                subject_hmac = vault.integrity.subject_index(cid, check_subject_id(subject_id))
            except VaultError:
                pass  # invalid ids are refused by the method itself; nothing to index
        detail: dict[str, Any] = {}
        if isinstance(request, vault_pb2.UpdateCollectionRequest):  # what the admin set
            detail = {f: round(float(getattr(request, f)), 6) if f == "threshold"
                      else getattr(request, f)
                      for f in ("threshold", "require_purpose") if request.HasField(f)}
        if isinstance(request, vault_pb2.MatchRequest):
            detail = {"mode": "1:1" if subject_id else "1:N",
                      "release": "values" if request.release_scores else "decisions"}
            if request.purpose:  # validated by the method; bounded here for the record
                detail["purpose"] = request.purpose[:128]
        self = cls(vault, method, actor, cid, subject_hmac, detail)
        vault.audit.append("request", self.ref, self.actor, method, cid, self._refs(),
                           detail=self._detail())
        return self

    def _refs(self, hmacs: list[bytes] | None = None) -> list[bytes]:
        if hmacs is None:
            hmacs = [self.subject_hmac] if self.subject_hmac else []
        return [self.vault.audit_subject_ref(self.collection_id, h, self.ref) for h in hmacs]

    def _detail(self) -> str:
        return json.dumps(self.detail, sort_keys=True) if self.detail else ""

    def end(self, response: Any, outcome: str = "OK", result: MatchResult | None = None) -> None:
        """Write the response entry; if it cannot be written the answer is withheld."""
        refs = self._refs()
        if result is not None:
            outcome = "OK matched" if result.matched else "OK no_match"
            self.detail["threshold"] = round(float(result.threshold), 6)
            self.detail["candidates"] = len(result.candidates)
            if self.subject_hmac is None:  # 1:N: which subjects were named, never their scores
                refs = self._refs([c.subject_hmac for c in result.candidates])
        self.log.append("response", self.ref, self.actor, self.method,
                                self.collection_id, refs, outcome, self._detail())

    def alert(self, what: str) -> None:
        """An audited alert (the probing guard tripped) tied to this call."""
        self.log.append("alert", self.ref, self.actor, self.method, self.collection_id,
                                (), what, self._detail())

    def failed(self, code: grpc.StatusCode) -> None:
        try:
            self.log.append("response", self.ref, self.actor, self.method,
                                    self.collection_id, self._refs(), code.name, self._detail())
        except VaultError:
            pass  # the request fails anyway; the missing response entry shows in the log


def _collection(info: CollectionInfo) -> vault_pb2.Collection:
    return vault_pb2.Collection(collection_id=info.collection_id, dimension=info.dimension,
                                threshold=info.threshold, key_version=info.key_version,
                                template_count=info.template_count,
                                min_key_version=info.min_key_version,
                                require_purpose=info.require_purpose)


_JOB_STATES = {"running": vault_pb2.KeyJob.STATE_RUNNING, "done": vault_pb2.KeyJob.STATE_DONE,
               "failed": vault_pb2.KeyJob.STATE_FAILED}


def _job(job: KeyJobRow) -> vault_pb2.KeyJob:
    return vault_pb2.KeyJob(job_id=job.job_id, collection_id=job.collection_id,
                            from_version=job.from_version, to_version=job.to_version,
                            state=_JOB_STATES.get(job.state, vault_pb2.KeyJob.STATE_UNSPECIFIED),
                            blocks_done=job.blocks_done, blocks_total=job.blocks_total,
                            error=job.error or "")


def _rotation(result: tuple[int, int, list[int]]) -> vault_pb2.MasterKeyRotation:
    version, rewrapped, destroyed = result
    return vault_pb2.MasterKeyRotation(version=version, rewrapped=rewrapped,
                                       destroyed_versions=destroyed)


def _match(result: MatchResult) -> vault_pb2.MatchResponse:
    return vault_pb2.MatchResponse(
        matched=result.matched, scores_released=result.scores_released,
        candidates=[vault_pb2.Candidate(subject_id=c.subject_id, score=c.score or 0.0)
                    for c in result.candidates])


class TemplateVaultServicer(vault_pb2_grpc.TemplateVaultServicer):
    def __init__(self, vault: Vault | Callable[[], Vault], tls: bool = False,
                 limiter: access.RateLimiter | None = None, budgets: Budgets | None = None) -> None:
        # A callable gives the vault once it is open and raises UNAVAILABLE until then.
        self._vault: Callable[[], Vault] = (lambda: vault) if isinstance(vault, Vault) else vault
        self._tls = tls
        self._limiter = limiter or access.RateLimiter(0)
        self.budgets = budgets or Budgets()

    def _admit(self, method: str, request: Any, context: grpc.ServicerContext) -> _Audit | None:
        """Identify the caller and check its role, rate and budgets, then write the audit
        request entry. A refused call costs no fsync and no HSM call: it is counted into
        the audit log's next ``refused`` entry."""
        vault = self._vault()
        actor = f"unauthenticated {access.peer_address(context.peer() or '')}"
        try:
            who = access.caller(context, self._tls)
            actor = who.identity
            access.authorize(who, method)
            self._limiter.take(who.identity)
            if isinstance(request, vault_pb2.MatchRequest):
                self._admit_match(who, request)
        except VaultError as exc:
            if vault.audit is not None:
                cid = getattr(request, "collection_id", "")
                try:
                    cid = check_collection_id(cid) if cid else ""
                except VaultError:
                    cid = "<invalid>"
                vault.audit.refused(actor, method, cid, code_of(exc).name)
            raise
        return _Audit.begin(vault, method, request, actor)

    def _admit_match(self, who: access.Caller, request: vault_pb2.MatchRequest) -> None:
        """Scores only for the analyst role; the credential's budgets on this collection."""
        if request.release_scores:
            access.authorize_scores(who)
        try:
            cid = check_collection_id(request.collection_id)
        except VaultError:
            return  # the method refuses it with the precise message
        if not self._vault().has_collection(cid):
            # NOT_FOUND from the method, and no bucket: calls on made-up collection ids would
            # otherwise push the caller's own buckets out of the budgets' bounded memory.
            return
        self.budgets.check_blocked(who.identity, cid)
        self.budgets.take(who.identity, cid, "verify" if request.subject_id else "identify")
        if request.release_scores:
            self.budgets.take(who.identity, cid, "scores")

    def _who(self, context: grpc.ServicerContext) -> access.Caller:
        """The caller, again (``_admit`` has already authenticated it)."""
        return access.caller(context, self._tls)

    @_guard
    def CreateCollection(self, request: vault_pb2.CreateCollectionRequest,
                         context: grpc.ServicerContext) -> vault_pb2.Collection:
        threshold = request.threshold if request.HasField("threshold") else None
        return _collection(self._vault().create_collection(
            request.collection_id, request.dimension, threshold, request.reference_mean,
            request.require_purpose))

    @_guard
    def UpdateCollection(self, request: vault_pb2.UpdateCollectionRequest,
                         context: grpc.ServicerContext) -> vault_pb2.Collection:
        return _collection(self._vault().update_collection(
            request.collection_id,
            request.threshold if request.HasField("threshold") else None,
            request.require_purpose if request.HasField("require_purpose") else None))

    @_guard
    def ListCollections(self, request: vault_pb2.ListCollectionsRequest,
                        context: grpc.ServicerContext) -> vault_pb2.ListCollectionsResponse:
        page, damaged, token = self._vault().list_collections(request.page_size,
                                                              request.page_token)
        return vault_pb2.ListCollectionsResponse(
            collections=[_collection(c) for c in page], next_page_token=token,
            damaged=[vault_pb2.DamagedCollection(collection_id=cid, reason=reason)
                     for cid, reason in damaged.items()])

    @_guard
    def DeleteCollection(self, request: vault_pb2.DeleteCollectionRequest,
                         context: grpc.ServicerContext) -> vault_pb2.DeleteCollectionResponse:
        deleted = self._vault().delete_collection(request.collection_id)
        return vault_pb2.DeleteCollectionResponse(templates_deleted=deleted)

    @_guard
    def GetCollection(self, request: vault_pb2.GetCollectionRequest,
                      context: grpc.ServicerContext) -> vault_pb2.Collection:
        return _collection(self._vault().get_collection(request.collection_id))

    @_guard
    def Enroll(self, request: vault_pb2.EnrollRequest,
               context: grpc.ServicerContext) -> vault_pb2.EnrollResponse:
        who = self._who(context)
        if request.allow_new_face and "admin" not in who.roles:
            raise PermissionDenied("allow_new_face needs the role admin")
        if not request.allow_new_face and "enroller" not in who.roles:
            raise PermissionDenied("Enroll needs the role enroller (admin: with allow_new_face)")
        template_id, key_version = self._vault().enroll(
            request.collection_id, request.subject_id, request.embedding, request.request_id,
            credential=access.credential(who, self._tls), allow_new_face=request.allow_new_face)
        return vault_pb2.EnrollResponse(template_id=template_id, key_version=key_version)

    def Match(self, request: vault_pb2.MatchRequest,
              context: grpc.ServicerContext) -> vault_pb2.MatchResponse:
        """1:1 or 1:N at the collection's threshold; what leaves is the decider's call."""
        with _handled("Match", context) as call:
            call.audit = audit = self._admit("Match", request, context)
            identity = audit.actor if audit is not None else ""
            cid = request.collection_id

            def observe(probe: Any) -> None:
                try:
                    self.budgets.observe(identity, cid, probe)
                except Tripped:
                    log.warning("probing pattern detected", method="Match", collection_id=cid)
                    if audit is not None:
                        audit.alert("ALERT probing_detected")
                    raise

            # A client that gave up (deadline, cancel) stops the scoring between ciphertexts.
            cancelled = lambda: not context.is_active()
            if request.subject_id:
                if request.top_k > 1:
                    raise InvalidArgument("top_k applies to 1:N identification only "
                                          "(subject_id is set)")
                if request.purpose:
                    check_purpose(request.purpose)
                who = self._who(context)
                result = self._vault().verify(cid, request.subject_id, request.embedding,
                                              cancelled=cancelled,
                                              release_scores=request.release_scores,
                                              observe=observe,
                                              credential=access.credential(who, self._tls),
                                              reveal_unknown="admin" in who.roles)
            else:
                result = self._vault().identify(cid, request.embedding, request.top_k,
                                                cancelled=cancelled,
                                                release_scores=request.release_scores,
                                                purpose=request.purpose, observe=observe)
            response = _match(result)
            if audit is not None:
                audit.end(response, result=result)
            return response

    def ImportTemplates(self, requests: Any, context: grpc.ServicerContext) -> Any:
        """Bulk import (client stream of batches, server stream of per-item results)."""
        name = "ImportTemplates"
        session = None
        with _handled(name, context) as call:
            call.count = lambda: session.stored if session is not None else 0
            for request in requests:
                if isinstance(request, Undecodable):
                    raise InvalidArgument(f"request is not a valid {request.type_name}")
                if session is None:
                    call.audit = self._admit(name, request, context)
                    session = self._vault().start_import(request.collection_id)
                elif request.collection_id and request.collection_id != session.collection_id:
                    raise InvalidArgument("collection_id must be the same in every message of an import")
                yield from _import_responses(session.add(
                    [ImportItem(i.subject_id, i.embedding, i.request_id) for i in request.items]))
            if session is not None:
                results = session.finish()
                if call.audit is not None:
                    call.audit.end(None, f"OK stored={session.stored} failed={session.failed}")
                yield from _import_responses(results)

    @_guard
    def ListKeyVersions(self, request: vault_pb2.ListKeyVersionsRequest,
                        context: grpc.ServicerContext) -> vault_pb2.KeyVersions:
        vault = self._vault()
        versions, current = vault.master_key_versions()
        out = vault_pb2.KeyVersions(master_key_versions=versions, current_master_key_version=current)
        if request.collection_id:
            row, held, job = vault.key_versions(request.collection_id)
            out.collection_id = row.collection_id
            out.key_version, out.min_key_version = row.key_version, row.min_key_version
            out.key_versions.extend(held)
            if job is not None:
                out.job.CopyFrom(_job(job))
        return out

    @_guard
    def RotateMasterKey(self, request: vault_pb2.RotateMasterKeyRequest,
                        context: grpc.ServicerContext) -> vault_pb2.MasterKeyRotation:
        return _rotation(self._vault().rotate_master_key())

    @_guard
    def RewrapKeys(self, request: vault_pb2.RewrapKeysRequest,
                   context: grpc.ServicerContext) -> vault_pb2.MasterKeyRotation:
        return _rotation(self._vault().rewrap_keys())

    @_guard
    def RotateCollectionKey(self, request: vault_pb2.RotateCollectionKeyRequest,
                            context: grpc.ServicerContext) -> vault_pb2.KeyJob:
        return _job(self._vault().rotate_collection_key(request.collection_id))

    @_guard
    def GetKeyJob(self, request: vault_pb2.GetKeyJobRequest,
                  context: grpc.ServicerContext) -> vault_pb2.KeyJob:
        return _job(self._vault().key_job(request.job_id))

    @_guard
    def SetMinKeyVersion(self, request: vault_pb2.SetMinKeyVersionRequest,
                         context: grpc.ServicerContext) -> vault_pb2.Collection:
        vault = self._vault()
        vault.set_min_key_version(request.collection_id, request.min_key_version)
        return _collection(vault.get_collection_info(request.collection_id))

    @_guard
    def DeleteSubject(self, request: vault_pb2.DeleteSubjectRequest,
                      context: grpc.ServicerContext) -> vault_pb2.DeleteSubjectResponse:
        deleted = self._vault().delete_subject(request.collection_id, request.subject_id)
        return vault_pb2.DeleteSubjectResponse(deleted_templates=deleted)

    @_guard
    def UnlockSubject(self, request: vault_pb2.UnlockSubjectRequest,
                      context: grpc.ServicerContext) -> vault_pb2.UnlockSubjectResponse:
        unlocked = self._vault().unlock_subject(request.collection_id, request.subject_id)
        return vault_pb2.UnlockSubjectResponse(unlocked_credentials=unlocked)


# Results per response message: a chunk's results (tens of thousands) would exceed the
# 1 MiB message limit; 4,096 results are about 250 KiB even with error messages.
_RESULTS_PER_MESSAGE = 4096


def _import_responses(results: list[ImportResult]) -> Iterator[vault_pb2.ImportTemplatesResponse]:
    for start in range(0, len(results), _RESULTS_PER_MESSAGE):
        out = vault_pb2.ImportTemplatesResponse()
        for r in results[start:start + _RESULTS_PER_MESSAGE]:
            if r.error is None:
                out.results.add(index=r.index, template_id=r.template_id, key_version=r.key_version,
                                replayed=r.replayed)
            else:
                out.results.add(index=r.index, code=code_of(r.error).value[0], message=r.error.message)
        yield out
