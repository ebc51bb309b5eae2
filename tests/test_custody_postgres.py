"""Key custody on the PostgreSQL store: the token is bound to the database's id, the
store epoch is the database's, and each node's audit log has its own rollback counter, so
a new node rebuilds its state from the database while an older copy of a node's data
directory is still refused."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


def _node(tmp_path: Path, name: str, url: str, hsm: str = "hsm") -> ServerProcess:
    return ServerProcess(tmp_path / name, args=["--store", url], hsm_dir=tmp_path / hsm)


def _enroll(server: ServerProcess, lfw, subjects: range, create: bool = False) -> None:  # type: ignore[no-untyped-def]
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        if create:
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                             threshold=0.9))
        for n in subjects:
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                         embedding=lfw["emb"][n].tolist()))


def _refusal(server: ServerProcess) -> str:
    with pytest.raises(RuntimeError, match="exited with 2"):
        server.start()
    return server.log_path.read_text()


def test_a_new_node_rebuilds_from_the_database(tmp_path: Path, pg_url: str, lfw) -> None:  # type: ignore[no-untyped-def]
    a = _node(tmp_path, "a", pg_url).start()
    try:
        _enroll(a, lfw, range(70), create=True)  # past a signed audit checkpoint (64)
    finally:
        a.stop()
    b = _node(tmp_path, "b", pg_url).start()  # an empty data directory, the same token
    try:
        with b.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count == 70
            assert stub.Match(pb.MatchRequest(collection_id="c", subject_id="s3",
                                              embedding=lfw["emb"][3].tolist())).matched
    finally:
        b.stop()
    for node in (a, b):  # each node's own audit chain verifies
        done = subprocess.run([sys.executable, "-m", "vault", "audit", "verify", "--data-dir",
                               str(node.data_dir), "--hsm-dir", str(tmp_path / "hsm")],
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_an_older_copy_of_a_nodes_data_directory_is_refused(tmp_path: Path, pg_url: str,
                                                             lfw) -> None:  # type: ignore[no-untyped-def]
    a = _node(tmp_path, "a", pg_url).start()
    _enroll(a, lfw, range(3), create=True)
    a.stop()  # a signed checkpoint at close
    shutil.copytree(a.data_dir, tmp_path / "old")
    a.start()
    _enroll(a, lfw, range(3, 6))
    a.stop()
    shutil.rmtree(a.data_dir)
    shutil.copytree(tmp_path / "old", a.data_dir)
    assert "rollback detected" in _refusal(a)


def test_another_token_is_refused_by_the_database(tmp_path: Path, pg_url: str, lfw) -> None:  # type: ignore[no-untyped-def]
    a = _node(tmp_path, "a", pg_url).start()
    _enroll(a, lfw, range(1), create=True)
    a.stop()
    other = _node(tmp_path, "b", pg_url, hsm="other-hsm")  # a fresh token of its own
    assert "wrong token" in _refusal(other)
