"""Key lifecycle over gRPC and with `vault keys`, against a real server of its own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 24
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[tuple[ServerProcess, vault_pb2_grpc.TemplateVaultStub]]:
    server = ServerProcess(tmp_path_factory.mktemp("keys") / "data")
    with server, server.channel() as channel:
        yield server, vault_pb2_grpc.TemplateVaultStub(channel)


def _faces(n: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, DIM)).astype(np.float32)


def _wait(stub, job: pb.KeyJob) -> pb.KeyJob:
    deadline = time.monotonic() + 300
    while job.state == pb.KeyJob.STATE_RUNNING and time.monotonic() < deadline:
        time.sleep(0.2)
        job = stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job.job_id))
    return job


def test_rotate_a_collection_over_grpc(keyed) -> None:
    _, stub = keyed
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id="k", dimension=DIM, threshold=0.8))
    faces = _faces(40)
    for i, f in enumerate(faces):
        stub.Enroll(pb.EnrollRequest(collection_id="k", subject_id=f"s{i}", embedding=f))
    job = stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id="k"))
    assert (job.from_version, job.to_version, job.state) == (1, 2, pb.KeyJob.STATE_RUNNING)
    listed = stub.ListKeyVersions(pb.ListKeyVersionsRequest(collection_id="k"))
    assert listed.key_version == 1 and list(listed.key_versions) in ([1, 2], [2])
    done = _wait(stub, job)
    assert done.state == pb.KeyJob.STATE_DONE and done.blocks_done == done.blocks_total
    info = stub.GetCollection(pb.GetCollectionRequest(collection_id="k"))
    assert (info.key_version, info.min_key_version, info.template_count) == (2, 2, 40)
    r = stub.Match(pb.MatchRequest(collection_id="k", subject_id="s5", embedding=faces[5]))
    assert r.matched
    listed = stub.ListKeyVersions(pb.ListKeyVersionsRequest(collection_id="k"))
    assert list(listed.key_versions) == [2] and not listed.HasField("job")


def test_key_requests_are_checked(keyed) -> None:
    _, stub = keyed
    cases = [
        (stub.GetKeyJob, pb.GetKeyJobRequest(job_id="nope"), Code.INVALID_ARGUMENT, "job_id"),
        (stub.GetKeyJob, pb.GetKeyJobRequest(job_id="0" * 32), Code.NOT_FOUND, "job"),
        (stub.RotateCollectionKey, pb.RotateCollectionKeyRequest(collection_id="nope"),
         Code.NOT_FOUND, "collection"),
        (stub.SetMinKeyVersion, pb.SetMinKeyVersionRequest(collection_id="k", min_key_version=9),
         Code.FAILED_PRECONDITION, "min_key_version must be between"),
        (stub.ListKeyVersions, pb.ListKeyVersionsRequest(collection_id="bad id!"),
         Code.INVALID_ARGUMENT, "collection_id"),
    ]
    for call, request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            call(request)
        assert err.value.code() == code and text in err.value.details()


def test_master_key_rotation_over_grpc_and_a_restart(keyed) -> None:
    server, stub = keyed
    before = stub.ListKeyVersions(pb.ListKeyVersionsRequest())
    r = stub.RotateMasterKey(pb.RotateMasterKeyRequest())
    assert r.version == before.current_master_key_version + 1 and r.rewrapped >= 3
    assert list(r.destroyed_versions) == list(before.master_key_versions)
    after = stub.ListKeyVersions(pb.ListKeyVersionsRequest())
    assert list(after.master_key_versions) == [r.version]
    again = stub.RewrapKeys(pb.RewrapKeysRequest())
    assert (again.version, again.rewrapped, list(again.destroyed_versions)) == (r.version, 0, [])
    server.stop()
    server.start()
    with server.channel() as channel:
        fresh = vault_pb2_grpc.TemplateVaultStub(channel)
        assert fresh.GetCollection(pb.GetCollectionRequest(collection_id="k")).template_count == 40


def test_vault_keys_command(keyed) -> None:
    server, stub = keyed
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id="cli", dimension=DIM, threshold=0.8))
    stub.Enroll(pb.EnrollRequest(collection_id="cli", subject_id="a", embedding=_faces(1)[0]))

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vault", "keys", "--target", server.target, *args],
                              check=False, capture_output=True, text=True, timeout=300)

    out = keys("rotate", "--collection", "cli", "--wait")
    assert out.returncode == 0, out.stderr
    assert "v1 -> v2" in out.stdout and "done" in out.stdout.splitlines()[-1]
    out = keys("list", "--collection", "cli")
    assert "key version v2, minimum v2" in out.stdout
    job_id = out.stdout.split()[1].rstrip(":") if "job" in out.stdout.split()[0] else None
    assert job_id is None  # no unfinished rotation to show
    out = keys("set-min", "--collection", "cli", "--version", "1")
    assert out.returncode == 1 and "FAILED_PRECONDITION" in out.stderr  # an RPC failure
