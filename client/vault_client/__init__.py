"""Client of the template vault: ``VaultClient`` (typed calls, mutual TLS, deadlines,
gRPC retries for idempotent calls) and a bulk import helper with per-item request ids.

Depends on grpcio and protobuf only; the generated stubs are in :mod:`vault_client.v1`.
"""

from vault_client._client import (
    Candidate,
    Collection,
    CollectionList,
    Enrolled,
    ImportReport,
    VaultClient,
    item_request_id,
    retry_service_config,
)

__all__ = ["Candidate", "Collection", "CollectionList", "Enrolled", "ImportReport", "VaultClient",
           "item_request_id", "retry_service_config"]
__version__ = "0.1.0"
