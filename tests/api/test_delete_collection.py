"""ListCollections and DeleteCollection (crypto-shredding) against a real server with
mutual TLS, attacked as a thief with an old copy of the data directory and the token."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.testing import CertificateAuthority, ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

Code = grpc.StatusCode
DIM = 16
RNG = np.random.default_rng(13)
FACES = [RNG.standard_normal(DIM) for _ in range(6)]

# Run in a child process: SoftHSM is configured once per process, and this one already
# serves the test suite's own token. Prints "opened" or the exception's class name.
_OPEN_SEALED = """
import sqlite3, sys
from pathlib import Path
from vault.crypto import aad
from vault.keys import envelope, softhsm
from vault.keys.hsm import Hsm
db_path, hsm_dir, cid = sys.argv[1:4]
db = sqlite3.connect(db_path)
params, sealed = db.execute("SELECT he_params, sealed_secret_context FROM collection_keys "
                            "WHERE collection_id=? AND key_version=1", (cid,)).fetchone()
hsm = Hsm(softhsm.provision(Path(hsm_dir), create=False))
try:
    envelope.open_sealed(hsm, sealed, aad.secret_context(cid, 1, params))
    print("opened")
except Exception as exc:
    print(type(exc).__name__)
"""


def _open_sealed(data_dir: Path, hsm_dir: Path, cid: str) -> str:
    done = subprocess.run([sys.executable, "-c", _OPEN_SEALED, str(data_dir / "vault.db"),
                           str(hsm_dir), cid], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _code(call, request) -> Code:  # type: ignore[no-untyped-def]
    try:
        call(request, timeout=30)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def _secrets(data_dir: Path, cid: str) -> list[bytes]:
    """The collection's sealed secret contexts, sealed subject ids and ciphertexts (journal
    pages, block file windows) as stored: what must not survive its deletion."""
    db = sqlite3.connect(f"file:{data_dir / 'vault.db'}?mode=ro", uri=True)
    found = [r[0] for q in ("SELECT sealed_secret_context FROM collection_keys WHERE collection_id=?",
                            "SELECT sealed_subject_id FROM subjects WHERE collection_id=?",
                            "SELECT ciphertext FROM pages WHERE collection_id=?")
             for r in db.execute(q, (cid,))]
    db.close()
    for path in (data_dir / "blocks" / cid).rglob("*.blk"):
        data = path.read_bytes()
        found += [data[i:i + 64] for i in range(4096, len(data) - 64, len(data) // 8 or 1)]
    # 32-byte windows from the middle of each blob: random-looking, so a hit means a copy.
    return [b[len(b) // 2 - 16:len(b) // 2 + 16] for b in found if len(b) >= 32]


def _everything(data_dir: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


def _copy(server: ServerProcess, to: Path) -> Path:
    server.stop()
    shutil.copytree(server.data_dir, to)
    server.start()
    return to


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> CertificateAuthority:  # type: ignore[no-untyped-def]
    pki = CertificateAuthority(tmp_path_factory.mktemp("pki"))
    pki.issue("gate", ("matcher",))
    pki.issue("enroll-svc", ("enroller",))
    return pki


def test_list_collections_pages_by_id_with_an_opaque_token(tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    with ServerProcess(tmp_path / "data", pki=pki, env={"VAULT_RATE_LIMIT": "0"}) as server:
        admin = vault_pb2_grpc.TemplateVaultStub(server.channel())
        for cid in ("c", "a", "e", "b", "d"):
            admin.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, dimension=DIM,
                                                              threshold=0.7), timeout=60)
        gate = vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, "gate"))
        seen, token, pages = [], "", 0
        while True:
            page = gate.ListCollections(pb.ListCollectionsRequest(page_size=2, page_token=token),
                                        timeout=30)
            seen += [c.collection_id for c in page.collections]
            pages, token = pages + 1, page.next_page_token
            if not token:
                break
        assert seen == ["a", "b", "c", "d", "e"] and pages == 3
        whole = admin.ListCollections(pb.ListCollectionsRequest(), timeout=30)
        one = admin.GetCollection(pb.GetCollectionRequest(collection_id="c"), timeout=30)
        assert whole.collections[2] == one and not whole.next_page_token
        for bad in (pb.ListCollectionsRequest(page_size=-1),
                    pb.ListCollectionsRequest(page_size=1001),
                    pb.ListCollectionsRequest(page_token="not a token"),
                    pb.ListCollectionsRequest(page_token="YWZ0ZXI6Li4v")):  # "after:../"
            assert _code(gate.ListCollections, bad) == Code.INVALID_ARGUMENT
        assert _code(gate.DeleteCollection, pb.DeleteCollectionRequest(collection_id="a")) \
            == Code.PERMISSION_DENIED


def test_a_deleted_collection_is_shredded_and_an_old_copy_dies_with_the_master_key(
        tmp_path: Path, pki) -> None:  # type: ignore[no-untyped-def]
    hsm_dir = tmp_path / "hsm"
    server = ServerProcess(tmp_path / "data", pki=pki, hsm_dir=hsm_dir,
                           env={"VAULT_RATE_LIMIT": "0"}).start()
    try:
        admin = vault_pb2_grpc.TemplateVaultStub(server.channel())
        for cid in ("gone", "kept"):
            admin.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, dimension=DIM,
                                                              threshold=0.9), timeout=60)
        enroller = vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, "enroll-svc"))
        for i, face in enumerate(FACES):
            for cid in ("gone", "kept"):
                enroller.Enroll(pb.EnrollRequest(collection_id=cid, subject_id=f"person-{i}",
                                                 embedding=face.tolist(),
                                                 request_id=f"{cid}-{i}"), timeout=60)
        old = _copy(server, tmp_path / "old")
        secrets = _secrets(old, "gone")
        assert len(secrets) >= 7  # a sealed context, six sealed ids, ciphertexts
        admin = vault_pb2_grpc.TemplateVaultStub(server.channel())
        deleted = admin.DeleteCollection(pb.DeleteCollectionRequest(collection_id="gone"), timeout=60)
        assert deleted.templates_deleted == len(FACES)
        # (a) NOT_FOUND for the collection and every RPC on it; the other one still serves.
        gate = vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, "gate"))
        probe = FACES[0].tolist()
        for call, request in (
                (admin.GetCollection, pb.GetCollectionRequest(collection_id="gone")),
                (admin.UpdateCollection, pb.UpdateCollectionRequest(collection_id="gone", threshold=0.5)),
                (admin.DeleteCollection, pb.DeleteCollectionRequest(collection_id="gone")),
                (enroller.Enroll, pb.EnrollRequest(collection_id="gone", subject_id="x", embedding=probe)),
                (gate.Match, pb.MatchRequest(collection_id="gone", embedding=probe)),
                (gate.Match, pb.MatchRequest(collection_id="gone", subject_id="person-0", embedding=probe)),
                (admin.DeleteSubject, pb.DeleteSubjectRequest(collection_id="gone", subject_id="person-0")),
                (admin.RotateCollectionKey, pb.RotateCollectionKeyRequest(collection_id="gone"))):
            assert _code(call, request) == Code.NOT_FOUND, call
        listed = admin.ListCollections(pb.ListCollectionsRequest(), timeout=30)
        assert [c.collection_id for c in listed.collections] == ["kept"]
        assert gate.Match(pb.MatchRequest(collection_id="kept", embedding=probe), timeout=30).matched
        # (b) a fresh copy holds no byte of its sealed contexts, sealed ids or ciphertexts.
        fresh = _everything(_copy(server, tmp_path / "fresh"))
        assert not [s for s in secrets if s in fresh]
        assert not (tmp_path / "fresh" / "blocks" / "gone").exists()
        # (c) the KEK is shared: the old copy plus the token still opens it...
        assert _open_sealed(old, hsm_dir, "gone") == "opened"
        admin = vault_pb2_grpc.TemplateVaultStub(server.channel())
        rotation = admin.RotateMasterKey(pb.RotateMasterKeyRequest(), timeout=120)
        assert rotation.destroyed_versions
        server.stop()
        # ...until the master key is rotated: the version that sealed it is destroyed.
        assert _open_sealed(old, hsm_dir, "gone") != "opened"
        server.start()
        # The same id again is a new collection: empty, and the old faces match nobody.
        admin = vault_pb2_grpc.TemplateVaultStub(server.channel())
        again = admin.CreateCollection(pb.CreateCollectionRequest(collection_id="gone", dimension=DIM,
                                                                  threshold=0.9), timeout=60)
        assert again.template_count == 0
        gate = vault_pb2_grpc.TemplateVaultStub(pki.channel(server.target, "gate"))
        assert not gate.Match(pb.MatchRequest(collection_id="gone", embedding=probe), timeout=30).matched
        assert _code(gate.Match, pb.MatchRequest(collection_id="gone", subject_id="person-0",
                                                 embedding=probe)) in (Code.NOT_FOUND, Code.OK)
    finally:
        server.stop()
    db = sqlite3.connect(f"file:{server.data_dir / 'audit.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT actor, outcome, collection_id FROM entries WHERE "
                      "method='DeleteCollection' AND kind='response'").fetchall()
    db.close()
    assert ("admin", "OK", "gone") in rows, json.dumps(rows)
