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

DIM = 256
BLOCKS = 6  # scored on two threads, a block at a time: ~1.5 ms each at 256-d


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
    faces = rng.standard_normal((BLOCKS * 4096, DIM)).astype(np.float32)
    # Every block is scored (no routing), so a full 1:N match takes several milliseconds.
    with ServerProcess(tmp_path / "data", env={"VAULT_ROUTE_FRACTION": "1"}) as server, \
            server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM, threshold=0.5))
        batches = (pb.ImportTemplatesRequest(collection_id="c", items=[
            pb.ImportItem(subject_id=f"s{k}", embedding=faces[k]) for k in range(i, i + 512)])
            for i in range(0, len(faces), 512))
        results = [r for resp in stub.ImportTemplates(batches, timeout=600) for r in resp.results]
        assert len(results) == len(faces) and all(r.code == 0 for r in results)
        probe = faces[123].tolist()
        # A full match, for reference: it completes and finds its subject.
        full = stub.Match(pb.MatchRequest(collection_id="c", embedding=probe), timeout=60)
        assert [c.subject_id for c in full.candidates] == ["s123"]

        for _ in range(5):
            try:
                stub.Match(pb.MatchRequest(collection_id="c", embedding=probe), timeout=0.002)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server still serves afterwards.
        assert stub.Match(pb.MatchRequest(collection_id="c", embedding=probe), timeout=60).matched
        time.sleep(1.0)  # let the server write its log lines
        events = _events(server.log_path)
    abandoned = [e for e in events if e.get("event") == "match abandoned: the caller is gone"]
    assert abandoned, "no 1:N match was abandoned after its deadline"
    # It stopped part-way: not every block was scored for the caller who left.
    assert all(e["blocks_total"] == BLOCKS for e in abandoned)
    assert any(e["blocks_done"] < BLOCKS for e in abandoned)
    cancelled = [e for e in events if e.get("method") == "Match" and e.get("code") == "CANCELLED"]
    assert cancelled
