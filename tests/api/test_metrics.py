"""``--metrics-listen``: a scrape during a run against a real server shows the RPCs, their
statuses, the HSM calls and the templates per collection move, and no label holds a
subject id, a request id or a number from a vector."""

from __future__ import annotations

import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from vault.testing import ServerProcess, free_port
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 32


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _rpc(samples: dict, method: str, code: str, name: str = "vault_rpc_total") -> float:
    key = (name, (("code", code), ("method", method), ("service", "vault.v1.TemplateVault")))
    return samples.get(key, 0.0)


def test_metrics_scrape_during_a_run(tmp_path: Path) -> None:
    port = free_port()
    rng = np.random.default_rng(3)
    faces = rng.standard_normal((12, DIM)).astype(np.float32)
    subjects = [f"person-{rng.integers(1 << 40):x}" for _ in faces]
    requests = [f"req-{rng.integers(1 << 40):x}" for _ in faces]
    with ServerProcess(tmp_path / "data", args=["--metrics-listen", f"127.0.0.1:{port}"]) as server:
        before = _scrape(port)
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="gate", dimension=DIM,
                                                             threshold=0.8), timeout=30)
            with ThreadPoolExecutor(4) as pool:  # in parallel: counts must not be lost
                list(pool.map(lambda k: stub.Enroll(pb.EnrollRequest(
                    collection_id="gate", subject_id=subjects[k], embedding=faces[k],
                    request_id=requests[k]), timeout=60), range(len(faces))))
            for k in range(3):
                stub.Match(pb.MatchRequest(collection_id="gate", subject_id=subjects[k],
                                           embedding=faces[k]), timeout=60)
            try:
                stub.GetCollection(pb.GetCollectionRequest(collection_id="absent"), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            list(stub.ImportTemplates(iter([pb.ImportTemplatesRequest(
                collection_id="gate", items=[pb.ImportItem(subject_id="imported-1",
                                                           embedding=-faces[0])])]), timeout=60))
        after = _scrape(port)

    assert _rpc(before, "Enroll", "OK") == 0
    assert _rpc(after, "Enroll", "OK") == len(faces)
    assert _rpc(after, "Match", "OK") == 3
    assert _rpc(after, "GetCollection", "NOT_FOUND") == 1
    assert _rpc(after, "ImportTemplates", "OK") == 1
    assert _rpc(after, "Enroll", "OK", "vault_rpc_duration_seconds_count") == len(faces)
    assert _rpc(after, "Enroll", "OK", "vault_rpc_duration_seconds_sum") > 0
    hsm_calls = sum(v for (name, labels), v in after.items()
                    if name == "vault_hsm_call_duration_seconds_count")
    assert hsm_calls > len(faces)  # at least the subject and request HMACs of each Enroll
    assert after[("vault_collection_templates", (("collection_id", "gate"),))] == len(faces) + 1

    values = {value for _, labels in after for _, value in labels}
    names = {name for _, labels in after for name, _ in labels}
    assert not names & {"subject_id", "subject", "request_id", "score", "embedding"}
    assert not values & (set(subjects) | set(requests) | {"imported-1"})
    floats = {f"{x:.6g}" for x in faces.ravel()} | {str(x) for x in faces.ravel()}
    assert not values & floats
