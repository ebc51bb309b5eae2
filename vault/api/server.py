"""Assembles the gRPC server: TemplateVault, health, reflection, message limits."""

from __future__ import annotations

from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from vault.api.lifecycle import VaultHolder
from vault.api.servicer import TemplateVaultServicer
from vault.service import Vault
from vault.v1 import vault_pb2, vault_pb2_grpc

SERVICE_NAME = vault_pb2.DESCRIPTOR.services_by_name["TemplateVault"].full_name
# An embedding of 1,024 floats is about 4 KiB: 1 MiB leaves room without inviting abuse.
# Larger messages get RESOURCE_EXHAUSTED from gRPC itself, before any handler runs.
MAX_MESSAGE_BYTES = 1 << 20


def build_server(vault: Vault | VaultHolder, listen: str,
                 max_workers: int = 8) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready server bound to ``listen``; returns (server, bound port, health).

    Given a :class:`VaultHolder`, health follows it (NOT_SERVING while the HSM is out);
    given an open :class:`Vault`, the server reports SERVING.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    vault_pb2_grpc.add_TemplateVaultServicer_to_server(TemplateVaultServicer(vault), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    if isinstance(vault, VaultHolder):
        vault.attach(health_servicer, ("", SERVICE_NAME))
    else:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer
