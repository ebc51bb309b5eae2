"""Prometheus metrics (``vault serve --metrics-listen HOST:PORT``): RPC counts and latency
by method and status, HSM call latency, key rotation progress, templates per collection.

Labels are method names, status codes, HSM operation names and collection ids only: never
a subject id, request id, score or vector (the collection id is the operator's name for a
gallery, as on every other log line).
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from vault import logs
from vault.domain.errors import VaultError

log = logs.get("vault.metrics")

# HSM work is microseconds (HMAC) to tens of milliseconds (unwrap, sign).
_HSM_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)
# The token operations the vault uses; timed by wrapping the Hsm class (instrument_hsm).
HSM_OPERATIONS = ("ping", "hmac", "wrap", "unwrap", "rewrap", "audit_sign", "random",
                  "counter", "set_counter", "create_kek", "destroy_kek")


class Metrics:
    """The vault's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.rpcs = Counter("vault_rpc", "RPCs handled, by method and status code",
                            ["service", "method", "code"], registry=self.registry)
        self.rpc_seconds = Histogram("vault_rpc_duration_seconds",
                                     "RPC handling time, by method and status code",
                                     ["service", "method", "code"], registry=self.registry)
        self.hsm_seconds = Histogram("vault_hsm_call_duration_seconds",
                                     "PKCS#11 token calls, by operation", ["operation"],
                                     buckets=_HSM_BUCKETS, registry=self.registry)

    def observe_rpc(self, full_method: str, code: grpc.StatusCode, seconds: float) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        labels = (service, method, code.name)
        self.rpcs.labels(*labels).inc()
        self.rpc_seconds.labels(*labels).observe(seconds)

    def interceptor(self) -> grpc.ServerInterceptor:
        return _RpcInterceptor(self)

    def watch(self, vault_of: Callable[[], Any]) -> None:
        """Report templates per collection and rotation progress of ``vault_of()`` (the
        open vault, or None) at each scrape."""
        self.registry.register(_VaultCollector(vault_of))

    def serve(self, listen: str) -> Any:
        """Serve ``/metrics`` on HOST:PORT in a daemon thread; returns the HTTP server."""
        host, port = split_listen(listen)
        server, _thread = start_http_server(port, host, registry=self.registry)
        return server


def split_listen(listen: str) -> tuple[str, int]:
    """(host, port) of HOST:PORT; ValueError naming what is missing."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{listen!r} is not HOST:PORT (for example 127.0.0.1:9464)")
    return host.strip("[]"), int(port)


def _code(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = context.code()  # set by context.abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


class _RpcInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC, unary and streaming (a stream: until its last answer)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method, observe = details.method, self._metrics.observe_rpc
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            @functools.wraps(inner)
            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                start, failed = time.perf_counter(), True
                try:
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    observe(method, _code(context, failed), time.perf_counter() - start)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            def stream(requests: Iterable[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                start, failed = time.perf_counter(), True
                try:
                    yield from inner_stream(requests, context)
                    failed = False
                finally:
                    observe(method, _code(context, failed), time.perf_counter() - start)

            return grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # unary-stream (health Watch): not counted


class _VaultCollector(Collector):
    def __init__(self, vault_of: Callable[[], Any]) -> None:
        self._vault_of = vault_of

    def collect(self) -> Iterator[GaugeMetricFamily]:
        templates = GaugeMetricFamily("vault_collection_templates",
                                      "Live templates per collection", labels=["collection_id"])
        done = GaugeMetricFamily("vault_key_rotation_blocks_done",
                                 "Blocks moved by a running key rotation", labels=["collection_id"])
        total = GaugeMetricFamily("vault_key_rotation_blocks_total",
                                  "Blocks a running key rotation moves", labels=["collection_id"])
        vault = self._vault_of()
        if vault is not None:
            for row in vault.store.collections():
                try:
                    count = vault.get_collection(row.collection_id).template_count
                except VaultError:
                    continue  # damaged or retired: its RPCs say why
                templates.add_metric([row.collection_id], count)
            for job in vault.store.key_jobs("running"):
                done.add_metric([job.collection_id], job.blocks_done)
                total.add_metric([job.collection_id], job.blocks_total)
        yield from (templates, done, total)


_instrumented = threading.Lock()


def instrument_hsm(hsm_class: type, metrics: Metrics) -> None:
    """Time the token operations of every ``hsm_class`` instance (once per process)."""
    with _instrumented:
        for name in HSM_OPERATIONS:
            original = getattr(hsm_class, name, None)
            if original is None or getattr(original, "_timed", False):
                continue
            histogram = metrics.hsm_seconds.labels(name)

            def timed(*args: Any, __original: Callable[..., Any] = original,
                      __histogram: Any = histogram, **kwargs: Any) -> Any:
                with __histogram.time():
                    return __original(*args, **kwargs)

            functools.update_wrapper(timed, original)
            timed._timed = True  # type: ignore[attr-defined]
            setattr(hsm_class, name, timed)
