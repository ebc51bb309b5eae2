"""A one-minute tour of the API against a running server (``vault demo``).

Uses synthetic 128-d embeddings: a "face" is a random unit vector, a second capture of
the same face is that vector plus a little noise. Run ``make run`` in another terminal.
"""

from __future__ import annotations

import uuid

import grpc
import numpy as np

from vault.v1 import vault_pb2, vault_pb2_grpc

DIM = 128


def _capture(face: np.ndarray, rng: np.random.Generator, noise: float = 0.6) -> list[float]:
    x = face + noise * rng.standard_normal(face.shape) / np.sqrt(face.size)
    return x.astype(np.float32).tolist()


def run(channel: grpc.Channel) -> int:
    rng = np.random.default_rng()
    faces = {f"person-{i}": rng.standard_normal(DIM) for i in range(5)}
    stub = vault_pb2_grpc.TemplateVaultStub(channel)
    collection = f"demo-{uuid.uuid4().hex[:8]}"
    info = stub.CreateCollection(vault_pb2.CreateCollectionRequest(
        collection_id=collection, dimension=DIM, threshold=0.8), timeout=30)
    print(f"created collection {info.collection_id} (dimension {info.dimension}, "
          f"threshold {info.threshold:.2f}, key version {info.key_version})")
    for subject, face in faces.items():
        r = stub.Enroll(vault_pb2.EnrollRequest(collection_id=collection, subject_id=subject,
                                                embedding=_capture(face, rng),
                                                request_id=uuid.uuid4().hex), timeout=30)
        print(f"enrolled {subject}: template {r.template_id}")
    probe = _capture(faces["person-2"], rng)
    for claimed in ("person-2", "person-3"):
        r = stub.Match(vault_pb2.MatchRequest(collection_id=collection, subject_id=claimed,
                                              embedding=probe), timeout=30)
        print(f"1:1 probe of person-2 claiming {claimed}: matched={r.matched}")
    r = stub.Match(vault_pb2.MatchRequest(collection_id=collection, embedding=probe, top_k=3),
                   timeout=30)
    print("1:N probe of person-2 (decisions only):", [c.subject_id for c in r.candidates])
    r = stub.Match(vault_pb2.MatchRequest(collection_id=collection, embedding=probe, top_k=3,
                                          release_scores=True), timeout=30)
    print("the same as an analyst (scores, 2 decimals, budgeted):",
          ", ".join(f"{c.subject_id} {c.score:.2f}" for c in r.candidates))
    stub.DeleteSubject(vault_pb2.DeleteSubjectRequest(collection_id=collection,
                                                      subject_id="person-2"), timeout=30)
    r = stub.Match(vault_pb2.MatchRequest(collection_id=collection, embedding=probe, top_k=3),
                   timeout=30)
    print("after deleting person-2, 1:N:", [c.subject_id for c in r.candidates])
    try:
        stub.Enroll(vault_pb2.EnrollRequest(collection_id=collection, subject_id="x",
                                            embedding=[0.0] * DIM), timeout=30)
    except grpc.RpcError as err:
        print(f"enrolling a zero vector: {err.code().name}: {err.details()}")
    return 0
