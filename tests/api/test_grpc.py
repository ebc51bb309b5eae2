"""The gRPC contract, against a real `vault serve` process on 127.0.0.1."""

from __future__ import annotations

import ctypes
import json
import math
import os
import platform
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vault.he.params import SCORE_ERROR_BOUND
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 32
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[vault_pb2_grpc.TemplateVaultStub]:
    with server.channel() as channel:
        yield vault_pb2_grpc.TemplateVaultStub(channel)


@pytest.fixture
def collection(stub: vault_pb2_grpc.TemplateVaultStub) -> str:
    cid = f"c-{uuid.uuid4().hex[:12]}"
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, dimension=DIM, threshold=0.8))
    return cid


def _face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM)


def _capture(seed: int, noise_seed: int, noise: float = 0.3) -> list[float]:
    n = np.random.default_rng(10_000 + noise_seed).standard_normal(DIM)
    return (_face(seed) + noise * n).astype(np.float32).tolist()


def _cos(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a, float), np.asarray(b, float)
    return float(a_ @ b_ / np.linalg.norm(a_) / np.linalg.norm(b_))


def _status(call, request) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call(request, timeout=30)
    return err.value.code(), err.value.details()


def test_collection_lifecycle(stub, collection: str) -> None:
    got = stub.GetCollection(pb.GetCollectionRequest(collection_id=collection))
    assert (got.dimension, got.key_version, got.template_count) == (DIM, 1, 0)
    assert got.threshold == pytest.approx(0.8)
    code, msg = _status(stub.CreateCollection, pb.CreateCollectionRequest(
        collection_id=collection, dimension=DIM, threshold=0.5))
    assert code == Code.ALREADY_EXISTS and "exists" in msg
    code, msg = _status(stub.GetCollection, pb.GetCollectionRequest(collection_id="nope"))
    assert code == Code.NOT_FOUND and "collection" in msg


def test_enroll_verify_identify_delete(stub, collection: str) -> None:
    loose = collection + "-any"  # an admin's collection that accepts everyone
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id=loose, dimension=DIM,
                                                     threshold=-1.0))
    for subject in range(6):
        for sample in range(2):  # a subject may hold several templates
            for cid in (collection, loose):
                r = stub.Enroll(pb.EnrollRequest(collection_id=cid, subject_id=f"s{subject}",
                                                 embedding=_capture(subject, subject * 10 + sample)))
                assert r.key_version == 1 and len(r.template_id) == 32
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 12

    probe = _capture(3, 99)
    expected = max(_cos(probe, _capture(3, 30)), _cos(probe, _capture(3, 31)))
    genuine = stub.Match(pb.MatchRequest(collection_id=collection, subject_id="s3", embedding=probe))
    assert genuine.matched and not genuine.scores_released
    assert [c.subject_id for c in genuine.candidates] == ["s3"]
    assert genuine.candidates[0].score == 0  # decisions only by default
    scored = stub.Match(pb.MatchRequest(collection_id=collection, subject_id="s3", embedding=probe,
                                        release_scores=True))  # without TLS: every role
    assert scored.matched and scored.scores_released
    assert abs(scored.candidates[0].score - expected) <= 0.01 + SCORE_ERROR_BOUND
    assert round(scored.candidates[0].score, 2) == pytest.approx(scored.candidates[0].score, abs=1e-6)

    impostor = stub.Match(pb.MatchRequest(collection_id=collection, subject_id="s4", embedding=probe))
    assert not impostor.matched and not impostor.candidates  # no score for a rejection

    ident = stub.Match(pb.MatchRequest(collection_id=collection, embedding=probe, top_k=3))
    assert ident.matched and ident.candidates[0].subject_id == "s3"
    ident = stub.Match(pb.MatchRequest(collection_id=collection, embedding=probe, top_k=3,
                                       release_scores=True))
    assert all(c.score >= 0.8 - 1e-6 for c in ident.candidates)

    # A collection with a lower threshold admits more subjects, best first, at most top_k.
    wide = stub.Match(pb.MatchRequest(collection_id=loose, embedding=probe, top_k=4,
                                      release_scores=True))
    scores = [c.score for c in wide.candidates]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert len({c.subject_id for c in wide.candidates}) == 4

    deleted = stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id=collection, subject_id="s3"))
    assert deleted.deleted_templates == 2
    stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id=loose, subject_id="s3"))
    after = stub.Match(pb.MatchRequest(collection_id=loose, embedding=probe, top_k=10))
    assert len(after.candidates) == 5 and "s3" not in {c.subject_id for c in after.candidates}
    code, _ = _status(stub.Match, pb.MatchRequest(collection_id=collection, subject_id="s3",
                                                  embedding=probe))
    assert code == Code.NOT_FOUND
    code, _ = _status(stub.DeleteSubject, pb.DeleteSubjectRequest(collection_id=collection,
                                                                  subject_id="s3"))
    assert code == Code.NOT_FOUND
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 10


def test_request_id_makes_enroll_idempotent(stub, collection: str) -> None:
    req = pb.EnrollRequest(collection_id=collection, subject_id="a", embedding=_capture(1, 1),
                           request_id="req-1")
    first = stub.Enroll(req)
    again = stub.Enroll(req)
    assert first == again
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 1
    code, msg = _status(stub.Enroll, pb.EnrollRequest(
        collection_id=collection, subject_id="b", embedding=_capture(1, 1), request_id="req-1"))
    assert code == Code.ALREADY_EXISTS and "request_id" in msg


def test_identify_on_empty_collection(stub, collection: str) -> None:
    r = stub.Match(pb.MatchRequest(collection_id=collection, embedding=_capture(1, 1)))
    assert not r.matched and not r.candidates


GOOD = [1.0] * DIM


@pytest.mark.parametrize("make, field", [
    (lambda c: pb.CreateCollectionRequest(collection_id="", dimension=8, threshold=0.5), "collection_id"),
    (lambda c: pb.CreateCollectionRequest(collection_id="bad id!", dimension=8, threshold=0.5), "collection_id"),
    (lambda c: pb.CreateCollectionRequest(collection_id="x" * 65, dimension=8, threshold=0.5), "collection_id"),
    (lambda c: pb.CreateCollectionRequest(collection_id="ok", dimension=0, threshold=0.5), "dimension"),
    (lambda c: pb.CreateCollectionRequest(collection_id="ok", dimension=5000, threshold=0.5), "dimension"),
    (lambda c: pb.CreateCollectionRequest(collection_id="ok", dimension=8, threshold=1.5), "threshold"),
    (lambda c: pb.CreateCollectionRequest(collection_id="ok", dimension=8, threshold=math.nan), "threshold"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="s", embedding=[1.0] * (DIM - 1)), "embedding"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="s", embedding=[math.nan] + GOOD[1:]), "embedding"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="s", embedding=[math.inf] + GOOD[1:]), "embedding"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="s", embedding=[0.0] * DIM), "embedding"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="", embedding=GOOD), "subject_id"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="s" * 257, embedding=GOOD), "subject_id"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="a\x00b", embedding=GOOD), "subject_id"),
    (lambda c: pb.EnrollRequest(collection_id=c, subject_id="s", embedding=GOOD, request_id="r" * 129), "request_id"),
    (lambda c: pb.MatchRequest(collection_id=c, embedding=GOOD, top_k=11), "top_k"),
    (lambda c: pb.MatchRequest(collection_id=c, embedding=GOOD, purpose="x" * 129), "purpose"),
    (lambda c: pb.MatchRequest(collection_id=c, embedding=GOOD, purpose="case\n42"), "purpose"),
    (lambda c: pb.MatchRequest(collection_id=c, subject_id="s", embedding=GOOD, top_k=5), "top_k"),
    (lambda c: pb.MatchRequest(collection_id=c, embedding=[0.0] * DIM), "embedding"),
    (lambda c: pb.DeleteSubjectRequest(collection_id=c, subject_id=""), "subject_id"),
])
def test_invalid_arguments_name_the_field_and_change_nothing(stub, collection: str, make, field: str) -> None:
    request = make(collection)
    method = {pb.CreateCollectionRequest: stub.CreateCollection, pb.EnrollRequest: stub.Enroll,
              pb.MatchRequest: stub.Match, pb.DeleteSubjectRequest: stub.DeleteSubject}[type(request)]
    code, msg = _status(method, request)
    assert code == Code.INVALID_ARGUMENT
    assert field in msg
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 0
    if isinstance(request, pb.CreateCollectionRequest) and request.collection_id == "ok":
        code, _ = _status(stub.GetCollection, pb.GetCollectionRequest(collection_id="ok"))
        assert code == Code.NOT_FOUND


def test_unknown_collection_and_subject(stub, collection: str) -> None:
    for request, method in [
        (pb.EnrollRequest(collection_id="missing", subject_id="s", embedding=GOOD), stub.Enroll),
        (pb.MatchRequest(collection_id="missing", embedding=GOOD), stub.Match),
        (pb.DeleteSubjectRequest(collection_id="missing", subject_id="s"), stub.DeleteSubject),
        (pb.MatchRequest(collection_id=collection, subject_id="nobody", embedding=GOOD), stub.Match),
    ]:
        code, msg = _status(method, request)
        assert code == Code.NOT_FOUND
        assert "nobody" not in msg


def test_oversize_message_is_resource_exhausted(stub, collection: str) -> None:
    code, _ = _status(stub.Enroll, pb.EnrollRequest(collection_id=collection, subject_id="s",
                                                    embedding=[1.0] * 400_000))
    assert code == Code.RESOURCE_EXHAUSTED


def test_garbage_bytes_are_rejected_without_unknown(server: ServerProcess) -> None:
    with server.channel() as channel:
        raw = channel.unary_unary("/vault.v1.TemplateVault/Enroll",
                                  request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            raw(b"\xff\xff\xff\xff garbage", timeout=10)
        assert err.value.code() in (Code.INTERNAL, Code.INVALID_ARGUMENT)


def test_health_and_reflection(server: ServerProcess) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "vault.v1.TemplateVault"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        (resp,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in resp.list_services_response.service}
        assert {"vault.v1.TemplateVault", "grpc.health.v1.Health"} <= names


def test_sigterm_shuts_down_cleanly_and_data_survives(tmp_path) -> None:
    s = ServerProcess(tmp_path / "data").start()
    with s.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM, threshold=0.8))
        stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="a", embedding=_capture(1, 1)))
    assert s.stop() == 0
    s.start()
    try:
        with s.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            r = stub.Match(pb.MatchRequest(collection_id="c", subject_id="a", embedding=_capture(1, 2)))
            assert r.matched
    finally:
        assert s.stop() == 0


_SYS_TGKILL = {"x86_64": 234, "aarch64": 131}


@pytest.mark.skipif(platform.machine() not in _SYS_TGKILL, reason="tgkill number unknown here")
def test_sigterm_caught_by_another_thread_still_shuts_down(tmp_path) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads; the server must stop
    whichever one catches it (an untimed Event.wait in the main thread never woke up)."""
    s = ServerProcess(tmp_path / "data").start()
    pid = s.proc.pid
    others = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    assert others, "the server runs gRPC threads"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(_SYS_TGKILL[platform.machine()], pid, others[-1], signal.SIGTERM) == 0, ctypes.get_errno()
    try:
        assert s.proc.wait(timeout=20) == 0
    finally:
        s.kill()


def test_failed_verifications_lock_the_subject(stub, collection: str) -> None:
    stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="target-7",
                                 embedding=_face(500).tolist()))
    stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="other",
                                 embedding=_face(501).tolist()))
    for attempt in range(5):  # the server's default limit, as Face ID
        assert not stub.Match(pb.MatchRequest(collection_id=collection, subject_id="target-7",
                                              embedding=_face(600 + attempt).tolist())).matched
    with pytest.raises(grpc.RpcError) as err:
        stub.Match(pb.MatchRequest(collection_id=collection, subject_id="target-7",
                                   embedding=_face(500).tolist()))
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert "too many failed verifications" in err.value.details()
    assert "target-7" not in err.value.details()
    assert stub.Match(pb.MatchRequest(collection_id=collection, subject_id="other",
                                      embedding=_face(501).tolist())).matched


def _import(stub, messages: list[pb.ImportTemplatesRequest]) -> dict[int, pb.ImportResult]:
    out = {}
    for response in stub.ImportTemplates(iter(messages), timeout=120):
        for r in response.results:
            assert r.index not in out
            out[r.index] = r
    return out


def test_import_stream_answers_every_item(stub, collection: str) -> None:
    items = [pb.ImportItem(subject_id=f"i{k}", embedding=_capture(100 + k, k), request_id=f"q{k}")
             for k in range(30)]
    items[4] = pb.ImportItem(subject_id="bad", embedding=[1.0] * (DIM + 1), request_id="q-bad")
    messages = [pb.ImportTemplatesRequest(collection_id=collection, items=items[k:k + 8])
                for k in range(0, len(items), 8)]
    results = _import(stub, messages)
    assert sorted(results) == list(range(30))
    assert results[4].code == Code.INVALID_ARGUMENT.value[0] and "dimension" in results[4].message
    assert all(results[k].code == 0 and len(results[k].template_id) == 32 for k in results if k != 4)
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 29
    r = stub.Match(pb.MatchRequest(collection_id=collection, embedding=_capture(107, 99), top_k=1))
    assert [c.subject_id for c in r.candidates] == ["i7"]
    again = _import(stub, messages)  # a retried stream: the same answers, nothing new
    assert all(again[k].template_id == results[k].template_id for k in results if k != 4)
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 29


def test_import_stream_errors(stub, collection: str) -> None:
    item = pb.ImportItem(subject_id="x", embedding=_capture(1, 1))
    with pytest.raises(grpc.RpcError) as err:
        _import(stub, [pb.ImportTemplatesRequest(collection_id="nope", items=[item])])
    assert err.value.code() == Code.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        _import(stub, [pb.ImportTemplatesRequest(collection_id=collection, items=[item]),
                       pb.ImportTemplatesRequest(collection_id="other", items=[item])])
    assert err.value.code() == Code.INVALID_ARGUMENT and "same in every message" in err.value.details()
    huge = [pb.ImportItem(subject_id=f"h{k}", embedding=[0.5] * DIM) for k in range(9000)]
    with pytest.raises(grpc.RpcError) as err:
        _import(stub, [pb.ImportTemplatesRequest(collection_id=collection, items=huge)])
    assert err.value.code() == Code.RESOURCE_EXHAUSTED
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 0


def test_vault_import_command(server: ServerProcess, stub, collection: str, tmp_path) -> None:
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((300, DIM)).astype(np.float32)
    emb[17] = np.nan
    path = tmp_path / "faces.npz"
    np.savez(path, embeddings=emb, subject_ids=np.array([f"f{k}" for k in range(300)]))
    cmd = [sys.executable, "-m", "vault", "import", str(path), "--collection", collection,
           "--target", server.target, "--batch", "64"]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr  # one item failed
    assert "299 new, 0 already stored, 1 failed, of 300 items" in out.stdout
    assert "1 x embedding contains NaN or infinite values" in out.stdout
    progress = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert progress and progress[-1]["count"] == 300  # not a terminal: JSON progress lines
    steps = [line["count"] for line in progress
             if line["event"] == "progress" and line["kind"] == "sent"]
    assert steps == sorted(set(steps)) and len(steps) >= 5  # moves as items go out
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)  # derived request ids
    assert "0 new, 299 already stored, 1 failed, of 300 items" in again.stdout
    assert stub.GetCollection(pb.GetCollectionRequest(collection_id=collection)).template_count == 299
