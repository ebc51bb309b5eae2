"""Key custody, from outside: where the token may live, which token a data directory
accepts, moving an old layout out, and a whole-directory rollback. Real SoftHSM, real
server processes, real files."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault.keys.softhsm import CONF_TEMPLATE
from vault.testing import ServerProcess, free_port
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

CLEAN = ("SOFTHSM2_CONF", "VAULT_HSM_PIN", "VAULT_HSM_PIN_FILE", "VAULT_HSM_DIR",
         "VAULT_HSM_MODULE", "VAULT_DATA_DIR")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env.update(extra)
    return env


def _vault(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A ``vault`` command that must end by itself (a refusal is an exit, not a limbo)."""
    return subprocess.run([sys.executable, "-m", "vault", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=120, check=False)


def _serve(data: Path, *args: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return _vault("serve", "--data-dir", str(data), "--listen", f"127.0.0.1:{free_port()}",
                  *args, env=env)


def _faces(lfw: dict, n: int) -> np.ndarray:
    firsts = [int(np.flatnonzero(lfw["ids"] == p)[0]) for p in np.unique(lfw["ids"])[:n]]
    return lfw["emb"][firsts]


def _enroll(server: ServerProcess, faces: np.ndarray, first: int = 0, create: bool = True) -> None:
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        if create:
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=128,
                                                             threshold=0.9))
        for k, face in enumerate(faces):
            stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{first + k}",
                                         embedding=face.tolist()), timeout=60)


def _matches(server: ServerProcess, faces: np.ndarray) -> list[bool]:
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        return [stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"s{k}",
                                           embedding=face.tolist()), timeout=60).matched
                for k, face in enumerate(faces)]


def _count(server: ServerProcess) -> int:
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        return stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count


@pytest.fixture(scope="module")
def faces(lfw: dict) -> np.ndarray:
    return _faces(lfw, 6)


def test_default_token_store_is_beside_the_data_directory(tmp_path: Path,
                                                          faces: np.ndarray) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data, env=_env(), hsm_dir=None)  # `vault serve --data-dir DIR` only
    with server:
        _enroll(server, faces[:1])
    hsm = tmp_path / "data-hsm"
    assert list((hsm / "tokens").rglob("token.object")), "no token in DIR-hsm"
    assert (hsm / "pin").stat().st_mode & 0o777 == 0o600
    assert not [p for p in data.rglob("*") if p.name in ("pin", "softhsm2.conf", "tokens")
                or p.suffix == ".object"]
    assert str(hsm) in server.log_path.read_text()  # says where, at start


def test_refuses_a_token_or_pin_inside_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "link").symlink_to(data / "keys", target_is_directory=True)
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(CONF_TEMPLATE.format(tokendir=data / "tokens"))
    cases = [
        (["--hsm-dir", str(data / "keys")], _env(), "the HSM directory"),
        (["--hsm-dir", str(tmp_path / "link")], _env(), "the HSM directory"),  # a symlink in
        (["--hsm-dir", str(tmp_path / "hsm")], _env(VAULT_HSM_PIN_FILE=str(data / "pin")),
         "the PIN file"),
        (["--hsm-module", "/usr/lib/softhsm/libsofthsm2.so"],
         _env(SOFTHSM2_CONF=str(conf), VAULT_HSM_PIN="1234"), "the SoftHSM token store"),
    ]
    for args, env, what in cases:
        out = _serve(data, *args, env=env)
        assert out.returncode == 2, out.stderr[-2000:]
        assert what in out.stderr and "is inside the data directory" in out.stderr
        assert len([ln for ln in out.stderr.splitlines() if "refusing" in ln]) == 1  # one line
    assert sorted(p.name for p in data.iterdir()) == [], "a refused start wrote into the data"
    assert not (tmp_path / "hsm").exists()
    (data / "tokens").mkdir()  # a token provisioned into the data directory by mistake
    out = _serve(data, "--hsm-dir", str(tmp_path / "hsm"))
    assert out.returncode == 2 and "holds SoftHSM files (tokens)" in out.stderr


def test_pin_from_a_secret_file(tmp_path: Path, faces: np.ndarray) -> None:
    data, hsm, secret = tmp_path / "data", tmp_path / "hsm", tmp_path / "secrets" / "pin"
    secret.parent.mkdir()
    secret.write_text("5f1c-secret-pin\n")
    env = _env(VAULT_HSM_PIN_FILE=str(secret))
    with ServerProcess(data, env=env, hsm_dir=hsm) as server:
        _enroll(server, faces[:1])
    assert not (hsm / "pin").exists()  # the token took the secret's PIN; none generated
    with ServerProcess(data, env=env, hsm_dir=hsm) as server:
        assert _matches(server, faces[:1]) == [True]


def test_refuses_a_different_or_new_token_for_an_existing_directory(
        tmp_path: Path, faces: np.ndarray) -> None:
    data, own = tmp_path / "data", tmp_path / "own-hsm"
    with ServerProcess(data, env=_env(), hsm_dir=own) as server:
        _enroll(server, faces[:2])
    other = tmp_path / "other-hsm"  # another token with the same labels, other keys
    blank = tmp_path / "blank-hsm"  # a token initialised with the same label, no keys
    for hsm, ceremony in ((other, ".ensure_keys()"), (blank, "")):
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                        "from vault.keys import softhsm; from vault.keys.hsm import Hsm; "
                        f"Hsm(softhsm.provision(Path(sys.argv[1]))){ceremony}", str(hsm)],
                       env=_env(), check=True, timeout=60)
    for hsm in (other, blank):
        out = _serve(data, "--hsm-dir", str(hsm))
        assert out.returncode == 2, out.stderr[-2000:]
        said = [line for line in out.stderr.splitlines() if "wrong token" in line]
        assert len(said) == 1 and "start it with its own token" in said[0]  # one line
    with ServerProcess(data, env=_env(), hsm_dir=own) as server:  # nothing was changed
        assert _matches(server, faces[:2]) == [True, True]


_FORGET_COUNTERS = """
import sys
from pathlib import Path
import pkcs11
from pkcs11 import Attribute, ObjectClass
hsm = Path(sys.argv[1])
token = pkcs11.lib('/usr/lib/softhsm/libsofthsm2.so').get_token(token_label='vault')
with token.open(rw=True, user_pin=(hsm / 'pin').read_text().strip()) as session:
    for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.DATA})):
        obj.destroy()
"""


def _strip_binding(data: Path) -> None:
    db = sqlite3.connect(data / "vault.db")
    db.execute("DELETE FROM meta WHERE key IN ('vault_id', 'token_binding')")
    db.commit()
    db.close()


def test_hsm_move_migrates_an_old_layout(tmp_path: Path, faces: np.ndarray) -> None:
    data, staging = tmp_path / "data", tmp_path / "staging"
    with ServerProcess(data, env=_env(), hsm_dir=staging) as server:
        _enroll(server, faces[:3])
    # What the previous release left: DATA/hsm holding tokens/, pin and a softhsm2.conf
    # naming DATA/hsm/tokens; no token binding in the database, no counter in the token.
    subprocess.run([sys.executable, "-c", _FORGET_COUNTERS, str(staging)],
                   env=_env(SOFTHSM2_CONF=str(staging / "softhsm2.conf")), check=True, timeout=60)
    _strip_binding(data)
    old = data / "hsm"
    staging.rename(old)
    (old / "softhsm2.conf").write_text(CONF_TEMPLATE.format(tokendir=(old / "tokens").resolve()))
    out = _serve(data)
    assert out.returncode == 2 and "vault hsm move" in out.stderr, out.stderr[-2000:]
    inside = _vault("hsm", "move", "--data-dir", str(data), "--to", str(data / "keys"))
    assert inside.returncode == 2 and old.is_dir()
    target = tmp_path / "hsm"
    moved = _vault("hsm", "move", "--data-dir", str(data), "--to", str(target))
    assert moved.returncode == 0, moved.stderr
    assert not old.exists() and (target / "pin").exists()
    assert f"directories.tokendir = {(target / 'tokens').resolve()}" in \
        (target / "softhsm2.conf").read_text()
    with ServerProcess(data, env=_env(), hsm_dir=target) as server:  # binds on this start
        assert _count(server) == 3
        assert _matches(server, faces[:3]) == [True] * 3
    # Now bound: stripping the binding from the database does not make it bind afresh.
    _strip_binding(data)
    out = _serve(data, "--hsm-dir", str(target))
    assert out.returncode == 2 and "no token binding" in out.stderr, out.stderr[-2000:]


def test_whole_directory_rollback_is_refused_until_accepted(tmp_path: Path,
                                                            faces: np.ndarray) -> None:
    data, hsm, old = tmp_path / "data", tmp_path / "hsm", tmp_path / "old"
    server = ServerProcess(data, env=_env(), hsm_dir=hsm).start()
    try:
        _enroll(server, faces[:2])
        shutil.copytree(data, old)  # a backup taken while it runs, files as they are
        _enroll(server, faces[2:4], first=2, create=False)
        with server.channel() as channel:  # past an audit checkpoint (64 entries)
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            for _ in range(40):
                stub.GetCollection(pb.GetCollectionRequest(collection_id="c"))
    finally:
        server.kill()  # no clean close: the checkpoint in flight must have moved the counter
    shutil.rmtree(data)
    shutil.copytree(old, data)  # the older copy, whole and consistent
    out = _serve(data, "--hsm-dir", str(hsm))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rollback detected" in out.stderr and "vault restore --accept-rollback" in out.stderr
    assert "audit entries back" in out.stderr
    accepted = _vault("restore", "--accept-rollback", "--data-dir", str(data),
                      "--hsm-dir", str(hsm))
    assert accepted.returncode == 0, accepted.stderr
    assert "restore accepted" in accepted.stdout
    verify = _vault("audit", "verify", "--data-dir", str(data), "--hsm-dir", str(hsm))
    assert verify.returncode == 0 and "unsigned tail: 0" in verify.stdout, verify.stdout
    with ServerProcess(data, env=_env(), hsm_dir=hsm) as server:
        assert _count(server) == 2  # the copy's state: the later enrollments are not in it
        assert _matches(server, faces[:2]) == [True, True]
        with server.channel() as channel, pytest.raises(grpc.RpcError) as err:
            vault_pb2_grpc.TemplateVaultStub(channel).Match(pb.MatchRequest(
                collection_id="c", subject_id="s2", embedding=faces[2].tolist()), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A clean stop checkpoints; the same copy restored again is refused again.
    shutil.rmtree(data)
    shutil.copytree(old, data)
    again = _serve(data, "--hsm-dir", str(hsm))
    assert again.returncode == 2 and "rollback detected" in again.stderr


def test_the_database_alone_restored_beside_the_current_audit_log_is_refused(
        tmp_path: Path, faces: np.ndarray) -> None:
    """A writer restores vault.db and the block files from an older backup, keeping the
    current audit.db (whose checkpoints the token has seen): a deleted subject would match
    again. The token also keeps the store's epoch, so the start is refused (found in review)."""
    data, hsm, old = tmp_path / "data", tmp_path / "hsm", tmp_path / "old"
    with ServerProcess(data, env=_env(), hsm_dir=hsm) as server:
        _enroll(server, faces[:3])
    shutil.copytree(data, old)  # a backup taken after a clean stop
    with ServerProcess(data, env=_env(), hsm_dir=hsm) as server:
        with server.channel() as channel:
            vault_pb2_grpc.TemplateVaultStub(channel).DeleteSubject(
                pb.DeleteSubjectRequest(collection_id="c", subject_id="s1"), timeout=60)
        assert _count(server) == 2
    for stale in [p for p in data.iterdir() if p.name.startswith("vault.db") or p.name == "blocks"]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    for item in old.iterdir():
        if item.name.startswith("vault.db") or item.name == "blocks":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, data / item.name)
    out = _serve(data, "--hsm-dir", str(hsm))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "rollback detected" in out.stderr and "store epoch" in out.stderr
    assert "vault restore --accept-rollback" in out.stderr
