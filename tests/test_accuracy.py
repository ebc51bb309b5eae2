"""Matching under encryption keeps the plaintext decisions, on real LFW face embeddings.

One image of every person with two or more is enrolled; every other image of them is a
genuine probe, every image of a person with a single image an impostor probe. Each probe
is matched 1:1 (genuine: claiming its own identity; impostor: a random enrolled one) and
1:N over gRPC, and compared with plaintext cosine on the same vectors.
"""

from __future__ import annotations

import numpy as np
import pytest

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

THRESHOLD = float(np.float32(0.92))  # near the 0.1%-false-accept point of this data


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    # Thousands of impostor 1:1 probes would lock subjects: this test measures decisions,
    # so it runs its own server without the failed-attempt limit.
    with ServerProcess(tmp_path_factory.mktemp("accuracy") / "data",
                       env={"VAULT_MAX_FAILED_VERIFICATIONS": "0"}) as s:
        yield s


@pytest.mark.slow
def test_encrypted_decisions_and_scores_agree_with_plaintext(server: ServerProcess, lfw) -> None:
    emb, ids = lfw["emb"].astype(np.float64), lfw["ids"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    people, counts = np.unique(ids, return_counts=True)
    multi = set(people[counts >= 2].tolist())
    enrolled = {}  # person -> image index
    for i, p in enumerate(ids.tolist()):
        if p in multi and p not in enrolled:
            enrolled[p] = i
    gallery_people = np.array(sorted(enrolled))
    gallery = unit[[enrolled[p] for p in gallery_people]]
    rng = np.random.default_rng(2024)
    probes = [(i, int(p), True) for i, p in enumerate(ids.tolist())
              if p in multi and enrolled[p] != i]
    probes += [(i, int(rng.choice(gallery_people)), False) for i, p in enumerate(ids.tolist())
               if p not in multi]

    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="lfw", dimension=128,
                                                         threshold=THRESHOLD))
        for p in gallery_people.tolist():
            stub.Enroll(pb.EnrollRequest(collection_id="lfw", subject_id=f"person-{p}",
                                         embedding=emb[enrolled[p]].tolist(),
                                         request_id=f"lfw-{p}"), timeout=60)

        verify_agree = ident_agree = ident_wrong_subject = 0
        score_errors = []
        for k, (i, claimed, _genuine) in enumerate(probes):
            x = emb[i].tolist()
            plain_scores = gallery @ unit[i]
            # 1:1 against the claimed identity, at the collection threshold.
            plain = float(plain_scores[np.searchsorted(gallery_people, claimed)])
            r = stub.Match(pb.MatchRequest(collection_id="lfw", subject_id=f"person-{claimed}",
                                           embedding=x), timeout=60)
            verify_agree += r.matched == (plain >= THRESHOLD)
            if r.matched:
                score_errors.append(abs(r.candidates[0].score - plain))
            # 1:N at the collection threshold: the vault's own decision.
            r = stub.Match(pb.MatchRequest(collection_id="lfw", embedding=x, top_k=1), timeout=60)
            plain_best = float(plain_scores.max())
            decision_agree = r.matched == (plain_best >= THRESHOLD)
            same = True
            if r.matched:
                got = int(r.candidates[0].subject_id.removeprefix("person-"))
                got_plain = float(plain_scores[np.searchsorted(gallery_people, got)])
                score_errors.append(abs(r.candidates[0].score - got_plain))
                # The same subject, or one whose plaintext score ties the best.
                same = got_plain >= plain_best - 1e-3
            if k % 5 == 0:  # and, for a sample, the best candidate whatever its score
                r = stub.Match(pb.MatchRequest(collection_id="lfw", embedding=x, top_k=1,
                                               threshold=-1.0), timeout=60)
                got = int(r.candidates[0].subject_id.removeprefix("person-"))
                got_plain = float(plain_scores[np.searchsorted(gallery_people, got)])
                score_errors.append(abs(r.candidates[0].score - got_plain))
                same = same and got_plain >= plain_best - 1e-3
            ident_agree += same and decision_agree
            ident_wrong_subject += not same

    n = len(probes)
    assert n > 3000
    assert verify_agree / n >= 0.999, f"1:1 decisions agree for {verify_agree}/{n}"
    assert ident_agree / n >= 0.999, f"1:N decisions agree for {ident_agree}/{n} ({ident_wrong_subject} other subject)"
    assert max(score_errors) <= 1e-3, f"largest score error {max(score_errors):.2e}"
