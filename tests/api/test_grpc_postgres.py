"""The gRPC contract on the PostgreSQL store: the same tests as tests/api/test_grpc.py (a
representative subset) against a real `vault serve --store postgresql://...` process."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from tests.api import test_grpc as contract
from tests.api.test_grpc import collection, stub  # noqa: F401 - fixtures of the contract
from vault.testing import PostgresServer, ServerProcess
from vault.v1 import vault_pb2 as pb


@pytest.fixture(scope="module")
def server(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server whose store is a fresh PostgreSQL database (its audit log and lock in
    a small local data directory)."""
    root = tmp_path_factory.mktemp("pg-server")
    url = postgres.create_database()
    with ServerProcess(root / "data", args=["--store", url]) as s:
        s.store_url = url  # type: ignore[attr-defined]
        yield s


def test_everything_durable_is_in_postgresql(server: ServerProcess, stub, collection: str) -> None:  # noqa: F811
    """What the contract tests below run on: the rows are in the database, not in the
    data directory (which keeps only the audit log and the lock)."""
    stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="s",
                                 embedding=contract._face(1).tolist()))
    with psycopg.connect(server.store_url, autocommit=True) as conn:  # type: ignore[attr-defined]
        (templates,) = conn.execute("SELECT COUNT(*) FROM templates WHERE collection_id=%s",
                                    (collection,)).fetchone() or (0,)
    assert templates == 1
    assert not (server.data_dir / "vault.db").exists()
    assert not (server.data_dir / "blocks").exists()
    assert (server.data_dir / "audit.db").is_file()


test_collection_lifecycle = contract.test_collection_lifecycle
test_enroll_verify_identify_delete = contract.test_enroll_verify_identify_delete
test_request_id_makes_enroll_idempotent = contract.test_request_id_makes_enroll_idempotent
test_identify_on_empty_collection = contract.test_identify_on_empty_collection
test_invalid_arguments_name_the_field_and_change_nothing = (
    contract.test_invalid_arguments_name_the_field_and_change_nothing)
test_unknown_collection_and_subject = contract.test_unknown_collection_and_subject
test_failed_verifications_lock_the_subject = contract.test_failed_verifications_lock_the_subject
test_import_stream_answers_every_item = contract.test_import_stream_answers_every_item
test_import_stream_errors = contract.test_import_stream_errors
