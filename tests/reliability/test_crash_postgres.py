"""Crashes on the PostgreSQL store: SIGKILL the vault mid-enrollment, and separately crash
and restart PostgreSQL itself mid-enrollment. Nothing acknowledged may be lost, nothing
half-written; while the database is down the vault answers UNAVAILABLE, then recovers."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psycopg

from tests.reliability.test_crash import Enroller
from vault.testing import PostgresServer, ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


def _enroll(stub: vault_pb2_grpc.TemplateVaultStub, faces: np.ndarray, n: int) -> str:
    return str(stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                            embedding=faces[n].tolist(), request_id=f"e{n}"),
                           timeout=30).template_id)


def _check(server: ServerProcess, url: str, faces: np.ndarray, acked: dict[int, str],
           attempted: int) -> None:
    """Everything acknowledged is stored and matches; no enrollment is half-written."""
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        count = stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count
        assert len(acked) <= count <= attempted
        for n in random.Random(3).sample(sorted(acked), min(8, len(acked))):
            assert _enroll(stub, faces, n) == acked[n]  # the retry finds the same template
            assert stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"s{n}",
                                              embedding=faces[n].tolist()), timeout=30).matched
    with psycopg.connect(url, autocommit=True) as conn:
        live, subjects = conn.execute(
            "SELECT (SELECT count(*) FROM templates t JOIN collections c USING (collection_id) "
            "WHERE t.state=1 AND t.key_version=c.key_version), "
            "(SELECT count(*) FROM subjects)").fetchone() or (0, 0)
    assert live == count and subjects == count


def _server(tmp_path: Path, url: str) -> ServerProcess:
    # One journal page per checkpoint, every half second: kills land in checkpoints too.
    return ServerProcess(tmp_path / "data", args=["--store", url],
                         env={"VAULT_JOURNAL_PAGES": "1", "VAULT_MAINTENANCE_INTERVAL": "0.5"})


def test_sigkill_of_the_vault_loses_nothing_acknowledged(tmp_path: Path, pg_url: str,
                                                         faces: np.ndarray) -> None:
    server = _server(tmp_path, pg_url).start()
    rng = random.Random(11)
    acked: dict[int, str] = {}
    attempted = 0
    try:
        with server.channel() as channel:
            vault_pb2_grpc.TemplateVaultStub(channel).CreateCollection(
                pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
        for _ in range(2):
            enroller = Enroller(server.target, faces, attempted, acked)
            enroller.start()
            time.sleep(rng.uniform(1.0, 2.5))
            server.kill()
            enroller.join(timeout=60)
            attempted = enroller.next + 1  # the request in flight may have been committed
            server.start()
            _check(server, pg_url, faces, acked, attempted)
            attempted = enroller.next  # retried with its request id by the check
        assert len(acked) > 0
    finally:
        server.stop()
    assert "integrity failure" not in server.log_path.read_text()


class RetryingEnroller(threading.Thread):
    """Enrolls subject after subject, retrying each (same request id) until acknowledged;
    records the status codes of the failures and when each acknowledgement came."""

    def __init__(self, target: str, faces: np.ndarray) -> None:
        super().__init__(daemon=True)
        self.target, self.faces = target, faces
        self.acked: dict[int, str] = {}
        self.failures: list[grpc.StatusCode] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            n = 0
            while not self.stop.is_set() and n < len(self.faces):
                try:
                    self.acked[n] = _enroll(stub, self.faces, n)
                    n += 1
                except grpc.RpcError as err:
                    self.failures.append(err.code())
                    time.sleep(0.2)


def test_a_postgresql_crash_is_unavailable_then_recovered(tmp_path: Path, faces: np.ndarray) -> None:
    database = PostgresServer().start()  # its own: this test crashes it
    try:
        url = database.create_database()
        server = _server(tmp_path, url).start()
        try:
            with server.channel() as channel:
                vault_pb2_grpc.TemplateVaultStub(channel).CreateCollection(
                    pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
            enroller = RetryingEnroller(server.target, faces)
            enroller.start()
            time.sleep(1.5)
            database.stop("immediate")  # a crash: no checkpoint, connections cut
            before = len(enroller.acked)
            deadline = time.monotonic() + 60
            while len(enroller.failures) < 3:
                assert time.monotonic() < deadline, "no call failed while PostgreSQL was down"
                time.sleep(0.1)
            assert len(enroller.acked) <= before + 1  # at most the one that was committing
            database.start()
            down = list(enroller.failures)
            deadline = time.monotonic() + 60
            while len(enroller.acked) < before + 5:
                assert time.monotonic() < deadline, "enrollment did not recover"
                time.sleep(0.1)
            enroller.stop.set()
            enroller.join(timeout=60)
            assert set(down) == {grpc.StatusCode.UNAVAILABLE}
            acked = enroller.acked
            _check(server, url, faces, acked, len(acked))
            server.stop()
            server.start()  # and after a restart of the vault too
            _check(server, url, faces, acked, len(acked))
        finally:
            server.stop()
        assert "integrity failure" not in server.log_path.read_text()
    finally:
        database.close()

