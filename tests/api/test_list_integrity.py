"""ListCollections checks each row's MAC: a collection row edited in the live vault.db (an
attacker with write access to the data directory lowering a threshold) is listed as
damaged with its reason, never with its settings as if fine; and no admin call signs the
edited row afresh (SetMinKeyVersion answers DATA_LOSS, so putting the old value back makes
the row whole again: nothing laundered it)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

REASON = "collection record failed its integrity check"


def _listed(stub: vault_pb2_grpc.TemplateVaultStub, page_size: int
            ) -> tuple[dict[str, float], dict[str, str]]:
    fine, damaged, token = {}, {}, ""
    while True:
        page = stub.ListCollections(pb.ListCollectionsRequest(page_size=page_size,
                                                              page_token=token), timeout=30)
        fine.update({c.collection_id: round(c.threshold, 4) for c in page.collections})
        damaged.update({d.collection_id: d.reason for d in page.damaged})
        token = page.next_page_token
        if not token:
            return fine, damaged


def test_a_tampered_collection_row_is_listed_as_damaged(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "data", env={"VAULT_RATE_LIMIT": "0"}) as server, \
            server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        for cid in ("a", "b", "c"):
            stub.CreateCollection(pb.CreateCollectionRequest(
                collection_id=cid, dimension=8, threshold=0.9), timeout=120)
        assert _listed(stub, 2) == ({"a": 0.9, "b": 0.9, "c": 0.9}, {})
        db = sqlite3.connect(server.data_dir / "vault.db", timeout=30)
        (signed,) = db.execute("SELECT threshold FROM collections WHERE collection_id='b'").fetchone()
        with db:  # accept everyone in b
            db.execute("UPDATE collections SET threshold=-1.0 WHERE collection_id='b'")
        for page_size in (1, 2, 0):
            assert _listed(stub, page_size) == ({"a": 0.9, "c": 0.9}, {"b": REASON})
        out = subprocess.run([sys.executable, "-m", "vault", "collections", "list",
                              "--target", server.target], check=False, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 1
        # The client package says so too (damaged, with the reason; never among the served).
        script = ("import sys\nfrom vault_client import VaultClient\n"
                  "with VaultClient(sys.argv[1]) as c:\n"
                  "    listed = c.list_collections(page_size=1)\n"
                  "    print(','.join(x.collection_id for x in listed), listed.damaged)\n")
        client_dir = Path(__file__).resolve().parents[2] / "client"
        sdk = subprocess.run([sys.executable, "-c", script, server.target], check=False,
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(client_dir)})
        assert sdk.returncode == 0, sdk.stderr
        assert sdk.stdout.split(" ", 1) == ["a,c", f"{{'b': '{REASON}'}}\n"]
        settings = "dimension=8 threshold=0.9 key_version=1 min_key_version=1 templates=0 "
        assert out.stdout.splitlines() == [f"a\t{settings}require_purpose=no",
                                           f"c\t{settings}require_purpose=no",
                                           f"b\tDAMAGED: {REASON}"]
        for call, request in ((stub.GetCollection, pb.GetCollectionRequest(collection_id="b")),
                              (stub.SetMinKeyVersion, pb.SetMinKeyVersionRequest(
                                  collection_id="b", min_key_version=1))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.DATA_LOSS
            assert err.value.details() == REASON
        with db:  # the signed value back: its MAC holds, so nothing signed the edited row
            db.execute("UPDATE collections SET threshold=? WHERE collection_id='b'", (signed,))
        db.close()
        assert _listed(stub, 0) == ({"a": 0.9, "b": 0.9, "c": 0.9}, {})
