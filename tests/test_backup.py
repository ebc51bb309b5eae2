"""``vault backup`` of a live server under parallel enrollments holds no key, and restored
(files copied back, ``vault restore --accept-rollback``) it serves the backed-up templates,
and only them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.testing import ServerProcess, free_port
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

CLEAN = ("SOFTHSM2_CONF", "VAULT_HSM_PIN", "VAULT_HSM_PIN_FILE", "VAULT_DATA_DIR", "VAULT_HSM_DIR")


def _vault(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True,
                          text=True, env=env, timeout=120, check=False)


def _verify(stub: vault_pb2_grpc.TemplateVaultStub, subject: str, face: np.ndarray) -> bool:
    return stub.Match(pb.MatchRequest(collection_id="c", subject_id=subject,
                                      embedding=face.tolist()), timeout=60).matched


def test_backup_of_a_live_server_restores_and_matches(tmp_path: Path, lfw: dict) -> None:
    firsts = [int(np.flatnonzero(lfw["ids"] == p)[0]) for p in np.unique(lfw["ids"])[:140]]
    faces = lfw["emb"][firsts]
    imported, enrolled, during, after = faces[:60], faces[60:64], faces[64:136], faces[136:140]
    data, hsm, copy = tmp_path / "data", tmp_path / "hsm", tmp_path / "backup"
    # One journal page before a merge: block generations are replaced while the backup runs.
    args = ["--journal-pages", "1", "--maintenance-interval", "0.2"]
    server = ServerProcess(data, hsm_dir=hsm, args=args).start()
    done_before: list[int] = []
    try:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                             threshold=0.9), timeout=60)
            results = list(stub.ImportTemplates(iter([pb.ImportTemplatesRequest(
                collection_id="c", items=[pb.ImportItem(subject_id=f"i{k}", embedding=f.tolist())
                                          for k, f in enumerate(imported)])]), timeout=120))
            assert all(r.code == 0 for m in results for r in m.results)
            for k, face in enumerate(enrolled):
                stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{k}",
                                             embedding=face.tolist()), timeout=60)
            done: list[int] = []
            stop = threading.Event()

            def writer() -> None:  # enrollments in parallel with the backup
                for k, face in enumerate(during):
                    if stop.is_set():
                        return
                    stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"w{k}",
                                                 embedding=face.tolist()), timeout=60)
                    done.append(k)

            thread = threading.Thread(target=writer)
            thread.start()
            while len(done) < 8:
                thread.join(0.05)
            done_before = list(done)
            out = _vault("backup", "--data-dir", str(data), "--to", str(copy))
            done_after = list(done)
            stop.set()
            thread.join()
            assert out.returncode == 0, out.stderr
            assert "backup in" in out.stdout
            for k, face in enumerate(after):
                stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"p{k}",
                                             embedding=face.tolist()), timeout=60)
            for _ in range(70):  # past an audit checkpoint: the token's counter moves on
                stub.GetCollection(pb.GetCollectionRequest(collection_id="c"), timeout=30)
    finally:
        server.stop()

    # The backup holds no key: no token store, no PIN, no SoftHSM configuration, and no
    # file with the PIN's bytes in it.
    names = {p.name for p in copy.rglob("*")}
    assert not names & {"tokens", "pin", "softhsm2.conf", "server.pid"}
    pin = (hsm / "pin").read_bytes().strip()
    assert len(pin) >= 8
    for path in copy.rglob("*"):
        if path.is_file():
            assert pin not in path.read_bytes(), path
    assert not list(copy.rglob("*.partial"))

    shutil.rmtree(data)
    shutil.copytree(copy, data, ignore=shutil.ignore_patterns("BACKUP.json"))
    refused = _vault("serve", "--data-dir", str(data), "--hsm-dir", str(hsm),
                     "--listen", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 2 and "vault restore --accept-rollback" in refused.stderr
    accepted = _vault("restore", "--accept-rollback", "--data-dir", str(data), "--hsm-dir", str(hsm))
    assert accepted.returncode == 0, accepted.stderr
    verify = _vault("audit", "verify", "--data-dir", str(data), "--hsm-dir", str(hsm))
    assert verify.returncode == 0, verify.stdout

    with ServerProcess(data, hsm_dir=hsm, args=args) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        count = stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count
        assert 64 + len(done_before) <= count <= 64 + len(done_after)
        assert all(_verify(stub, f"i{k}", f) for k, f in enumerate(imported))  # block files
        assert all(_verify(stub, f"s{k}", f) for k, f in enumerate(enrolled))  # journal
        assert all(_verify(stub, f"w{k}", during[k]) for k in done_before)
        for k, face in enumerate(after):  # enrolled after the backup: not in it
            with pytest.raises(grpc.RpcError) as err:
                _verify(stub, f"p{k}", face)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_backup_refuses_a_damaged_block_file(tmp_path: Path, lfw: dict) -> None:
    data, copy = tmp_path / "data", tmp_path / "backup"
    with ServerProcess(data) as server, server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                         threshold=0.9), timeout=60)
        list(stub.ImportTemplates(iter([pb.ImportTemplatesRequest(
            collection_id="c", items=[pb.ImportItem(subject_id=f"i{k}", embedding=f.tolist())
                                      for k, f in enumerate(lfw["emb"][:20])])]), timeout=120))
        block = next((data / "blocks").rglob("*.blk"))
        with open(block, "r+b") as f:  # one byte of a file the backup did not write
            f.seek(5000)
            byte = f.read(1)
            f.seek(5000)
            f.write(bytes([byte[0] ^ 1]))
        out = _vault("backup", "--data-dir", str(data), "--to", str(copy))
    assert out.returncode == 1
    assert out.stderr.strip() == (f"vault backup: block file {block} does not match its database "
                                  "row (damaged or replaced behind the vault's back): nothing was "
                                  "kept; the server reports it as DATA_LOSS")
    assert not copy.exists()
