"""Assembles the gRPC server: TemplateVault, health, reflection, message limits."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vault import logs
from vault.api.access import RateLimiter
from vault.api.budget import BudgetConfig, Budgets
from vault.api.codec import Undecodable
from vault.api.codec import lenient as _lenient
from vault.api.lifecycle import INTEGRITY_SERVICE, VaultHolder, integrity_status
from vault.api.servicer import TemplateVaultServicer
from vault.service import Vault
from vault.v1 import vault_pb2

SERVICE_NAME = vault_pb2.DESCRIPTOR.services_by_name["TemplateVault"].full_name
# An embedding of 1,024 floats is about 4 KiB: 1 MiB leaves room without inviting abuse.
# Larger messages get RESOURCE_EXHAUSTED from gRPC itself, before any handler runs.
MAX_MESSAGE_BYTES = 1 << 20

log = logs.get("vault.api")


def _refusing_undecodable(name: str, behavior: Callable[[Any, grpc.ServicerContext], Any]
                          ) -> Callable[[Any, grpc.ServicerContext], Any]:
    @functools.wraps(behavior)
    def handle(request: Any, context: grpc.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            log.info("rpc", method=name, code="INVALID_ARGUMENT", kind="undecodable_request")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {request.type_name}")
        return behavior(request, context)
    return handle


def _add_template_vault(servicer: TemplateVaultServicer, server: grpc.Server) -> None:
    """As the generated ``add_TemplateVaultServicer_to_server``, but an undecodable request
    gets INVALID_ARGUMENT instead of INTERNAL."""
    handlers = {}
    for method in vault_pb2.DESCRIPTOR.services_by_name["TemplateVault"].methods:
        request = getattr(vault_pb2, method.input_type.name)
        response = getattr(vault_pb2, method.output_type.name)
        if method.client_streaming:  # the servicer refuses undecodable items itself
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name), request_deserializer=_lenient(request),
                response_serializer=response.SerializeToString)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refusing_undecodable(method.name, getattr(servicer, method.name)),
                request_deserializer=_lenient(request),
                response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


@dataclass(frozen=True)
class TlsFiles:
    """Mutual TLS: the server's certificate chain and key, and the CA that signs clients."""

    cert: Path
    key: Path
    client_ca: Path

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=self.client_ca.read_bytes(), require_client_auth=True)


def build_health_server(health_servicer: health.HealthServicer, listen: str) -> grpc.Server:
    """A second, plaintext server with grpc.health only, for a container's or an
    orchestrator's probe on loopback: it works whatever TLS and port the API uses."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    return server


def build_server(vault: Vault | VaultHolder, listen: str, max_workers: int = 8,
                 tls: TlsFiles | None = None, rate_limit: float = 0.0,
                 budgets: BudgetConfig | None = None,
                 budget_clock: Callable[[], float] | None = None,
                 interceptors: Sequence[grpc.ServerInterceptor] = (),
                 ) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready server bound to ``listen``; returns (server, bound port, health).

    Given a :class:`VaultHolder`, health follows it (NOT_SERVING while the HSM is out);
    given an open :class:`Vault`, the server reports SERVING. With ``tls``, clients need a
    certificate from its client CA and are given the roles their certificate names
    (:mod:`vault.api.access`); ``rate_limit``: calls per second per client (0: none);
    ``budgets``: match budgets and the probing guard (:mod:`vault.api.budget`);
    ``interceptors``: e.g. :mod:`vault.api.metrics`'s.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    _add_template_vault(TemplateVaultServicer(vault, tls=tls is not None,
                                              limiter=RateLimiter(rate_limit),
                                              budgets=Budgets(budgets, budget_clock or time.monotonic)),
                         server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(listen, tls.credentials()) if tls is not None
            else server.add_insecure_port(listen))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    if isinstance(vault, VaultHolder):
        vault.attach(health_servicer, ("", SERVICE_NAME))
    else:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_servicer.set(INTEGRITY_SERVICE, integrity_status(vault))
    return server, port, health_servicer
