"""The decider as its own process: the serving process holds no secret key, no PII key and
no transform, and a compromised matcher (or another local process) cannot widen what the
decider releases.

The server is started as the README says (``vault serve``); the attacker reads the serving
process's memory through /proc/PID/mem, as a compromise of that process would, and looks for
the keys it would need, which the test gets by unsealing them with the real token and the
project's code. The same search in the decider child finds them, so the test can fail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from vault import he
from vault.decider import ScoreCiphertext, wire
from vault.decider.keeper import Keeper
from vault.decider.process import ProcessDecider
from vault.domain.errors import DataLoss, InvalidArgument, PermissionDenied, ResourceExhausted
from vault.domain.records import CollectionRow
from vault.he import poly
from vault.keys.hsm import Hsm, HsmConfig
from vault.keys.integrity import Integrity
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

N_SUBJECTS = 6
DIM = 128

# Run in a child interpreter against the server's own token store: what an attacker would
# need, found with the project's code (the HSM unseals; SoftHSM wants a process of its own).
_NEEDLES = r"""
import json, sqlite3, sys
from pathlib import Path
import numpy as np
import tenseal as ts
from vault.crypto import aad
from vault.keys import envelope, softhsm
from vault.keys.hsm import Hsm
from vault.protector import Transform, transform_seed

data, hsm_dir = Path(sys.argv[1]), Path(sys.argv[2])
hsm = Hsm(softhsm.provision(hsm_dir, "vault", create=False))
db = sqlite3.connect(f"file:{data / 'vault.db'}?mode=ro", uri=True)
cid, version, params, sealed, public = db.execute(
    "SELECT collection_id, key_version, he_params, sealed_secret_context, public_context "
    "FROM collection_keys").fetchone()
secret = envelope.open_sealed(hsm, sealed, aad.secret_context(cid, version, params))
ctx = ts.context_from(secret)
holder = ctx.secret_key()
key = holder.data.data()  # SEAL's secret key, NTT form (its owners kept alive above)
raw = np.array([key[i] for i in range(key.coeff_count())], np.uint64).tobytes()
pii = hsm.unwrap(db.execute("SELECT blob FROM wrapped_keys WHERE name='pii'").fetchone()[0],
                 aad.data_key("pii", 1))
seed = transform_seed(hsm, cid, version, 128)
q = Transform(seed, 128)._q
out = {
    "secret_key": [raw[i:i + 64].hex() for i in (4096, len(raw) // 2, len(raw) - 4096)],
    # Windows of the serialized secret context that the public context does not share.
    "secret_context": [w.hex() for w in [secret[i:i + 64] for i in range(0, len(secret) - 64, 4096)]
                       if w not in public][:8],
    "pii_key": [pii.hex()],
    "transform_seed": [seed.hex()],
    "transform_rows": [q[i].tobytes()[:64].hex() for i in (0, 5, 77)],
}
print(json.dumps(out))
"""


def _key_needles(server: ServerProcess) -> dict[str, list[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    out = subprocess.run([sys.executable, "-c", _NEEDLES, str(server.data_dir),
                          str(server.hsm_dir)], capture_output=True, text=True, env=env,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    return {k: [bytes.fromhex(h) for h in v] for k, v in found.items()}


def _memory_holds(pid: int, needles: dict[str, list[bytes]]) -> set[str]:
    """Which kinds of needle occur anywhere in the writable or anonymous memory of ``pid``
    (read-only file mappings are code and libraries)."""
    regions = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5] if len(fields) > 5 else ""
            if "r" in fields[1] and ("w" in fields[1] or not path or path.startswith("[heap")) \
                    and path not in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                regions.append((start, end))
    longest = max(len(n) for group in needles.values() for n in group)
    found: set[str] = set()
    chunk = 64 << 20
    with open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for start, end in regions:
            at = start
            while at < end:
                size = min(chunk + longest, end - at)
                try:
                    mem.seek(at)
                    data = mem.read(size)
                except (OSError, ValueError):
                    break
                for kind, group in needles.items():
                    if kind not in found and any(n in data for n in group):
                        found.add(kind)
                at += chunk
    return found


def _decider_pid(server_pid: int) -> int:
    """The serving process's child that runs vault.decider.child."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        if ppid == server_pid and b"vault.decider.child" in cmdline:
            return int(entry.name)
    raise AssertionError("the server has no decider child process")


@pytest.fixture(scope="module")
def served(tmp_path_factory, lfw):
    """A server with real faces enrolled and matched (1:1 and 1:N)."""
    root = tmp_path_factory.mktemp("decider")
    emb, ids = lfw["emb"], lfw["ids"]
    firsts = [int(np.flatnonzero(ids == p)[0]) for p in np.unique(ids)][:N_SUBJECTS]
    server = ServerProcess(root / "data", env={"VAULT_WORKERS": "1"})
    with server:
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="staff",
                                                             dimension=DIM, threshold=0.92))
            for i in firsts:
                stub.Enroll(pb.EnrollRequest(collection_id="staff", subject_id=f"s{i}",
                                             embedding=emb[i].tolist()))
            for i in firsts:
                assert stub.Match(pb.MatchRequest(collection_id="staff", subject_id=f"s{i}",
                                                  embedding=emb[i].tolist())).matched
                got = stub.Match(pb.MatchRequest(collection_id="staff", top_k=3,
                                                 embedding=emb[i].tolist()))
                assert [c.subject_id for c in got.candidates][:1] == [f"s{i}"]
        yield server, [(f"s{i}", emb[i]) for i in firsts]


def test_the_serving_process_holds_no_key_the_decider_does(served) -> None:
    server, _ = served
    assert server.proc is not None
    needles = _key_needles(server)
    assert all(needles.values()), {k: len(v) for k, v in needles.items()}
    child = _decider_pid(server.proc.pid)
    in_server = _memory_holds(server.proc.pid, needles)
    in_child = _memory_holds(child, needles)
    assert in_server == set(), f"the serving process holds {sorted(in_server)}"
    # The search works: the decider holds them (the SEAL secret key, the PII data key and
    # the transform matrix; the seed and the serialized context are transient there).
    assert {"secret_key", "pii_key", "transform_rows"} <= in_child, in_child


def test_the_socket_is_private_and_answers_only_the_server(served) -> None:
    server, _ = served
    assert server.proc is not None
    child = _decider_pid(server.proc.pid)
    path = Path((Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0"))[3].decode())
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for outside in (server.data_dir, server.hsm_dir):
        assert outside.resolve() not in path.resolve().parents
    # Another process of the same user (this test) connects and is refused: no answer.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.settimeout(10)
        try:
            wire.send(sock, {"op": "ping", "args": [], "kwargs": {}})
        except OSError:
            return
        with pytest.raises((wire.Closed, OSError)):
            wire.receive(sock)


def test_a_killed_decider_gives_unavailable_then_serves_again_never_a_non_match(served) -> None:
    server, faces = served
    assert server.proc is not None
    first = _decider_pid(server.proc.pid)
    os.kill(first, signal.SIGKILL)
    subject, face = faces[1]
    seen: list[str] = []
    deadline = time.monotonic() + 120
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        while time.monotonic() < deadline:
            try:
                got = stub.Match(pb.MatchRequest(collection_id="staff", top_k=1,
                                                 embedding=face.tolist()), timeout=30)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                assert "decider process" in (exc.details() or "")
                seen.append("unavailable")
                time.sleep(0.2)
                continue
            assert [c.subject_id for c in got.candidates] == [subject]  # never a non-match
            seen.append("matched")
            break
        assert seen and seen[-1] == "matched", seen
        assert stub.Match(pb.MatchRequest(collection_id="staff", subject_id=subject,
                                          embedding=face.tolist())).matched
    # Usually the first call finds it gone (UNAVAILABLE); on a slow machine the restart
    # may win the race, and then the call is served by the new child.
    assert _decider_pid(server.proc.pid) != first


# -- what a compromised matcher may ask of the decider (a real child process) --------------


def _part(public: he.PublicContext, value: float, positions: list[int], ntt: bool = False
          ) -> ScoreCiphertext:
    params = public.params
    m = np.zeros(public.n, np.int64)
    m[positions] = round(value * params.template_scale * params.probe_scale)
    ct = public.ciphertext_from_ntt(public.encrypt_zero())[:, :1]
    ct[0] = poly.add(ct[0], poly.residues(m, public.moduli[:1]), public.moduli[:1])
    pos = np.asarray(positions, np.int64)
    return ScoreCiphertext(np.ascontiguousarray(ct), ntt, pos, np.zeros(pos.size, np.int32),
                           pos, 1, 0)


@pytest.fixture(scope="module")
def child_decider(hsm_config: HsmConfig):
    decider = ProcessDecider(hsm_config, workers=1)
    try:
        decider.init_pii(None)
        public, _sealed = decider.create_key("forge", 1, he.DEFAULT_PARAMS)
        yield decider, he.PublicContext(public, he.DEFAULT_PARAMS)
    finally:
        decider.close()


def _signed_row(hsm: Hsm, threshold: float) -> CollectionRow:
    row = CollectionRow("forge", DIM, threshold, 1, 1, b"")
    return dataclasses.replace(row, mac=Integrity(hsm).mac(*row.mac_fields()))


def test_the_decider_refuses_a_forged_row_or_a_threshold_of_the_matchers_choosing(
        child_decider, hsm: Hsm) -> None:
    decider, public = child_decider
    row = _signed_row(hsm, 0.9)
    part = _part(public, 0.5, [0])
    assert decider.decide(row, [part], 1) == []  # below the signed threshold
    forged = dataclasses.replace(row, threshold=-1.0)  # the MAC of the 0.9 row kept
    with pytest.raises(DataLoss, match="integrity"):
        decider.decide(forged, [part], 1)
    with pytest.raises(PermissionDenied, match="own threshold"):
        decider.decide(row, [part], 1, threshold=-1.0)
    assert [g.group for g in decider.decide(_signed_row(hsm, 0.4), [part], 1)] == [0]


def test_the_decider_decrypts_only_declared_score_coefficients(child_decider, hsm: Hsm) -> None:
    decider, public = child_decider
    row = _signed_row(hsm, 0.9)
    # A journal page's product: its scores are at multiples of D, the rest are partial
    # correlations of a template.
    with pytest.raises(InvalidArgument, match="multiples of the dimension"):
        decider.decide(row, [_part(public, 0.5, [DIM, DIM + 1], ntt=True)], 1)
    with pytest.raises(InvalidArgument, match="distinct"):
        decider.decide(row, [_part(public, 0.5, [0, 0])], 1)
    with pytest.raises(InvalidArgument, match="at most"):
        decider.open_subjects("forge", [(b"h", b"x" * 40)] * 11)


def test_the_decryption_budget_refuses_a_flood(hsm: Hsm) -> None:
    now = [0.0]
    keeper = Keeper(hsm, allow_override=False, score_rate=10.0, clock=lambda: now[0])
    keeper.init_pii(None)
    pub, _ = keeper.create_key("forge", 1, he.DEFAULT_PARAMS)
    ctx = he.PublicContext(pub, he.DEFAULT_PARAMS)
    row = _signed_row(hsm, 0.9)
    parts = [_part(ctx, 0.1, [0]) for _ in range(20)]
    keeper.decide(row, parts, 1)  # a burst of twice the rate
    with pytest.raises(ResourceExhausted, match="budget"):
        keeper.decide(row, parts[:1], 1)
    now[0] += 0.5  # half a second later: 5 more
    keeper.decide(row, parts[:5], 1)
    with pytest.raises(ResourceExhausted, match="budget"):
        keeper.decide(row, parts[:1], 1)


def test_a_server_killed_with_sigkill_takes_its_decider_with_it(served) -> None:
    """Last in this module: it kills the module's server."""
    server, _ = served
    assert server.proc is not None
    child = _decider_pid(server.proc.pid)
    socket_dir = Path(Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[3].decode()).parent
    server.proc.kill()  # the process alone, not its group: no shutdown code runs
    server.proc.wait()
    deadline = time.monotonic() + 60
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the decider outlived its server"
    assert not socket_dir.exists()


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever inherited it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_group_stops_the_server_and_its_decider_once(
        tmp_path: Path, signum: int) -> None:
    """As a terminal (Ctrl-C) or `timeout` stops `vault serve`: the server leads its
    process group and the signal goes to the whole group. The decider, in a session of
    its own, is closed by the server; it is not interrupted alongside it (a traceback) or
    killed and then restarted during the shutdown."""
    from grpc_health.v1 import health_pb2

    server = ServerProcess(tmp_path / "data", env={"VAULT_WORKERS": "1"})
    with open(server.log_path, "ab") as log:
        server.proc = subprocess.Popen(
            [sys.executable, "-m", "vault", "serve", "--data-dir", str(server.data_dir),
             "--listen", server.target], stdout=log, stderr=subprocess.STDOUT,
            env=server._env, start_new_session=True)
    try:
        server.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=180)
        child = _decider_pid(server.proc.pid)
        os.killpg(server.proc.pid, signum)
        server.proc.wait(timeout=120)
        deadline = time.monotonic() + 60
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child)
        text = server.log_path.read_text()
        assert "Traceback" not in text
        events = [json.loads(line).get("event") for line in text.splitlines()
                  if line.startswith("{")]
        assert "stopped" in events
        assert "the decider process ended; restarting it" not in events
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
