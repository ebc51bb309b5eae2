"""``--metrics-listen``: a scrape during a run against a real server shows the RPCs, their
statuses, the HSM calls and the templates per collection move, and no label holds a
subject id, a request id or a number from a vector."""

from __future__ import annotations

import threading
import time
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


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _until(port: int, seen: list[dict], condition, what: str) -> dict:  # type: ignore[no-untyped-def]
    """Scrape until ``condition(samples)`` holds (every scrape kept for the label check)."""
    for _ in range(300):
        samples = _scrape(port)
        seen.append(samples)
        if condition(samples):
            return samples
        time.sleep(0.1)
    raise AssertionError(f"never scraped: {what}")


def test_decider_jobs_and_maintenance_metrics_during_a_run(tmp_path: Path) -> None:
    """Scrapes while an import stream is held open, after matches and a deletion: the
    decider's calls are timed, the running import's items and the maintenance backlog are
    gauges, passes are timed; across every scrape no label is a subject, request id, score
    or vector value."""
    port = free_port()
    rng = np.random.default_rng(5)
    faces = rng.standard_normal((8, DIM)).astype(np.float32)
    subjects = [f"person-{rng.integers(1 << 40):x}" for _ in faces]
    requests = [f"req-{rng.integers(1 << 40):x}" for _ in faces]
    seen: list[dict] = []
    held, release = threading.Event(), threading.Event()
    with ServerProcess(tmp_path / "data", args=["--metrics-listen", f"127.0.0.1:{port}"],
                       env={"VAULT_MAINTENANCE_INTERVAL": "0.5"}) as server, \
            server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="gate", dimension=DIM,
                                                         threshold=0.8), timeout=30)
        for k in range(4):
            stub.Enroll(pb.EnrollRequest(collection_id="gate", subject_id=subjects[k],
                                         embedding=faces[k], request_id=requests[k]), timeout=60)
        answer = stub.Match(pb.MatchRequest(collection_id="gate", embedding=faces[0], top_k=3,
                                            release_scores=True), timeout=60)
        scores = {f"{c.score:.6g}" for c in answer.candidates} | {str(c.score) for c in answer.candidates}
        stub.Match(pb.MatchRequest(collection_id="gate", subject_id=subjects[1],
                                   embedding=faces[1]), timeout=60)
        stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="gate",
                                                   subject_id=subjects[3]), timeout=60)

        def stream():  # type: ignore[no-untyped-def]
            yield pb.ImportTemplatesRequest(collection_id="gate", items=[
                pb.ImportItem(subject_id=subjects[k], embedding=faces[k], request_id=requests[k])
                for k in range(4, 8)])
            held.set()
            release.wait(120)  # the stream stays open while the test scrapes

        with ThreadPoolExecutor(1) as pool:
            imported = pool.submit(lambda: list(stub.ImportTemplates(stream(), timeout=120)))
            held.wait(60)
            during = _until(port, seen, lambda s: _value(
                s, "vault_import_items", collection_id="gate", state="received") == 4,
                "the held import's 4 received items")
            release.set()
            results = [r for response in imported.result() for r in response.results]
        assert len(results) == 4 and all(r.code == 0 for r in results)
        assert _value(during, "vault_imports_running") == 1
        assert _value(during, "vault_import_items", collection_id="gate", state="stored") == 0
        after = _until(port, seen, lambda s: _value(s, "vault_imports_running") == 0
                       and _value(s, "vault_maintenance_pass_duration_seconds_count") > 0,
                       "the import ended and a maintenance pass ran")
        assert _value(after, "vault_import_items", collection_id="gate", state="received") == 0
    assert _value(after, "vault_decider_call_duration_seconds_count", operation="decide") >= 2
    assert _value(after, "vault_decider_call_duration_seconds_sum", operation="decide") > 0
    # The deleted subject's values wait for erasure (erase_after: 60 s) in a journal page.
    assert _value(after, "vault_maintenance_erasures_pending", collection_id="gate") == 1
    assert _value(after, "vault_maintenance_journal_pages", collection_id="gate") >= 1
    assert _value(after, "vault_collection_templates", collection_id="gate") == 7
    assert ("vault_shard_call_duration_seconds_count", ()) not in after  # no shards here
    # Bucket bounds ("le") are constants of the code; every other label value is checked.
    values = {value for samples in seen for _, labels in samples for name, value in labels
              if name != "le"}
    names = {name for samples in seen for _, labels in samples for name, _ in labels}
    assert names <= {"service", "method", "code", "operation", "collection_id", "state",
                     "shard", "le", "quantile", "implementation", "major", "minor",
                     "patchlevel", "version"}
    assert not values & (set(subjects) | set(requests))
    assert not values & scores
    assert not values & ({f"{x:.6g}" for x in faces.ravel()} | {str(x) for x in faces.ravel()})


def test_observe_shard_records_by_shard_number_only() -> None:
    """The hook the shard fan-out calls: nothing without metrics, then a histogram by
    shard number and operation."""
    from vault.api import metrics

    metrics.observe_shard(0, 0.01)  # no metrics served in this process: a no-op
    collected = metrics.Metrics()
    previous, metrics._active = metrics._active, collected
    try:
        metrics.observe_shard(2, 0.004)
        metrics.observe_shard(2, 0.2, operation="load")
    finally:
        metrics._active = previous
    get = collected.registry.get_sample_value
    assert get("vault_shard_call_duration_seconds_count", {"shard": "2", "operation": "score"}) == 1
    assert get("vault_shard_call_duration_seconds_bucket",
               {"shard": "2", "operation": "score", "le": "0.005"}) == 1
    assert get("vault_shard_call_duration_seconds_count", {"shard": "2", "operation": "load"}) == 1
