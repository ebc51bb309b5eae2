"""Prometheus metrics (``vault serve --metrics-listen HOST:PORT``): RPC counts and latency
by method and status, HSM, decider and shard call latency, the progress of background jobs
(key rotations, imports, maintenance), templates per collection.

Labels are method names, status codes, operation names, shard numbers, job states and
collection ids only: never a subject id, request id, score or vector (the collection id is
the operator's name for a gallery, as on every other log line).
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
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
# The decider's calls on the match and maintenance paths (vault.decider.Decider, or any
# object with the same methods: a decider in another process).
DECIDER_OPERATIONS = ("decide", "reencrypt")
# A decision is milliseconds (in process) to tens of milliseconds (another process, a
# large top-k); a re-encryption of a block, up to seconds.
_CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_active: Metrics | None = None  # the serving process's metrics, for observe_shard


def observe_shard(shard: int | str, seconds: float, operation: str = "score") -> None:
    """Record one call to a gallery shard (its number, never what it scored) that took
    ``seconds``; nothing when the process serves no metrics."""
    metrics = _active
    if metrics is not None:
        metrics.shard_seconds.labels(str(shard), operation).observe(seconds)


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
        self.decider_seconds = Histogram("vault_decider_call_duration_seconds",
                                         "Decider calls (decrypt and decide, re-encrypt), by "
                                         "operation", ["operation"], buckets=_CALL_BUCKETS,
                                         registry=self.registry)
        self.shard_seconds = Histogram("vault_shard_call_duration_seconds",
                                       "Calls to gallery shards, by shard number and operation",
                                       ["shard", "operation"], buckets=_CALL_BUCKETS,
                                       registry=self.registry)
        self.maintenance_seconds = Histogram("vault_maintenance_pass_duration_seconds",
                                             "Maintenance passes (checkpoint, erasure, sweep)",
                                             buckets=_CALL_BUCKETS, registry=self.registry)
        self._imports: weakref.WeakSet[Any] = weakref.WeakSet()  # running import sessions

    def observe_rpc(self, full_method: str, code: grpc.StatusCode, seconds: float) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        labels = (service, method, code.name)
        self.rpcs.labels(*labels).inc()
        self.rpc_seconds.labels(*labels).observe(seconds)

    def interceptor(self) -> grpc.ServerInterceptor:
        """Counts and times every RPC by method and status code."""
        def begin(method: str, _details: grpc.HandlerCallDetails
                  ) -> Callable[[grpc.StatusCode], None]:
            start = time.perf_counter()
            return lambda code: self.observe_rpc(method, code, time.perf_counter() - start)

        return RpcObserver(begin)

    def watch(self, vault_of: Callable[[], Any]) -> None:
        """Report templates per collection and the progress of rotations, imports and
        maintenance of ``vault_of()`` (the open vault, or None) at each scrape."""
        self.registry.register(_VaultCollector(vault_of, self._imports))

    def instrument_vault(self, vault: Any) -> None:
        """Time ``vault``'s decider calls and follow its import sessions (wraps the
        instance's methods: any decider with ``decide`` and ``reencrypt`` is timed)."""
        for name in DECIDER_OPERATIONS:
            original = getattr(vault.decider, name, None)
            if original is not None and not getattr(original, "_timed", False):
                setattr(vault.decider, name, _timed(original, self.decider_seconds.labels(name)))
        start_import, sessions = vault.start_import, self._imports

        @functools.wraps(start_import)
        def started(*args: Any, **kwargs: Any) -> Any:
            session = start_import(*args, **kwargs)
            finish = session.finish

            def finished() -> Any:
                sessions.discard(session)
                return finish()

            session.finish = finished
            sessions.add(session)
            return session

        vault.start_import = started
        shards = getattr(vault, "shards", None)
        if shards is not None:  # Ray shards (vault.gallery.shards): each call's latency
            shards.observe = lambda shard, seconds: observe_shard(shard, seconds)

    def instrument_maintenance(self) -> None:
        """Time every maintenance pass (the thread calls the module's run_once)."""
        from vault.ops import maintenance

        if not getattr(maintenance.run_once, "_timed", False):
            maintenance.run_once = _timed(maintenance.run_once, self.maintenance_seconds)

    def serve(self, listen: str) -> Any:
        """Serve ``/metrics`` on HOST:PORT in a daemon thread; returns the HTTP server.
        From now on :func:`observe_shard` records into these metrics."""
        global _active
        host, port = split_listen(listen)
        server, _thread = start_http_server(port, host, registry=self.registry)
        _active = self
        return server


def _timed(original: Callable[..., Any], histogram: Any) -> Callable[..., Any]:
    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with histogram.time():
            return original(*args, **kwargs)

    timed._timed = True  # type: ignore[attr-defined]
    return timed


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


class RpcObserver(grpc.ServerInterceptor):
    """Sees every RPC, unary and streaming (a stream: until its last answer): ``begin``
    gets the full method name and the call's details when it starts and returns the
    function that gets its status code when it ends. Shared by metrics and tracing."""

    def __init__(self, begin: Callable[[str, grpc.HandlerCallDetails],
                                       Callable[[grpc.StatusCode], None]]) -> None:
        self._begin = begin

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method, begin = details.method, self._begin
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            @functools.wraps(inner)
            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                end, failed = begin(method, details), True
                try:
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    end(_code(context, failed))

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            inner_stream = handler.stream_stream

            def stream(requests: Iterable[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                end, failed = begin(method, details), True
                try:
                    yield from inner_stream(requests, context)
                    failed = False
                finally:
                    end(_code(context, failed))

            return grpc.stream_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler  # unary-stream (health Watch): not observed


class _VaultCollector(Collector):
    def __init__(self, vault_of: Callable[[], Any], imports: weakref.WeakSet[Any]) -> None:
        self._vault_of, self._imports = vault_of, imports

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, text: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["collection_id", *labels])

        templates = gauge("vault_collection_templates", "Live templates per collection")
        done = gauge("vault_key_rotation_blocks_done", "Blocks moved by a running key rotation")
        total = gauge("vault_key_rotation_blocks_total", "Blocks a running key rotation moves")
        items = gauge("vault_import_items", "Items of running imports: received, stored "
                                            "(new), failed", "state")
        running = GaugeMetricFamily("vault_imports_running", "Import streams in progress")
        pages = gauge("vault_maintenance_journal_pages",
                      "Journal pages waiting for a checkpoint into blocks")
        unerased = gauge("vault_maintenance_erasures_pending",
                         "Pages and blocks still holding values of deleted templates")
        role = GaugeMetricFamily("vault_replica_primary", "1 while this replica holds the write "
                                 "lease (or serves alone), 0 on a standby")
        vault = self._vault_of()
        if vault is not None:
            role.add_metric([], 1 if vault.may_write() else 0)
            for row in vault.store.collections():
                try:
                    count = vault.get_collection(row.collection_id).template_count
                except VaultError:
                    continue  # damaged or retired: its RPCs say why
                templates.add_metric([row.collection_id], count)
            for job in vault.store.key_jobs("running"):
                done.add_metric([job.collection_id], job.blocks_done)
                total.add_metric([job.collection_id], job.blocks_total)
            for gallery in vault.galleries():
                cid = gallery.collection_id
                pages.add_metric([cid], len(gallery.pages))
                try:
                    unerased.add_metric([cid], len(vault.store.unerased(cid, gallery.key_version)))
                except VaultError:
                    continue
        sessions = list(self._imports)
        running.add_metric([], len(sessions))
        by_collection: dict[str, list[int]] = {}
        for s in sessions:  # several streams into one collection add up
            counts = by_collection.setdefault(s.collection_id, [0, 0, 0])
            for k, value in enumerate((s._next_index, s.stored, s.failed)):
                counts[k] += value
        for cid, counts in sorted(by_collection.items()):
            for state, value in zip(("received", "stored", "failed"), counts):
                items.add_metric([cid, state], value)
        yield from (templates, done, total, items, running, pages, unerased, role)


_instrumented = threading.Lock()


def instrument_hsm(hsm_class: type, metrics: Metrics) -> None:
    """Time the token operations of every ``hsm_class`` instance (once per process)."""
    with _instrumented:
        for name in HSM_OPERATIONS:
            original = getattr(hsm_class, name, None)
            if original is None or getattr(original, "_timed", False):
                continue
            timed = _timed(original, metrics.hsm_seconds.labels(name))
            setattr(hsm_class, name, timed)
