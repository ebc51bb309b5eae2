"""A client that gives up (deadline) stops the server's 1:N work: nobody computes for nobody."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import numpy as np

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 1024  # the widest collection: scoring one block takes 1,024 ciphertext multiply-adds


def _events(log_path: Path) -> list[dict]:
    out = []
    for line in log_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_deadline_shorter_than_a_match_cancels_it_server_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    with ServerProcess(tmp_path / "data") as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM, threshold=0.5))
        x = rng.standard_normal(DIM)
        stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="s", embedding=x.tolist()), timeout=120)
        # A full match, for reference: it completes and matches.
        assert stub.Match(pb.MatchRequest(collection_id="c", embedding=x.tolist()), timeout=60).matched

        for _ in range(5):
            try:
                stub.Match(pb.MatchRequest(collection_id="c", embedding=x.tolist()), timeout=0.005)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server still serves afterwards.
        assert stub.Match(pb.MatchRequest(collection_id="c", embedding=x.tolist()), timeout=60).matched
        time.sleep(1.0)  # let the server write its log lines
        events = _events(server.log_path)
    abandoned = [e for e in events if e.get("event") == "match abandoned: the caller is gone"]
    assert abandoned, "no 1:N match was abandoned after its deadline"
    # It stopped part-way through the only block, not after finishing it.
    assert all(e["blocks_done"] < e["blocks_total"] for e in abandoned)
    # Each abandoned match ended as CANCELLED in the server's own RPC log.
    cancelled = [e for e in events if e.get("method") == "Match" and e.get("code") == "CANCELLED"]
    assert len(cancelled) == len(abandoned)
