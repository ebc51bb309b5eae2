"""The data directory's filesystem fills up: enrollments fail cleanly, earlier data stays
intact, the audit log fails closed, and service resumes by itself once space is freed.

The filesystem is a real size-limited tmpfs mounted by the test (needs root, which the CI
machine and the dev machines have); elsewhere the test is skipped and says why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.reliability.conftest import row_counts
from vault.testing import ServerProcess, record_figures
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 16  # small blocks, so that a few megabytes hold a working vault


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> int:
    """Write a ballast file until the filesystem refuses; returns the bytes written."""
    written = 0
    chunk = b"\0" * (64 << 10)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                written += f.write(chunk)
        except OSError:
            pass
    return written


def test_disk_full_fails_enrollments_cleanly_and_recovers(small_fs: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    faces = rng.standard_normal((40, DIM))
    server = ServerProcess(small_fs / "data", log_path=tmp_path / "server.log")
    with server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM, threshold=0.9))
        for n in range(3):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                         embedding=faces[n].tolist(), request_id=f"e{n}"), timeout=30)
        ballast = small_fs / "ballast"
        assert _fill(ballast) > 0
        before = row_counts(server.data_dir / "vault.db")

        refused = 0
        for n in range(3, 8):
            try:
                stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                             embedding=faces[n].tolist(), request_id=f"e{n}"), timeout=30)
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE), \
                    err.details()
                assert "storage" in err.details()
                refused += 1
        assert refused == 5  # nothing fits on a full disk
        assert row_counts(server.data_dir / "vault.db") == before
        # An import writes a block file: refused the same way, and no partial file stays.
        items = [pb.ImportItem(subject_id=f"i{k}", embedding=v.tolist())
                 for k, v in enumerate(rng.standard_normal((300, DIM)))]
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ImportTemplates(iter([pb.ImportTemplatesRequest(collection_id="c", items=items)]),
                                      timeout=60))
        assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
        assert "storage" in err.value.details() or "audit" in err.value.details()
        assert row_counts(server.data_dir / "vault.db") == before
        assert not list((server.data_dir / "blocks").rglob("*.tmp"))
        # Reads need an audit entry too, and the audit log fails closed: a match is either
        # answered correctly or refused as UNAVAILABLE, never answered unaudited.
        for n in range(3):
            try:
                assert stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"s{n}",
                                                  embedding=faces[n].tolist()), timeout=30).matched
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAVAILABLE and "audit" in err.details()

        ballast.unlink()  # space is freed: the same requests now succeed, no restart
        assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count == 3
        for n in range(3):  # earlier data is intact
            assert stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"s{n}",
                                              embedding=faces[n].tolist()), timeout=30).matched
        for n in range(3, 8):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                         embedding=faces[n].tolist(), request_id=f"e{n}"), timeout=30)
        assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count == 8

    with ServerProcess(small_fs / "data", log_path=tmp_path / "server.log") as server, \
            server.channel() as channel:  # and a restart finds everything, every MAC good
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count == 8
        for n in range(8):
            assert stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"s{n}",
                                              embedding=faces[n].tolist()), timeout=30).matched
    assert "integrity failure" not in (tmp_path / "server.log").read_text()
    record_figures("disk_full", {"filesystem": "tmpfs 24 MiB", "enrollments_refused": refused,
                                 "rows_changed_while_full": 0, "templates_after_recovery": 8})
