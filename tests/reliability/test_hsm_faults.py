"""The real SoftHSM token goes away under a real server process, and comes back.

Faults: the token directory disappears mid-service; the server starts with a wrong PIN;
the server starts while the PKCS#11 module path does not exist. Each time: RPCs get
UNAVAILABLE naming the HSM, health says NOT_SERVING, the database does not change, and
(except for the wrong PIN, which must not be retried against a real HSM) service resumes
by itself when the token is back.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from tests.reliability.conftest import row_counts
from vault.keys.softhsm import DEFAULT_MODULE
from vault.testing import ServerProcess, record_figures, scaled
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _stub(server: ServerProcess) -> tuple[grpc.Channel, vault_pb2_grpc.TemplateVaultStub]:
    channel = server.channel()
    return channel, vault_pb2_grpc.TemplateVaultStub(channel)


def _seed(server: ServerProcess, faces: np.ndarray) -> None:
    channel, stub = _stub(server)
    with channel:
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
        for i in range(2):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{i}",
                                         embedding=faces[i].tolist(), request_id=f"r{i}"), timeout=60)


def _all_unavailable(server: ServerProcess, faces: np.ndarray, reason: str) -> None:
    channel, stub = _stub(server)
    with channel:
        for call, request in [
            (stub.Enroll, pb.EnrollRequest(collection_id="c", subject_id="s9", embedding=faces[9].tolist())),
            (stub.Match, pb.MatchRequest(collection_id="c", subject_id="s0", embedding=faces[0].tolist())),
            (stub.Match, pb.MatchRequest(collection_id="c", embedding=faces[0].tolist())),
            (stub.DeleteSubject, pb.DeleteSubjectRequest(collection_id="c", subject_id="s0")),
            (stub.CreateCollection, pb.CreateCollectionRequest(collection_id="d", dimension=8, threshold=0.5)),
        ]:
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
            assert reason in err.value.details()


def _serves(server: ServerProcess, faces: np.ndarray, expected_templates: int) -> None:
    channel, stub = _stub(server)
    with channel:
        assert stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count == expected_templates
        assert stub.Match(pb.MatchRequest(collection_id="c", subject_id="s0",
                                          embedding=faces[0].tolist()), timeout=30).matched


def test_token_directory_disappears_and_comes_back(tmp_path: Path, faces: np.ndarray) -> None:
    cycles = scaled(1, 10)
    detect, recover = [], []
    server = ServerProcess(tmp_path / "data")
    with server:
        _seed(server, faces)
        tokens = server.hsm_dir / "tokens"
        for cycle in range(cycles):
            before = row_counts(server.data_dir / "vault.db")
            t0 = time.monotonic()
            tokens.rename(tmp_path / "tokens-away")
            server.wait_health(NOT_SERVING)
            detect.append(time.monotonic() - t0)
            _all_unavailable(server, faces, "HSM unavailable")
            assert row_counts(server.data_dir / "vault.db") == before

            t0 = time.monotonic()
            (tmp_path / "tokens-away").rename(tokens)
            server.wait_health(SERVING)  # by itself, no restart
            recover.append(time.monotonic() - t0)
            _serves(server, faces, 2 + cycle)
            channel, stub = _stub(server)
            with channel:
                stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"t{cycle}",
                                             embedding=faces[10 + cycle].tolist()), timeout=60)
            _serves(server, faces, 3 + cycle)
    record_figures("hsm_token_loss", {
        "cycles": cycles, "check_interval_s": 0.5,
        "not_serving_after_s_max": round(max(detect), 2),
        "serving_again_after_s_max": round(max(recover), 2),
        "writes_while_out": 0})


def test_missing_token_at_start_is_not_replaced_by_a_new_one(tmp_path: Path, faces: np.ndarray) -> None:
    data = tmp_path / "data"
    with ServerProcess(data) as server:
        _seed(server, faces)
    tokens = server.hsm_dir / "tokens"
    tokens.rename(tmp_path / "tokens-away")
    server = ServerProcess(data)
    server.start(serving=False)
    try:
        assert server.health() == NOT_SERVING
        _all_unavailable(server, faces, "token directory is missing")
        assert not tokens.exists()  # no fresh, empty token was provisioned in its place
        (tmp_path / "tokens-away").rename(tokens)
        server.wait_health(SERVING)
        _serves(server, faces, 2)
    finally:
        server.stop()


def test_wrong_pin_at_start_is_reported_and_not_retried(tmp_path: Path, faces: np.ndarray) -> None:
    data = tmp_path / "data"
    with ServerProcess(data) as server:
        _seed(server, faces)
    before = row_counts(data / "vault.db")
    server = ServerProcess(data, env={"VAULT_HSM_PIN": "0000-not-the-pin"})
    server.start(serving=False)
    try:
        _all_unavailable(server, faces, "rejected the PIN")
        assert server.health() == NOT_SERVING
    finally:
        server.stop()
    log = server.log_path.read_text()
    # One attempt at start, none after: a real HSM would lock the user out.
    assert log.count("rejected the PIN") == 1
    assert row_counts(data / "vault.db") == before
    with ServerProcess(data) as server:  # the right PIN again
        _serves(server, faces, 2)


def test_module_missing_at_start_then_installed(tmp_path: Path, faces: np.ndarray) -> None:
    data = tmp_path / "data"
    with ServerProcess(data) as server:
        _seed(server, faces)
    module = tmp_path / "lib" / "libsofthsm2.so"
    env = {"SOFTHSM2_CONF": str((server.hsm_dir / "softhsm2.conf").resolve()),
           "VAULT_HSM_PIN": (server.hsm_dir / "pin").read_text().strip()}
    server = ServerProcess(data, env=env, args=["--hsm-module", str(module)])
    server.start(serving=False)
    try:
        assert server.health() == NOT_SERVING
        _all_unavailable(server, faces, "module not found")
        module.parent.mkdir()
        os.symlink(DEFAULT_MODULE, module)  # the module appears (a package installed, a mount)
        server.wait_health(SERVING)
        _serves(server, faces, 2)
    finally:
        server.stop()
