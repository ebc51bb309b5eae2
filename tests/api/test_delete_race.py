"""A deletion racing 1:N searches names nobody else: while matcher threads hammer Identify
with a subject's own face, an admin deletes that subject; no answer may name another
person (a slot freed mid-search once resolved to the newest subject), and none that
started after the acknowledgement names the deleted one. Tried on a real server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

PEOPLE = 10


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, lfw) -> Iterator[tuple[ServerProcess, list]]:
    emb, ids = lfw["emb"], lfw["ids"]
    faces = [emb[np.flatnonzero(ids == p)[0]] for p in np.unique(ids)[:PEOPLE + 1]]
    unit = np.stack(faces) / np.linalg.norm(faces, axis=1, keepdims=True)
    # Only a face's own subject reaches the threshold (its own template scores 1.0).
    assert (unit @ unit.T - 2 * np.eye(len(faces))).max() < 0.95
    server = ServerProcess(Path(tmp_path_factory.mktemp("race")) / "data",
                           env={"VAULT_RATE_LIMIT": "0", "VAULT_IDENTIFY_BUDGET": "0",
                                "VAULT_PROBE_CLUSTER": "0"})  # one face, searched again and again
    with server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                         threshold=0.97))
        # The last one enrolled is never deleted: a freed slot read as "the newest
        # subject" would name it.
        for k, face in enumerate(faces):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{k}", embedding=face))
        yield server, faces


def _search_while_deleting(stub, victim: str, probe: np.ndarray
                           ) -> tuple[list[tuple[float, list[str]]], float]:
    """Three threads search for ``probe`` while ``victim`` is deleted: their answers
    (start time, names) and the moment the deletion was acknowledged."""
    answers: list[tuple[float, list[str]]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            started = time.monotonic()
            reply = stub.Match(pb.MatchRequest(collection_id="c", embedding=probe, top_k=3),
                               timeout=60)
            answers.append((started, [c.subject_id for c in reply.candidates]))

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="c", subject_id=victim))
    acknowledged = time.monotonic()
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join()
    return answers, acknowledged


def test_a_deletion_during_searches_never_names_another_subject(gallery) -> None:
    server, faces = gallery
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        for k in range(PEOPLE):
            victim = f"s{k}"
            answers, acknowledged = _search_while_deleting(stub, victim, faces[k])
            assert any(names == [victim] for started, names in answers if started < acknowledged)
            wrong = [names for _, names in answers if set(names) - {victim}]
            assert not wrong, (victim, wrong[:3])
            late = [names for started, names in answers if started > acknowledged and names]
            assert not late, (victim, late[:3])
        # The one never deleted is still found, and only it.
        reply = stub.Match(pb.MatchRequest(collection_id="c", embedding=faces[PEOPLE], top_k=3))
        assert [c.subject_id for c in reply.candidates] == [f"s{PEOPLE}"]
