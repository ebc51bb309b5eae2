"""SIGKILL the server at random moments while enrollments stream in; nothing acknowledged
may be lost, nothing may be half-written, and the server must restart without repair.

The default run kills a few times; ``make stress`` (VAULT_STRESS=1) kills 50 times and
records the figures for docs/RELIABILITY.md.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from vault.testing import ServerProcess, record_figures, scaled
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc


class Enroller(threading.Thread):
    """Enrolls subject n with face n until the server dies; remembers what was acknowledged."""

    def __init__(self, target: str, faces: np.ndarray, start_at: int, acked: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.target, self.faces, self.next, self.acked = target, faces, start_at, acked

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            while self.next < len(self.faces):
                n = self.next
                try:
                    r = stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                                     embedding=self.faces[n].tolist(),
                                                     request_id=f"e{n}"), timeout=30)
                except grpc.RpcError:
                    return  # the server is gone: n may or may not have been stored
                self.acked[n] = r.template_id
                self.next = n + 1


def _check_after_restart(server: ServerProcess, faces: np.ndarray, acked: dict[int, str],
                         attempted: int, sample: int, rng: random.Random) -> None:
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        count = stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).template_count
        # Everything acknowledged is there; at most the one in flight came in unacknowledged.
        assert len(acked) <= count <= attempted
        check = sorted(acked) if len(acked) <= sample else rng.sample(sorted(acked), sample)
        for n in check:
            # A retry of the acknowledged request finds the same template (nothing lost)...
            again = stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id=f"s{n}",
                                                 embedding=faces[n].tolist(), request_id=f"e{n}"),
                                timeout=30)
            assert again.template_id == acked[n]
            # ...and it still matches its face (ciphertext, MACs and index intact).
            assert stub.Match(pb.MatchRequest(collection_id="c", subject_id=f"s{n}",
                                              embedding=faces[n].tolist()), timeout=30).matched
        # No half-written enrollment: every live template of the current key version has
        # its subject (a rotation in progress also holds rows of its target version).
        db = sqlite3.connect(f"file:{server.data_dir / 'vault.db'}?mode=ro", uri=True, timeout=30)
        try:
            live, subjects = db.execute(
                "SELECT (SELECT count(*) FROM templates t JOIN collections c USING (collection_id) "
                "WHERE t.state=1 AND t.key_version=c.key_version), "
                "(SELECT count(*) FROM subjects)").fetchone()
        finally:
            db.close()
        assert live == count and subjects == count


def test_sigkill_during_enrollment_loses_nothing_acknowledged(tmp_path: Path, faces: np.ndarray) -> None:
    kills = scaled(3, 50)
    rng = random.Random(7)
    # Checkpoints every half second (one journal page is enough): kills land in them too.
    # No hourly 1:1 budget: the long version checks thousands of acknowledged enrollments.
    server = ServerProcess(tmp_path / "data", env={"VAULT_JOURNAL_PAGES": "1",
                                                   "VAULT_MAINTENANCE_INTERVAL": "0.5",
                                                   "VAULT_ERASE_AFTER": "0",
                                                   "VAULT_VERIFY_BUDGET": "0"})
    server.start()
    with server.channel() as channel:
        vault_pb2_grpc.TemplateVaultStub(channel).CreateCollection(
            pb.CreateCollectionRequest(collection_id="c", dimension=128, threshold=0.9))
    acked: dict[int, str] = {}
    attempted = 0
    restarts: list[float] = []
    kills_during_start = 0
    rotations = 0
    try:
        for k in range(kills):
            if k % 5 == 2:
                # Now and then, kill while the server is still starting (loading, HSM login).
                server.kill()
                server.launch()
                time.sleep(rng.uniform(0.2, 2.0))
                server.kill()
                server.start()
                kills_during_start += 1
            enroller = Enroller(server.target, faces, attempted, acked)
            enroller.start()
            if k % 3 == 1:  # a key rotation runs (or resumes) while enrollments stream in
                with server.channel() as channel:
                    try:
                        vault_pb2_grpc.TemplateVaultStub(channel).RotateCollectionKey(
                            pb.RotateCollectionKeyRequest(collection_id="c"), timeout=30)
                        rotations += 1
                    except grpc.RpcError as err:
                        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION  # one running
            time.sleep(rng.uniform(0.2, 2.5))
            server.kill()
            enroller.join(timeout=60)
            attempted = enroller.next + 1  # the request in flight may have been committed
            t0 = time.monotonic()
            server.start()
            restarts.append(time.monotonic() - t0)
            _check_after_restart(server, faces, acked, attempted, scaled(10, 5), rng)
            attempted = enroller.next  # the in-flight one is retried with its request id
        # Every rotation started finishes after the kills, and everything still matches.
        with server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            deadline = time.monotonic() + 300
            while stub.ListKeyVersions(pb.ListKeyVersionsRequest(collection_id="c")).HasField("job"):
                assert time.monotonic() < deadline, "the key rotation did not finish"
                time.sleep(0.5)
            version = stub.GetCollection(pb.GetCollectionRequest(collection_id="c")).key_version
        # The request in flight at the last kill was never retried: it may have been committed.
        _check_after_restart(server, faces, acked, attempted + 1, len(acked), rng)
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "integrity failure" not in log
    # The audit chain survived every kill (a killed server leaves an unsigned tail, no break).
    verified = subprocess.run([sys.executable, "-m", "vault", "audit", "verify", "--data-dir",
                               str(server.data_dir)], capture_output=True, text=True, check=False)
    assert verified.returncode == 0, verified.stdout
    assert len(acked) > 0
    record_figures("crash", {
        "kills": kills + kills_during_start, "kills_during_start": kills_during_start,
        "enrollments_acknowledged": len(acked), "lost": 0, "half_written": 0,
        "integrity_failures": 0, "restart_p50_s": round(float(np.median(restarts)), 2),
        "key_rotations_started": rotations, "final_key_version": version,
        "restart_max_s": round(max(restarts), 2)})
