"""Who a subject is: enrollment to an existing subject, unknown subjects, and ids that
look alike, tried through a real mTLS server with enroller, matcher and admin certificates."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from vault.testing import CertificateAuthority, ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def world(tmp_path_factory, lfw) -> Iterator[tuple[ServerProcess, CertificateAuthority, dict]]:
    root = tmp_path_factory.mktemp("subjects")
    pki = CertificateAuthority(root / "pki")
    pki.issue("enroll-svc", ("enroller",))
    pki.issue("gate", ("matcher",))
    pki.issue("ops", ("matcher", "admin"))
    emb, ids = lfw["emb"], lfw["ids"]
    people, counts = np.unique(ids, return_counts=True)
    several = people[counts > 1][:6]
    faces = {f"p{k}": [emb[i] for i in np.flatnonzero(ids == p)] for k, p in enumerate(several)}
    server = ServerProcess(root / "data", pki=pki, env={"VAULT_RATE_LIMIT": "0"})
    with server, server.channel() as channel:
        vault_pb2_grpc.TemplateVaultStub(channel).CreateCollection(
            pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.92))
        yield server, pki, faces


def _stub(server: ServerProcess, pki: CertificateAuthority, name: str):  # type: ignore[no-untyped-def]
    return vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, name))


def _call(method, request) -> tuple[Code, str, object]:  # type: ignore[no-untyped-def]
    try:
        return Code.OK, "", method(request, timeout=60)
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


def _count(server: ServerProcess) -> int:
    with server.channel() as channel:
        return vault_pb2_grpc.TemplateVaultStub(channel).GetCollection(
            pb.GetCollectionRequest(collection_id="c")).template_count


def test_an_enroller_cannot_attach_an_impostor_face_to_an_existing_subject(world, tmp_path) -> None:
    server, pki, faces = world
    enroll, gate = _stub(server, pki, "enroll-svc"), _stub(server, pki, "gate")
    request = lambda s, f, **kw: pb.EnrollRequest(collection_id="c", subject_id=s, embedding=f, **kw)
    assert _call(enroll.Enroll, request("p0", faces["p0"][0]))[0] == Code.OK
    before = _count(server)
    code, message, _ = _call(enroll.Enroll, request("p0", faces["p1"][0]))
    assert code == Code.PERMISSION_DENIED and "does not match" in message
    assert _count(server) == before  # nothing stored
    # The impostor does not pass 1:1 as p0.
    assert not _call(gate.Match, pb.MatchRequest(collection_id="c", subject_id="p0",
                                                 embedding=faces["p1"][0]))[2].matched
    # A second image of the same person passes the check and is stored.
    assert _call(enroll.Enroll, request("p0", faces["p0"][1]))[0] == Code.OK
    assert _count(server) == before + 1
    # allow_new_face: refused to an enroller, honoured for an admin, and audited.
    code, message, _ = _call(enroll.Enroll, request("p0", faces["p1"][0], allow_new_face=True))
    assert code == Code.PERMISSION_DENIED and "admin" in message
    with server.channel() as channel:
        admin = vault_pb2_grpc.TemplateVaultStub(channel)
        assert _call(admin.Enroll, request("p0", faces["p1"][0], allow_new_face=True))[0] == Code.OK
    assert _count(server) == before + 2
    # Import is first enrollment only: an item for an enrolled subject is refused.
    items = [pb.ImportItem(subject_id="p0", embedding=faces["p2"][0]),
             pb.ImportItem(subject_id="p3", embedding=faces["p3"][0]),
             pb.ImportItem(subject_id="p3", embedding=faces["p3"][1])]
    results = [r for m in enroll.ImportTemplates(
        iter([pb.ImportTemplatesRequest(collection_id="c", items=items)]), timeout=120)
        for r in m.results]
    by_index = {r.index: r for r in results}
    assert by_index[0].code == Code.PERMISSION_DENIED.value[0] and "already enrolled" in by_index[0].message
    assert by_index[1].code == 0 and by_index[2].code == 0
    shutil.copy(server.data_dir / "audit.db", tmp_path / "audit.db")
    for suffix in ("-wal", "-shm"):
        if (server.data_dir / f"audit.db{suffix}").exists():
            shutil.copy(server.data_dir / f"audit.db{suffix}", tmp_path / f"audit.db{suffix}")
    audit = sqlite3.connect(tmp_path / "audit.db")
    entries = audit.execute("SELECT kind, actor, outcome FROM entries WHERE method='Enroll'").fetchall()
    audit.close()
    assert ("response", "enroll-svc", "PERMISSION_DENIED") in entries
    assert ("new_face", "admin", "OK allow_new_face") in entries


def test_an_import_held_open_cannot_attach_a_face_to_a_subject_enrolled_meanwhile(world) -> None:
    """An enroller opens an import with an item for a subject not yet enrolled, holds the
    stream open while that subject is enrolled through Enroll, then closes it: the item
    is refused (it was checked as a first enrollment, no longer true), nothing stored."""
    server, pki, faces = world
    enroll, gate = _stub(server, pki, "enroll-svc"), _stub(server, pki, "gate")
    read, enrolled = threading.Event(), threading.Event()

    def stream():  # type: ignore[no-untyped-def]
        yield pb.ImportTemplatesRequest(collection_id="c", items=[
            pb.ImportItem(subject_id="held", embedding=faces["p5"][0])])
        read.set()  # the server has taken the item (gRPC asks for the next one)
        enrolled.wait(60)

    replies: list[pb.ImportResult] = []
    importer = threading.Thread(target=lambda: replies.extend(
        r for m in enroll.ImportTemplates(stream(), timeout=120) for r in m.results))
    importer.start()
    assert read.wait(60)
    time.sleep(0.5)  # the item is read and buffered
    assert _call(enroll.Enroll, pb.EnrollRequest(collection_id="c", subject_id="held",
                                                 embedding=faces["p4"][0]))[0] == Code.OK
    before = _count(server)
    enrolled.set()
    importer.join(120)
    (reply,) = replies
    assert reply.code == Code.PERMISSION_DENIED.value[0] and "enrolled by another call" in reply.message
    assert _count(server) == before  # nothing stored for it
    verify = lambda face: _call(gate.Match, pb.MatchRequest(  # noqa: E731
        collection_id="c", subject_id="held", embedding=face))[2].matched
    assert not verify(faces["p5"][1])  # the importer's face does not pass as the subject
    assert verify(faces["p4"][1])


def test_an_unknown_subject_answers_like_a_non_match_to_a_matcher(world) -> None:
    server, pki, faces = world
    enroll, gate = _stub(server, pki, "enroll-svc"), _stub(server, pki, "gate")
    assert _call(enroll.Enroll, pb.EnrollRequest(collection_id="c", subject_id="p4",
                                                 embedding=faces["p4"][0]))[0] == Code.OK
    probe = faces["p5"][0]
    known = _call(gate.Match, pb.MatchRequest(collection_id="c", subject_id="p4", embedding=probe))
    unknown = _call(gate.Match, pb.MatchRequest(collection_id="c", subject_id="nobody",
                                                embedding=probe))
    assert known[0] == unknown[0] == Code.OK and not known[2].matched and not unknown[2].matched
    assert known[2].SerializeToString() == unknown[2].SerializeToString()
    # Unknown subjects lock like known ones (otherwise the lock would tell them apart).
    for _ in range(5):
        assert _call(gate.Match, pb.MatchRequest(collection_id="c", subject_id="nobody",
                                                 embedding=probe))[0] in (Code.OK,
                                                                          Code.RESOURCE_EXHAUSTED)
    assert _call(gate.Match, pb.MatchRequest(collection_id="c", subject_id="nobody",
                                             embedding=probe))[0] == Code.RESOURCE_EXHAUSTED
    # An admin may learn that the subject is not enrolled.
    code, _, _ = _call(_stub(server, pki, "ops").Match,
                       pb.MatchRequest(collection_id="c", subject_id="nobody2", embedding=probe))
    assert code == Code.NOT_FOUND


@pytest.mark.parametrize("spelling", ["Zoe\u0301", "Zo\u00e9"])
def test_nfc_and_nfd_spellings_are_one_subject(world, spelling) -> None:
    server, pki, faces = world
    enroll, ops = _stub(server, pki, "enroll-svc"), _stub(server, pki, "ops")
    code, _, _ = _call(enroll.Enroll, pb.EnrollRequest(collection_id="c", subject_id=spelling,
                                                       embedding=faces["p5"][0]))
    # Either spelling enrolls (the second one as the same subject, its face passing 1:1);
    # a match under the NFC spelling finds it.
    assert code == Code.OK
    r = _call(ops.Match, pb.MatchRequest(collection_id="c", subject_id="Zo\u00e9",
                                           embedding=faces["p5"][0]))
    assert r[0] == Code.OK and r[2].matched
    assert r[2].candidates[0].subject_id == "Zo\u00e9"
    # Another person's face cannot join the subject through the other spelling.
    other = "Zo\u00e9" if spelling != "Zo\u00e9" else "Zoe\u0301"
    code, _, _ = _call(enroll.Enroll, pb.EnrollRequest(collection_id="c", subject_id=other,
                                                       embedding=faces["p1"][0]))
    assert code == Code.PERMISSION_DENIED


@pytest.mark.parametrize("subject_id", ["ann\u200b", "\u202eann", "an\u200dn", "ann\u2028",
                                        "\ufeffann", "ann\u2066"])
def test_invisible_characters_in_subject_ids_are_refused_everywhere(world, subject_id) -> None:
    server, pki, faces = world
    enroll, gate = _stub(server, pki, "enroll-svc"), _stub(server, pki, "gate")
    face = faces["p2"][0]
    with server.channel() as channel:
        admin = vault_pb2_grpc.TemplateVaultStub(channel)
        for method, request in (
                (enroll.Enroll, pb.EnrollRequest(collection_id="c", subject_id=subject_id, embedding=face)),
                (gate.Match, pb.MatchRequest(collection_id="c", subject_id=subject_id, embedding=face)),
                (admin.DeleteSubject, pb.DeleteSubjectRequest(collection_id="c", subject_id=subject_id)),
                (admin.UnlockSubject, pb.UnlockSubjectRequest(collection_id="c", subject_id=subject_id))):
            code, message, _ = _call(method, request)
            assert code == Code.INVALID_ARGUMENT and "subject_id" in message
            assert subject_id not in message
    results = [r for m in enroll.ImportTemplates(iter([pb.ImportTemplatesRequest(
        collection_id="c", items=[pb.ImportItem(subject_id=subject_id, embedding=face)])]), timeout=60)
        for r in m.results]
    assert [r.code for r in results] == [Code.INVALID_ARGUMENT.value[0]]
