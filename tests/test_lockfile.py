"""A second server on a data directory in use is refused at once, with a message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from vault.domain.errors import FailedPrecondition
from vault.lockfile import DataDirLock
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


def test_second_server_on_the_same_data_dir_exits_and_the_first_keeps_serving(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with ServerProcess(data) as first:
        second = ServerProcess(data, log_path=tmp_path / "second.log")
        second.launch()
        assert second.proc.wait(timeout=60) == 1
        second.proc = None
        assert "another vault server" in (tmp_path / "second.log").read_text()
        assert first.health() == health_pb2.HealthCheckResponse.SERVING
        with first.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=4,
                                                             threshold=0.9))
            assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).dimension == 4
    # The lock went with the first server: a restart takes it.
    with ServerProcess(data) as again:
        assert again.health() == health_pb2.HealthCheckResponse.SERVING


def test_lock_is_released_by_the_kernel_when_the_holder_dies(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data").start()
    server.kill()  # SIGKILL: no shutdown code ran, the lock file stays behind
    assert (tmp_path / "data" / "server.pid").exists()
    lock = DataDirLock(tmp_path / "data").acquire()
    lock.release()


def test_lock_refusal_names_the_holder(tmp_path: Path) -> None:
    held = DataDirLock(tmp_path).acquire()
    try:
        with pytest.raises(FailedPrecondition) as refused:
            DataDirLock(tmp_path).acquire()
        assert f"pid {os.getpid()}" in refused.value.message
    finally:
        held.release()
    DataDirLock(tmp_path).acquire().release()  # released: granted again
