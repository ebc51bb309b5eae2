"""Play the attacker who copies the whole data directory, and read the logs.

The vault is started as the README says (``vault serve --data-dir DIR``, nothing else), and
the copy is taken as it is: nothing is removed from it before any test attacks it."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tenseal as ts
from grpc_health.v1 import health_pb2

from vault import he
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

N_SUBJECTS = 12  # enrolled one by one (journal pages, then a checkpointed block)
N_IMPORTED = 120  # real faces imported with synthetic padding (a clustered block)
PADDING = 4096


def _needles(emb: np.ndarray, windows: bool = True) -> list[bytes]:
    """Byte patterns an attacker would grep for: raw and normalised, float32 and float64,
    whole vectors and (``windows``) 4-value windows."""
    out = []
    unit = emb / np.linalg.norm(emb)
    for vec in (emb, unit):
        for dtype in (np.float32, np.float64):
            raw = vec.astype(dtype).tobytes()
            out.append(raw)
            if windows:
                step = np.dtype(dtype).itemsize * 4
                out.extend(raw[i:i + step] for i in range(0, len(raw) - step, step * 8))
    return out


def _copy_if_there(src: str, dst: str) -> None:
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        pass


@pytest.fixture(scope="module")
def leaked(tmp_path_factory, lfw) -> dict:
    """A server that enrolled and imported real faces, checkpointed its journal and
    erased a deleted subject; then a copy of its whole data directory."""
    root = tmp_path_factory.mktemp("leak")
    emb = lfw["emb"]
    names = lfw["names"]
    ids = lfw["ids"]
    firsts = [int(np.flatnonzero(ids == p)[0]) for p in np.unique(ids)]
    picks = firsts[:N_SUBJECTS]
    imported = firsts[N_SUBJECTS:N_SUBJECTS + N_IMPORTED]
    subjects = [f"{names[ids[i]]}-{i}@example.org" for i in picks]
    imported_subjects = [f"{names[ids[i]]}-{i}@example.org" for i in imported]
    padding = np.random.default_rng(5).standard_normal((PADDING, 128)).astype(np.float32)
    server = ServerProcess(root / "data", hsm_dir=None,  # the default token store
                           env={"VAULT_JOURNAL_PAGES": "1", "VAULT_ERASE_AFTER": "0"})
    with server:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="staff", dimension=128,
                                                             threshold=0.92))
            for i, subject in zip(picks, subjects):
                stub.Enroll(pb.EnrollRequest(collection_id="staff", subject_id=subject,
                                             embedding=emb[i].tolist(), request_id=f"req-{subject}"))
            items = [pb.ImportItem(subject_id=s, embedding=emb[i].tolist(), request_id=f"imp-{s}")
                     for i, s in zip(imported, imported_subjects)]
            items += [pb.ImportItem(subject_id=f"pad-{k}", embedding=x.tolist())
                      for k, x in enumerate(padding)]
            batches = [pb.ImportTemplatesRequest(collection_id="staff", items=items[k:k + 500])
                       for k in range(0, len(items), 500)]
            results = [r for resp in stub.ImportTemplates(iter(batches)) for r in resp.results]
            assert len(results) == len(items) and all(r.code == 0 for r in results)
            for i, subject in zip(picks, subjects):
                stub.Match(pb.MatchRequest(collection_id="staff", subject_id=subject,
                                           embedding=emb[i].tolist()))
                stub.Match(pb.MatchRequest(collection_id="staff", embedding=emb[i].tolist(), top_k=3))
            stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="staff", subject_id=subjects[0]))
            stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="staff",
                                                       subject_id=imported_subjects[0]))
        # The maintenance thread checkpoints the journal and erases the deletions.
        blocks = root / "data" / "blocks"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            db = sqlite3.connect(f"file:{root / 'data' / 'vault.db'}?mode=ro", uri=True)
            pending = db.execute("SELECT (SELECT count(*) FROM pages) + (SELECT count(*) FROM "
                                 "templates WHERE state=2 AND erased=0)").fetchone()[0]
            db.close()
            if pending == 0:
                break
            time.sleep(0.5)
        assert pending == 0, "maintenance did not checkpoint and erase in time"
        # The pass that erased also truncates the WAL: wait for it, so that the copy below
        # is not torn between vault.db and a WAL truncated meanwhile (it lost the block
        # rows then, at random).
        wal = root / "data" / "vault.db-wal"
        while wal.exists() and wal.stat().st_size and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not (wal.exists() and wal.stat().st_size), "the WAL was not truncated in time"
        assert len(list(blocks.rglob("*.blk"))) >= 2  # a clustered and a mixed block
        copy = root / "stolen"
        # While it runs, as it is: a file removed meanwhile (a replaced block generation at
        # the end of its grace) is skipped, as `cp -r` or rsync would.
        shutil.copytree(root / "data", copy, symlinks=True, copy_function=_copy_if_there)
    return {"copy": copy, "pin": (server.hsm_dir / "pin").read_text().strip(),
            "hsm_dir": server.hsm_dir, "emb": emb[picks], "imported_emb": emb[imported],
            "subjects": subjects + imported_subjects, "log": server.log_path.read_text()}


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_embedding_or_subject_id_in_any_file(leaked: dict) -> None:
    files = _all_files(leaked["copy"])
    assert any(p.name == "vault.db" for p in files)
    blobs = {p: p.read_bytes() for p in files}
    needles = [n for e in leaked["emb"] for n in _needles(e.astype(np.float64))]
    needles += [n for e in leaked["imported_emb"] for n in _needles(e.astype(np.float64), False)]
    for needle in needles:
        for path, data in blobs.items():
            assert needle not in data, f"embedding bytes found in {path.name}"
    for subject in leaked["subjects"]:
        for form in (subject.encode(), subject.encode("utf-16-le"), subject.split("@")[0].encode()):
            for path, data in blobs.items():
                assert form not in data, f"subject id found in {path.name}"


def test_block_sketches_are_sealed(leaked: dict) -> None:
    """The pre-filter's sketches (block centroids, unit vectors) are AES-GCM at rest: no
    window of a stored sketch reads as a unit vector of floats."""
    db = sqlite3.connect(leaked["copy"] / "vault.db")
    sketches = [r[0] for r in db.execute("SELECT sketch FROM blocks WHERE sketch IS NOT NULL")]
    assert sketches, "no clustered block was stored"
    for blob in sketches:
        assert len(blob) == 12 + 128 * 4 + 16  # nonce, ciphertext, tag
        for dtype in (np.float32, np.float64):
            size = 128 * np.dtype(dtype).itemsize
            for offset in range(0, len(blob) - size + 1, 4):
                vec = np.frombuffer(blob[offset:offset + size], dtype)
                with np.errstate(all="ignore"):
                    norm = float(np.linalg.norm(vec.astype(np.float64)))
                assert not abs(norm - 1.0) < 1e-3


def test_database_holds_only_ciphertexts_wrapped_keys_and_macs(leaked: dict) -> None:
    db = sqlite3.connect(leaked["copy"] / "vault.db")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "templates" in tables
    cols = {r[1] for r in db.execute("PRAGMA table_info(templates)")}
    assert not {"embedding", "vector", "subject_id"} & cols
    # The CKKS secret key is sealed: the stored public context carries no secret key.
    public, = db.execute("SELECT public_context FROM collection_keys").fetchone()
    assert not ts.context_from(public).has_secret_key()
    # Journal pages and blocks hold ciphertexts only; block sketches are sealed.
    cols = {r[1] for r in db.execute("PRAGMA table_info(blocks)")}
    assert cols == {"collection_id", "key_version", "block_no", "kind", "generation", "levels",
                    "fill", "digest", "sketch", "mac"}


def test_no_token_or_pin_in_the_copy(leaked: dict) -> None:
    files = _all_files(leaked["copy"])
    softhsm = [p for p in files if p.suffix in (".object", ".lock") or
               p.name in ("generation", "softhsm2.conf", "pin")]
    assert softhsm == [], f"SoftHSM token files in the copy: {softhsm}"
    assert not [p for p in leaked["copy"].rglob("*") if p.is_symlink()]
    pin = leaked["pin"].encode()
    for path in files:
        assert pin not in path.read_bytes(), f"the PIN is in {path.name}"
    # The token is where the server said, outside the directory that was copied.
    assert list((leaked["hsm_dir"] / "tokens").rglob("token.object"))


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not (k.startswith("VAULT_") or k == "SOFTHSM2_CONF")}


def _probe_server(server: ServerProcess, leaked: dict) -> list[str]:
    """Every enrolled face against the copy, 1:1 and 1:N: what the attacker gets back."""
    outcomes = []
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        for subject, emb in zip(leaked["subjects"], leaked["emb"]):
            for request in (pb.MatchRequest(collection_id="staff", subject_id=subject,
                                            embedding=emb.tolist()),
                            pb.MatchRequest(collection_id="staff", embedding=emb.tolist(),
                                            top_k=3)):
                try:
                    reply = stub.Match(request, timeout=30)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)
                else:
                    assert not reply.matched and not reply.candidates, "the copy matched a face"
                    outcomes.append("no match")
    return outcomes


def test_the_copy_alone_serves_nothing(leaked: dict, tmp_path: Path) -> None:
    """A clean machine: no token, no PIN, no environment; the copy under a new path, then
    with a fresh HSM directory of the attacker's choosing."""
    copy = tmp_path / "data"
    shutil.copytree(leaked["copy"], copy)
    for hsm_dir in (None, tmp_path / "fresh-hsm"):
        server = ServerProcess(copy, env=_clean_env(), hsm_dir=hsm_dir)
        server.launch()
        try:
            deadline = time.monotonic() + 60
            while server.proc.poll() is None and server.health(timeout=1) is None:
                assert time.monotonic() < deadline, "server neither answered nor exited"
                time.sleep(0.2)
            if server.proc.poll() is None:
                assert server.health() == health_pb2.HealthCheckResponse.NOT_SERVING
                assert set(_probe_server(server, leaked)) == {"UNAVAILABLE"}
        finally:
            server.stop()
        assert not list((hsm_dir or server.hsm_dir).rglob("*.object")), "a new token was made"


def test_the_copy_with_an_attackers_own_token_is_refused(leaked: dict, tmp_path: Path) -> None:
    """The attacker provisions a token of their own (same label, full key ceremony) and
    points the copy at it: the server refuses to start, having matched nothing."""
    copy, hsm_dir = tmp_path / "data", tmp_path / "attacker-hsm"
    shutil.copytree(leaked["copy"], copy)
    subprocess.run([sys.executable, "-c", ("import sys; from pathlib import Path; "
                    "from vault.keys import softhsm; from vault.keys.hsm import Hsm; "
                    "Hsm(softhsm.provision(Path(sys.argv[1]))).ensure_keys()"), str(hsm_dir)],
                   env=_clean_env(), check=True, timeout=120)
    server = ServerProcess(copy, env=_clean_env(), hsm_dir=hsm_dir)
    server.launch()
    try:
        assert server.proc.wait(timeout=120) == 2
    finally:
        server.stop()
    assert "wrong token" in server.log_path.read_text()


def test_the_projects_own_code_recovers_no_key(leaked: dict, tmp_path: Path) -> None:
    copy = leaked["copy"]
    db = sqlite3.connect(copy / "vault.db")
    params_json, public, sealed = db.execute(
        "SELECT he_params, public_context, sealed_secret_context FROM collection_keys").fetchone()
    params = he.HeParams.from_json(params_json)
    # The only CKKS key in the clear is the public one: nothing it could decrypt with.
    assert he.PublicContext(public, params).has_secret_key() is False
    with pytest.raises(ValueError, match="no secret key"):
        he.SecretContext(public, params)
    # The sealed secret context is AES-GCM under a key wrapped by the token's KEK.
    assert b"CKKS" not in sealed and len(sealed) > 1000
    # The vault's own code, given the copy and every token it can make: each wrapped key
    # and the sealed secret key fail to open. In a separate process: SoftHSM reads its
    # configuration once per process. The default token store of the copy's path is
    # tried first (it does not exist: provision refuses), then a token of their own.
    script = tmp_path / "attack.py"
    script.write_text(
        "import sys, sqlite3\n"
        "from pathlib import Path\n"
        "from vault.custody import default_hsm_dir\n"
        "from vault.keys import envelope, softhsm\n"
        "from vault.keys.hsm import Hsm\n"
        "from vault.keys.integrity import encode\n"
        "from vault.domain.errors import DataLoss, HsmUnavailable\n"
        "try:\n"
        "    softhsm.provision(default_hsm_dir(Path(sys.argv[2])), create=False)\n"
        "    print('TOKEN FOUND')\n"
        "except HsmUnavailable:\n"
        "    print('no token')\n"
        "hsm = Hsm(softhsm.provision(Path(sys.argv[1]), token_label='vault'))\n"
        "hsm.ensure_keys()\n"
        "db = sqlite3.connect(Path(sys.argv[2]) / 'vault.db')\n"
        "p, sealed = db.execute('SELECT he_params, sealed_secret_context '\n"
        "                       'FROM collection_keys').fetchone()\n"
        "try:\n"
        "    envelope.open_sealed(hsm, sealed, encode('ckks-secret', 'staff', 1, p))\n"
        "    print('DECRYPTED')\n"
        "except DataLoss:\n"
        "    print('refused')\n"
        "for name, version, blob in db.execute('SELECT name, version, blob FROM wrapped_keys'):\n"
        "    try:\n"
        "        hsm.unwrap(blob, encode('data-key', name, version))\n"
        "        print('UNWRAPPED', name)\n"
        "    except (DataLoss, HsmUnavailable):\n"
        "        print('refused')\n")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "attacker-hsm"), str(copy)],
                         capture_output=True, text=True, env=_clean_env(), timeout=120, check=False)
    lines = out.stdout.split()
    assert lines[0:2] == ["no", "token"], out.stderr[-2000:]
    assert len(lines) >= 4 and set(lines[2:]) == {"refused"}, out.stdout + out.stderr[-2000:]


def test_logs_hold_no_embedding_score_or_subject_id(leaked: dict) -> None:
    log = leaked["log"]
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(line.get("method") == "Match" for line in lines)
    assert any(line.get("method") == "Enroll" for line in lines)
    for subject in leaked["subjects"]:
        assert subject not in log and subject.split("@")[0] not in log
    for emb in leaked["emb"]:
        for value in emb[:16]:
            assert f"{value:.5f}"[:7] not in log
    for line in lines:
        assert "score" not in line and "embedding" not in line and "subject_id" not in line
