"""``vault import``'s progress against a real gRPC server over a real vault: "sent" moves
as the vault reads the items, "answered" moves per stored chunk (chunks made small here
with the vault's import_chunk_bytes tuning, so that one import spans three), a heartbeat
says the vault is still encrypting after everything was sent, and a re-run reports
"0 new, N already stored" with the note saying so, not "stored"."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault import import_client, logs
from vault.api.server import build_server
from vault.core import Tuning
from vault.keys.hsm import HsmConfig
from vault.service import Vault
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 8


@pytest.fixture
def target(tmp_path: Path, hsm_config: HsmConfig) -> Iterator[str]:
    vault = Vault.open(tmp_path / "data", hsm_config,
                       tuning=Tuning(import_chunk_bytes=1, maintenance_interval=0, workers=1))
    server, port, _ = build_server(vault, "127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=1).wait()
        vault.close()


def test_import_progress_moves_per_chunk_and_a_rerun_stores_nothing(target: str,
                                                                    tmp_path: Path) -> None:
    out = io.StringIO()
    logs.configure(stream=out)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(
                collection_id="c", dimension=DIM, threshold=0.8), timeout=60)
            slots = 4096  # one block: the smallest chunk
            n = 2 * slots + 50
            rng = np.random.default_rng(2)
            path = tmp_path / "faces.npz"
            np.savez(path, embeddings=rng.standard_normal((n, DIM)).astype(np.float32),
                     subject_ids=np.array([f"s{k}" for k in range(n)]))
            first = import_client.run("c", path, 256, channel, progress=False, heartbeat=0.05)
            lines = [json.loads(line) for line in out.getvalue().splitlines()]
            out.seek(0)
            out.truncate()
            again = import_client.run("c", path, 256, channel, progress=False)
            rerun = [json.loads(line) for line in out.getvalue().splitlines()]
            count = stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count
    finally:
        logs.configure()
    assert (first.stored, first.replayed, first.failed) == (n, 0, 0)
    assert (again.stored, again.replayed, again.failed) == (0, n, 0)
    assert count == n
    progress = [e for e in lines if e["event"] == "progress"]
    sent = [e["count"] for e in progress if e["kind"] == "sent"]
    assert sent == sorted(set(sent)) and len(sent) == 10 and sent[-1] == n
    answered = [e for e in progress if e["kind"] == "answered"]
    moved = sorted({e["count"] for e in answered if "encrypting" not in e["status"]})
    assert moved == [slots, 2 * slots, n]  # a step per chunk (and the tail), not one jump
    assert any(e["status"].endswith(" s)") and "the vault is encrypting and storing" in e["status"]
               for e in answered)
    done = [e for e in rerun if e["event"] == "progress" and e["kind"] == "answered"]
    assert done[-1]["status"] == f"{n}/{n} new=0 already={n} failed=0"
