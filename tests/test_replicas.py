"""Two `vault serve` replicas on one real PostgreSQL database and one token.

The primary (the write lease's holder) enrolls, deletes and rotates; the standby serves
matches and follows the primary's writes from the change feed. Each promise is checked from
outside, through the RPCs alone: an enrollment acknowledged by the primary matches
through the standby within the refresh delay, a deletion acknowledged by the primary is
never named by any match that starts after the acknowledgement (on either replica, with
matches running in parallel), a key rotation run by the primary is served by both, and
when the primary is killed the standby takes the lease and accepts writes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psycopg
import pytest
from grpc_health.v1 import health_pb2

from vault.testing import PostgresServer, ServerProcess, free_port
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

DIM = 32
TTL = 3.0  # the write lease's time to live in these tests (10 s by default)
REFRESH = 0.3
Code = grpc.StatusCode


def _face(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM)


def _capture(seed: int, noise_seed: int) -> list[float]:
    n = np.random.default_rng(10_000 + noise_seed).standard_normal(DIM)
    return (_face(seed) + 0.3 * n).astype(np.float32).tolist()


class Replica:
    """A `vault serve` process on the shared database and token, with a stub."""

    def __init__(self, root: Path, name: str, url: str, hsm: Path,
                 extra: list[str] | None = None) -> None:
        # The same probe many times, and verifications of a deleted subject: the probing
        # guard and the lockout (tested elsewhere) would refuse the hammering below.
        self.metrics = f"127.0.0.1:{free_port()}"
        self.server = ServerProcess(root / name, hsm_dir=hsm, args=[
            "--store", url, "--lease-ttl", str(TTL), "--refresh-interval", str(REFRESH),
            "--probe-cluster", "0", "--max-failed-verifications", "0",
            "--metrics-listen", self.metrics, *(extra or [])])
        self.channel: grpc.Channel | None = None

    def start(self) -> Replica:
        self.server.start()
        self.channel = self.server.channel()
        self.stub = vault_pb2_grpc.TemplateVaultStub(self.channel)
        return self

    def stop(self, kill: bool = False) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if kill:
            self.server.kill()
        else:
            self.server.stop()

    def is_primary(self) -> bool:
        """What the replica's metrics say of its role (vault_replica_primary)."""
        text = urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=30).read().decode()
        (line,) = [x for x in text.splitlines() if x.startswith("vault_replica_primary ")]
        return float(line.split()[1]) == 1.0

    def identify(self, cid: str, probe: list[float], top_k: int = 3) -> list[str]:
        r = self.stub.Match(pb.MatchRequest(collection_id=cid, embedding=probe, top_k=top_k),
                            timeout=30)
        return [c.subject_id for c in r.candidates]

    def verify(self, cid: str, subject: str, probe: list[float]) -> bool:
        """1:1 (these clients are admins, without TLS: an unknown subject is NOT_FOUND)."""
        try:
            return bool(self.stub.Match(pb.MatchRequest(collection_id=cid, subject_id=subject,
                                                        embedding=probe), timeout=30).matched)
        except grpc.RpcError as err:
            if err.code() != Code.NOT_FOUND:
                raise
            return False


def _until(check, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    """Poll ``check`` until it returns something true; that value and the seconds it took."""
    start = time.monotonic()
    while True:
        found = check()
        if found:
            return found, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def pair(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[Replica, Replica, str]]:
    root = tmp_path_factory.mktemp("replicas")
    url = postgres.create_database()
    a = Replica(root, "a", url, root / "hsm").start()  # first: it makes the token, takes the lease
    b = Replica(root, "b", url, root / "hsm").start()
    try:
        yield a, b, url
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def collection(pair: tuple[Replica, Replica, str]) -> str:
    primary = _primary(pair)
    cid = f"c-{uuid.uuid4().hex[:10]}"
    primary.stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, dimension=DIM,
                                                             threshold=0.8))
    return cid


def _primary(pair: tuple[Replica, Replica, str]) -> Replica:
    """The replica whose metrics say it holds the write lease (exactly one does, once a
    takeover has settled: a resumed old primary says so until its next renewal)."""
    def one() -> list[Replica] | None:
        held = [r for r in pair[:2] if r.channel is not None and r.is_primary()]
        return held if len(held) == 1 else None

    found, _ = _until(one, timeout=TTL * 3)
    return found[0]


def _standby(pair: tuple[Replica, Replica, str]) -> Replica:
    primary = _primary(pair)
    return pair[1] if primary is pair[0] else pair[0]


def test_standby_refuses_writes_and_serves_what_the_primary_enrolled(pair, collection: str) -> None:
    primary, standby = _primary(pair), _standby(pair)
    with pytest.raises(grpc.RpcError) as err:
        standby.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="x",
                                             embedding=_capture(1, 1)))
    assert err.value.code() == Code.UNAVAILABLE
    assert "standby" in (err.value.details() or "") and "primary" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        standby.stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id=collection, subject_id="x"))
    assert err.value.code() == Code.UNAVAILABLE

    for subject in range(4):
        primary.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id=f"s{subject}",
                                             embedding=_capture(subject, subject)))
    # 1:1 on the standby at once: its rows are read, and memory catches up with them.
    assert standby.verify(collection, "s2", _capture(2, 50))
    assert not standby.verify(collection, "s3", _capture(2, 51))
    # 1:N on the standby within the refresh delay.
    named, delay = _until(lambda: standby.identify(collection, _capture(1, 52)))
    assert named[0] == "s1"
    assert delay < 10 * REFRESH + 5  # about one refresh interval; generous for a loaded CI
    info = standby.stub.GetCollection(pb.GetCollectionRequest(collection_id=collection))
    assert info.template_count == 4


def test_a_client_given_every_replica_gets_its_writes_to_the_primary(pair, collection: str) -> None:
    """The SDK (client/, from the source tree) with both replicas as its target: calls go
    round them, and every enrollment lands, the standby's refusals retried on the primary."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
    from vault_client import VaultClient

    primary, standby = _primary(pair), _standby(pair)
    target = f"ipv4:{standby.server.target},{primary.server.target}"
    with VaultClient(target, timeout=30) as client:
        for subject in range(6):
            client.enroll(collection, f"c{subject}", _capture(40 + subject, 1))
        # Counts are each replica's own (a standby's within the refresh delay).
        _until(lambda: client.get_collection(collection).template_count == 6
               and client.get_collection(collection).template_count == 6)
        assert client.verify(collection, "c3", _capture(43, 2))
    assert standby.verify(collection, "c5", _capture(45, 3))


def test_a_deletion_is_never_named_after_its_acknowledgement(pair, collection: str) -> None:
    """Matches hammer both replicas in parallel while the primary deletes: no match that
    started after the deletion was acknowledged names the subject, on either replica, and
    a 1:N for one candidate names the next subject instead of nothing (a standby that
    scored the deleted one catches up and decides again)."""
    primary, standby = _primary(pair), _standby(pair)
    # "twin" is another person with nearly the same face: second best for the probe
    # (cosines 0.94 and 0.92).
    for subject, capture in (("gone", _capture(7, 5)), ("twin", _capture(7, 1)),
                             ("other", _capture(8, 1))):
        primary.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id=subject,
                                             embedding=capture))
    probe = _capture(7, 2)
    _until(lambda: set(standby.identify(collection, probe)) == {"gone", "twin"})
    answers: list[tuple[str, float, list[str], list[str], bool]] = []
    stop = threading.Event()

    def hammer(replica: Replica, name: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            named = replica.identify(collection, probe)
            best = replica.identify(collection, probe, top_k=1)
            verified = replica.verify(collection, "gone", probe)
            answers.append((name, started, named, best, verified))

    threads = [threading.Thread(target=hammer, args=(r, n)) for r, n in
               ((standby, "standby"), (standby, "standby"), (primary, "primary"))]
    for t in threads:
        t.start()
    time.sleep(1.0)
    primary.stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id=collection, subject_id="gone"))
    acknowledged = time.monotonic()
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join()
    before = [a for a in answers if a[1] < acknowledged - 0.5]
    after = [a for a in answers if a[1] > acknowledged]
    assert any(a[3] == ["gone"] for a in before if a[0] == "standby")  # the best, before
    assert {a[0] for a in after} == {"standby", "primary"}
    leaked = [a for a in after if "gone" in a[2] or "gone" in a[3] or a[4]]
    assert not leaked, leaked[:3]
    assert all(a[2] == ["twin"] and a[3] == ["twin"] for a in after), \
        [a for a in after if a[3] != ["twin"]][:3]
    # The other subject is still there through both.
    assert standby.identify(collection, _capture(8, 3)) == ["other"]


def test_a_key_rotation_run_by_the_primary_is_served_by_both(pair, collection: str) -> None:
    primary, standby = _primary(pair), _standby(pair)
    for subject in range(3):
        primary.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id=f"r{subject}",
                                             embedding=_capture(20 + subject, 1)))
    _until(lambda: standby.identify(collection, _capture(21, 2)) == ["r1"])
    with pytest.raises(grpc.RpcError) as err:
        standby.stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id=collection))
    assert err.value.code() == Code.UNAVAILABLE
    job = primary.stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id=collection))
    _until(lambda: primary.stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job.job_id)).state
           == pb.KeyJob.STATE_DONE, timeout=60)
    for replica in (primary, standby):
        _until(lambda r=replica: r.stub.ListKeyVersions(
            pb.ListKeyVersionsRequest(collection_id=collection)).key_version == 2)
        # The templates moved with the rotation match under the new key version.
        assert replica.identify(collection, _capture(21, 3)) == ["r1"]
        assert replica.verify(collection, "r2", _capture(22, 4))
        assert not replica.verify(collection, "r2", _capture(21, 5))


def test_the_standby_takes_over_when_the_primary_dies_and_fences_it(pair, collection: str) -> None:
    """SIGSTOP the primary past its lease (a pause, as a long GC or a cut network makes):
    the standby takes the lease; when the old primary resumes, whatever it tries to write
    is refused (UNAVAILABLE) and nothing of it reaches the database. Then kill it and start
    it again: it comes back as a standby and serves what the new primary enrolled."""
    url = pair[2]
    old, new = _primary(pair), _standby(pair)
    old.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="before",
                                     embedding=_capture(30, 1)))
    assert old.server.proc is not None
    os.kill(old.server.proc.pid, signal.SIGSTOP)
    try:
        def took_over() -> bool:
            try:
                new.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="after",
                                                 embedding=_capture(31, 1)), timeout=10)
                return True
            except grpc.RpcError as err:
                assert err.code() == Code.UNAVAILABLE, err.details()
                return False

        _, waited = _until(took_over, timeout=TTL * 6 + 10)
    finally:
        os.kill(old.server.proc.pid, signal.SIGCONT)
    # No write was accepted before the paused primary's lease expired (its last renewal
    # was at most TTL / 3 before the pause): no moment with two primaries.
    assert waited > TTL / 3
    with pytest.raises(grpc.RpcError) as err:
        old.stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id="fenced",
                                         embedding=_capture(32, 1)), timeout=30)
    assert err.value.code() == Code.UNAVAILABLE and "standby" in (err.value.details() or "")
    with psycopg.connect(url, autocommit=True) as conn:
        (count,) = conn.execute("SELECT COUNT(*) FROM templates WHERE collection_id=%s",
                                (collection,)).fetchone() or (0,)
    assert count == 2  # "before" and "after"; nothing of the fenced primary
    assert new.identify(collection, _capture(31, 2)) == ["after"]
    # The old primary follows the new one: it names what was enrolled there.
    _until(lambda: old.identify(collection, _capture(31, 3)) == ["after"])
    old.stop(kill=True)
    old.start()
    assert _primary(pair) is new
    assert old.identify(collection, _capture(30, 2)) == ["before"]
    assert old.verify(collection, "after", _capture(31, 4))


def test_replicas_started_together_on_a_new_database_share_one_set_of_keys(
        postgres: PostgresServer, tmp_path: Path) -> None:
    """Both processes launched at once on an empty database: one key ceremony (the other
    waits and uses its keys), one primary, and what one enrolls the other matches."""
    url = postgres.create_database()
    a, b = Replica(tmp_path, "a", url, tmp_path / "hsm"), Replica(tmp_path, "b", url, tmp_path / "hsm")
    # The token made once, before either starts (in a child: provisioning points this
    # process's SOFTHSM2_CONF at it, which the other tests here must not inherit).
    make = ("import sys, pathlib; from vault.keys import softhsm; "
            "softhsm.provision(pathlib.Path(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", make, str(tmp_path / "hsm")],
                   check=True, capture_output=True)
    procs = [a.server.launch(), b.server.launch()]
    try:
        for replica in (a, b):
            replica.server.wait_health(health_pb2.HealthCheckResponse.SERVING, timeout=120)
            replica.channel = replica.server.channel()
            replica.stub = vault_pb2_grpc.TemplateVaultStub(replica.channel)
        pair = (a, b, url)
        primary, standby = _primary(pair), _standby(pair)
        primary.stub.CreateCollection(pb.CreateCollectionRequest(collection_id="t", dimension=DIM,
                                                                 threshold=0.8))
        primary.stub.Enroll(pb.EnrollRequest(collection_id="t", subject_id="s",
                                             embedding=_capture(60, 1)))
        assert standby.verify("t", "s", _capture(60, 2))
        with psycopg.connect(url, autocommit=True) as conn:
            (keys,) = conn.execute("SELECT COUNT(*) FROM wrapped_keys").fetchone() or (0,)
        ceremony = [r for r in (a, b) if "key ceremony" in r.server.log_path.read_text()]
        assert len(ceremony) == 1 and keys > 0
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)


def test_a_lockout_holds_across_replicas_under_parallel_tries(
        postgres: PostgresServer, tmp_path: Path) -> None:
    """One credential tries an impostor face on one subject, 8 calls at once on each of two
    replicas: at most 5 are evaluated in all (the attempts in flight are counted in the
    shared database, not by each replica), and the subject is then locked on both."""
    url = postgres.create_database()
    lockout = ["--max-failed-verifications", "5"]  # the default, which the fixture turns off
    a = Replica(tmp_path, "a", url, tmp_path / "hsm", extra=lockout).start()
    b = Replica(tmp_path, "b", url, tmp_path / "hsm", extra=lockout).start()
    try:
        primary, standby = _primary((a, b, url)), _standby((a, b, url))
        primary.stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM,
                                                                 threshold=0.8))
        primary.stub.Enroll(pb.EnrollRequest(collection_id="c", subject_id="target",
                                             embedding=_capture(60, 1)))
        _until(lambda: standby.verify("c", "target", _capture(60, 2)))  # a success counts nothing
        start = threading.Barrier(16)
        outcomes: list[object] = []

        def attempt(replica: Replica) -> None:
            start.wait(30)
            try:
                reply = replica.stub.Match(pb.MatchRequest(
                    collection_id="c", subject_id="target", embedding=_capture(61, 1)), timeout=60)
                outcomes.append("matched" if reply.matched else "evaluated")
            except grpc.RpcError as err:
                outcomes.append(err.code())

        threads = [threading.Thread(target=attempt, args=(r,)) for r in (a, b) * 8]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 1 <= outcomes.count("evaluated") <= 5, outcomes
        assert outcomes.count("evaluated") + outcomes.count(Code.RESOURCE_EXHAUSTED) == 16, outcomes
        for replica in (a, b):  # locked for this credential, on both, even the genuine face
            with pytest.raises(grpc.RpcError) as err:
                replica.stub.Match(pb.MatchRequest(collection_id="c", subject_id="target",
                                                   embedding=_capture(60, 3)), timeout=60)
            assert err.value.code() == Code.RESOURCE_EXHAUSTED
    finally:
        a.stop()
        b.stop()
