"""OpenTelemetry tracing (extra otel): a real gRPC server on 127.0.0.1 over a real vault
gives one server span per RPC, with its method and status code, joined to the caller's
trace, and no attribute that carries a request field (subject id, request id, collection
id, vector). The SDK's in-memory exporter stands in for a collector."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

sdk = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

DIM = 16
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_a_span_per_rpc_without_request_fields(vault) -> None:  # type: ignore[no-untyped-def]
    from vault.api import tracing
    from vault.api.server import build_server

    exporter = sdk.InMemorySpanExporter()
    traced = tracing.provider(None, exporter=exporter)
    server, port, _ = build_server(vault, "127.0.0.1:0",
                                   interceptors=[tracing.interceptor(traced)])
    server.start()
    rng = np.random.default_rng(9)
    face = rng.standard_normal(DIM).astype(np.float32)
    secret = {"collection": "staff-2031", "subject": "person-5e1f", "request": "req-77a0"}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(
                collection_id=secret["collection"], dimension=DIM, threshold=0.8), timeout=60)
            stub.Enroll(pb.EnrollRequest(collection_id=secret["collection"],
                                         subject_id=secret["subject"], embedding=face,
                                         request_id=secret["request"]), timeout=60,
                        metadata=[("traceparent", f"00-{TRACE_ID}-00f067aa0ba902b7-01")])
            stub.Match(pb.MatchRequest(collection_id=secret["collection"], embedding=face,
                                       subject_id=secret["subject"]), timeout=60)
            with pytest.raises(grpc.RpcError):
                stub.GetCollection(pb.GetCollectionRequest(collection_id="absent"), timeout=30)
            list(stub.ImportTemplates(iter([pb.ImportTemplatesRequest(
                collection_id=secret["collection"],
                items=[pb.ImportItem(subject_id="person-2", embedding=-face)])]), timeout=60))
    finally:
        server.stop(grace=1).wait()
        traced.shutdown()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    prefix = "vault.v1.TemplateVault/"
    assert set(spans) == {prefix + m for m in ("CreateCollection", "Enroll", "Match",
                                               "GetCollection", "ImportTemplates")}
    enroll = spans[prefix + "Enroll"]
    assert dict(enroll.attributes) == {"rpc.system": "grpc", "rpc.service": "vault.v1.TemplateVault",
                                       "rpc.method": "Enroll", "rpc.grpc.status_code": 0}
    assert f"{enroll.context.trace_id:032x}" == TRACE_ID  # joined to the caller's trace
    assert f"{spans[prefix + 'Match'].context.trace_id:032x}" != TRACE_ID
    failed = spans[prefix + "GetCollection"]
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert failed.status.description == "NOT_FOUND"
    for span in spans.values():
        assert set(span.attributes) <= {"rpc.system", "rpc.service", "rpc.method",
                                        "rpc.grpc.status_code"}
        assert not span.events and not span.links
        text = repr(span.to_json())
        assert not any(value in text for value in (*secret.values(), "person-2", "absent"))
        assert f"{float(face[0]):.4f}"[:6] not in text


def test_tracing_is_off_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from vault.api import tracing

    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    assert not tracing.wanted(None)
    assert tracing.wanted("http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert tracing.wanted(None)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.wanted("http://127.0.0.1:4317")
