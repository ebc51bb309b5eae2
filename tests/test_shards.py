"""Ray shards (vault.gallery.shards) on Ray's own multi-node test cluster: several raylets
on 127.0.0.1, token authentication on, one CPU each, a small object store.

One data directory is written once without Ray (three blocks and journal pages) and its
1:N answers recorded; every test opens that same directory with its blocks on the shards
and must get the same answers, or UNAVAILABLE while a shard is down, never a non-match.
The same again with the store (blocks included) in a real PostgreSQL: there the vault
sends the shards the blocks it read from the database.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vault import logs
from vault.domain.errors import DataLoss, Unavailable
from vault.gallery.shards import BlockRef, RaySettings
from vault.keys.hsm import HsmConfig
from vault.ops.imports import ImportItem
from vault.service import Tuning, Vault
from vault.testing import PostgresServer

ray = pytest.importorskip("ray")
from ray._private import ray_constants  # noqa: E402
from ray._private.authentication_test_utils import reset_auth_token_state  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.timeout(240)  # a cluster that cannot form must not hang the run

DIM = 128
SLOTS = 4096
COUNT = 2 * SLOTS + 700  # two clustered blocks and a mixed one
SMALL_STORE = 80 * 1024 * 1024
NODE = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "object_store_memory": SMALL_STORE}


def _people(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic faces: 4 samples of each identity around its centre (cosine ~0.7)."""
    ids = np.arange(COUNT) // 4
    centres = rng.standard_normal((ids.max() + 1, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    return centres[ids] + 0.65 * rng.standard_normal((COUNT, DIM)) / np.sqrt(DIM), centres


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                              "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # every address on loopback
    reset_auth_token_state()  # Ray read RAY_AUTH_MODE when it was imported
    loopback = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # (read at import too): this node's IP is 127.0.0.1
    c = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    c.add_node(**NODE)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_auth_token_state()
        ray_constants.ENABLE_RAY_CLUSTER = loopback


Answers = list[tuple[bool, frozenset[str]]]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory, hsm_config: HsmConfig
            ) -> tuple[Path, list[list[float]], Answers]:
    """A data directory, probes, and the in-process gallery's answers to them."""
    data = tmp_path_factory.mktemp("shards") / "data"
    return (data, *_write_gallery(data, hsm_config))


@pytest.fixture(scope="module")
def pg_gallery(tmp_path_factory: pytest.TempPathFactory, hsm_config: HsmConfig,
               postgres: PostgresServer) -> tuple[Path, str, list[list[float]], Answers]:
    """The same gallery with its store in PostgreSQL (block data included): its data
    directory (the audit log only), database URL, probes and in-process answers."""
    data, url = tmp_path_factory.mktemp("pgshards") / "data", postgres.create_database()
    return (data, url, *_write_gallery(data, hsm_config, url))


def _write_gallery(data: Path, hsm_config: HsmConfig, store_url: str | None = None
                   ) -> tuple[list[list[float]], Answers]:
    logs.configure()
    rng = np.random.default_rng(12)
    faces, centres = _people(rng)
    v = Vault.open(data, hsm_config, store_url=store_url,
                   tuning=Tuning(maintenance_interval=0, workers=0))
    try:
        v.create_collection("c", DIM, 0.55)
        session = v.start_import("c")
        session.add([ImportItem(f"p{i // 4}-{i % 4}", f.tolist()) for i, f in enumerate(faces)])
        session.finish()
        for k in range(3):  # journal pages stay in the vault process
            v.enroll("c", f"late{k}", (centres[k] + 0.3 * rng.standard_normal(DIM) / 8).tolist())
        assert len(v.galleries()[0].blocks) == 3 and v.galleries()[0].pages
        probes = [(centres[k] + 0.65 * rng.standard_normal(DIM) / np.sqrt(DIM)).tolist()
                  for k in (0, 1, 2, 500, 1300, 2100)]
        probes += [rng.standard_normal(DIM).tolist() for _ in range(2)]  # nobody
        answers = [_answer(v, p) for p in probes]
    finally:
        v.close()
    assert [m for m, _ in answers] == [True] * 6 + [False] * 2
    return probes, answers


def _answer(v: Vault, probe: list[float]) -> tuple[bool, frozenset[str]]:
    """The decision and the subjects named (every candidate: top_k 10 is above the 5
    samples of one identity; their order and released scores carry the decider's noise)."""
    result = v.identify("c", probe, top_k=10)
    return result.matched, frozenset(c.subject_id for c in result.candidates)


def _open(data: Path, hsm_config: HsmConfig, cluster: Cluster, store_url: str | None = None,
          **settings: Any) -> Vault:
    ray_settings = RaySettings(address=cluster.address, cpus=0.1, **settings)
    return Vault.open(data, hsm_config, store_url=store_url,
                      tuning=Tuning(maintenance_interval=0, workers=0, ray=ray_settings))


def _until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


Sent = list[tuple[str, tuple[Any, ...]]]


def _record_calls(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Every actor call the vault makes from now on: (method, arguments)."""
    sent: Sent = []
    real = ray.actor.ActorMethod.remote

    def record(self: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append((self._method_name, args + tuple(kwargs.values())))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ray.actor.ActorMethod, "remote", record)
    return sent


def _same_answers_from_shards_only(v: Vault, probes: list[list[float]], answers: Answers,
                                   sent: Sent, forbidden: tuple[bytes, ...] = ()) -> None:
    """The shards are spread, hold every block, answer as the in-process gallery did, and
    were sent only public data (no key, no subject id, nothing in ``forbidden``)."""
    status = v.shards.status()
    assert len(status) == 2 and len({s["node"] for s in status}) == 2  # spread
    assert [_answer(v, p) for p in probes] == answers
    held = sorted(k for s in v.shards.status() for k in s["blocks"])
    assert [k[:3] for k in held] == [("c", 1, b) for b in sorted(v.galleries()[0].blocks)]
    # The vault keeps no block residues: they are in the shards only.
    assert all(b.residues.size == 0 for b in v.galleries()[0].blocks.values())
    # What went to Ray: block references, the score prime, the transformed probe.
    secrets_held = [v.data_key("pii"), v.data_key("sketch"), v.audit_ref_key, *forbidden]
    raw = [np.asarray(p) for p in probes]
    for method, args in sent:
        assert method in {"load", "score", "where", "held", "forget"}, method
        plain = []
        for arg in args:
            if isinstance(arg, list):
                assert all(isinstance(r, BlockRef) for r in arg)
                for r in arg:
                    if r.data is not None:  # residues sent through the object store
                        residues = ray.get(r.data)
                        assert residues.shape == (DIM, 2, SLOTS) and residues.dtype.kind == "u"
                        assert r.path == ""
                arg = [dataclasses.replace(r, data=None) for r in arg]
            elif isinstance(arg, np.ndarray):
                # The quantised transformed probe, one row per digit (vault.he.poly).
                assert arg.dtype == np.int64 and arg.ndim == 2 and arg.shape[1] == DIM
                assert max(abs(np.corrcoef(arg[0], r)[0, 1]) for r in raw) < 0.6
            else:
                assert isinstance(arg, int | str), type(arg)
            plain.append(arg)
        blob = pickle.dumps(plain)
        assert not any(s and s in blob for s in secrets_held)
        assert b"p1-" not in blob and b"late" not in blob  # no subject id
    assert {m for m, _ in sent} >= {"load", "score"}


def test_shards_answer_as_the_in_process_gallery_and_see_only_public_data(
        cluster: Cluster, gallery: Any, hsm_config: HsmConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    data, probes, answers = gallery
    sent = _record_calls(monkeypatch)
    v = _open(data, hsm_config, cluster, watch_interval=0)
    try:
        _same_answers_from_shards_only(v, probes, answers, sent)
        loads = [r for m, args in sent if m == "load" for r in args[0]]
        assert loads and all(r.path and r.data is None for r in loads)  # they read the files
    finally:
        v.close()


def test_shards_on_postgresql_are_sent_the_blocks_and_answer_as_the_in_process_gallery(
        cluster: Cluster, pg_gallery: Any, hsm_config: HsmConfig,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks kept in PostgreSQL reach the shards through Ray's object store, read and
    checked by the vault: no path, no database URL or credential is sent."""
    data, url, probes, answers = pg_gallery
    sent = _record_calls(monkeypatch)
    v = _open(data, hsm_config, cluster, store_url=url, watch_interval=0)
    try:
        port = str(url.rsplit(":", 1)[1].split("/")[0]).encode()
        _same_answers_from_shards_only(v, probes, answers, sent,
                                       forbidden=(url.encode(), b"postgresql", b"block_data",
                                                  b":" + port))
        loads = [r for m, args in sent if m == "load" for r in args[0]]
        assert len(loads) == len(v.galleries()[0].blocks)  # each sent once, at load
        assert all(r.path == "" and r.data is not None for r in loads)
    finally:
        v.close()


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _loopback(host: str) -> bool:
    host = host.strip("[]").removeprefix("::ffff:")  # IPv4-mapped
    return host.startswith("127.") or host == "::1"


def test_ray_listens_on_loopback_only_and_refuses_a_wrong_token(cluster: Cluster) -> None:
    ours = _descendants(os.getpid())
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    exposed = [line for line in listening.splitlines()
               if any(f"pid={p}," in line for p in ours)
               and not _loopback(line.split()[3].rsplit(":", 1)[0])]
    assert any("raylet" in line or "gcs_server" in line for line in listening.splitlines()
               if any(f"pid={p}," in line for p in ours))
    assert exposed == []
    # A driver with the wrong token is refused by the cluster's GCS.
    env = {**os.environ, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    code = (f"import ray\nray.init(address={cluster.address!r}, include_dashboard=False)\n"
            "print(ray.get(ray.remote(lambda: 1).remote()))")
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode != 0 and "1\n" not in out.stdout
    except subprocess.TimeoutExpired:
        pass  # it never got in (it would retry forever)


def _kill_a_shard(v: Vault) -> dict[str, Any]:
    """SIGKILL a shard that holds blocks; its status before."""
    owners = set(v.shards.owned().values())
    victim = next(s for s in v.shards.status() if s["name"] in owners and s["blocks"])
    os.kill(victim["pid"], signal.SIGKILL)
    _until(lambda: not Path(f"/proc/{victim['pid']}").exists(), 10)
    return victim


def _restarted(v: Vault, victim: dict[str, Any]) -> dict[str, Any] | None:
    """The victim shard's status once it answers again from a new process, else None."""
    now = next(s for s in v.shards.status() if s["name"] == victim["name"])
    return now if now["pid"] not in (None, victim["pid"]) else None


def _killed_shard_is_unavailable_then_reloaded(v: Vault, probes: list[list[float]],
                                               answers: Answers) -> None:
    assert _answer(v, probes[0]) == answers[0]
    victim = _kill_a_shard(v)
    v.shards.timeout = 0.2  # down or restarting: no answer in time
    outcomes = []
    for p, a in zip(probes, answers, strict=True):
        try:
            outcomes.append(_answer(v, p) == a)
        except Unavailable:
            outcomes.append("unavailable")
    assert "unavailable" in outcomes and False not in outcomes  # never a wrong answer
    v.shards.timeout = 30.0

    def reloaded() -> bool:
        now = _restarted(v, victim)
        return now is not None and now["blocks"] == victim["blocks"]

    _until(reloaded)
    assert [_answer(v, p) for p in probes] == answers


def test_a_killed_shard_is_unavailable_then_restarts_and_reloads(
        cluster: Cluster, gallery: Any, hsm_config: HsmConfig) -> None:
    data, probes, answers = gallery
    v = _open(data, hsm_config, cluster, watch_interval=0.3)
    try:
        _killed_shard_is_unavailable_then_reloaded(v, probes, answers)
    finally:
        v.close()


def test_a_killed_shard_on_postgresql_is_unavailable_then_reloaded_from_the_store(
        cluster: Cluster, pg_gallery: Any, hsm_config: HsmConfig) -> None:
    data, url, probes, answers = pg_gallery
    v = _open(data, hsm_config, cluster, store_url=url, watch_interval=0.3)
    try:
        _killed_shard_is_unavailable_then_reloaded(v, probes, answers)
        # Sent blocks do not stay in the object store (on the vault's node): the shards
        # hold their own copies, and nobody holds an ObjectRef.
        _until(lambda: _plasma_objects() == 0)
    finally:
        v.close()


def _plasma_objects() -> int:
    """How many objects Ray's object stores hold, over the cluster."""
    from ray._private.internal_api import memory_summary

    line = next(line for line in memory_summary(stats_only=True).splitlines()
                if line.startswith("Plasma memory usage"))
    return int(line.split(",")[1].split()[0])


def _flip_block_data(url: str) -> None:
    """Someone with write access to the database flips a byte of every block's data
    (its own inverse: run twice, the rows are as they were)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE block_data SET data = set_byte(data, length(data) / 2, "
                   "get_byte(data, length(data) / 2) # 1)")


def test_block_data_changed_in_postgresql_never_reaches_a_shard(
        cluster: Cluster, pg_gallery: Any, hsm_config: HsmConfig) -> None:
    """Rows changed behind a running vault: a shard that restarts is not sent them, and a
    1:N that needs them is DATA_LOSS (never a non-match), until the rows are restored."""
    data, url, probes, answers = pg_gallery
    v = _open(data, hsm_config, cluster, store_url=url, watch_interval=0.3)
    flipped = False
    try:
        assert _answer(v, probes[0]) == answers[0]
        _flip_block_data(url)
        flipped = True
        victim = _kill_a_shard(v)
        _until(lambda: _restarted(v, victim) is not None)
        time.sleep(1.0)  # the watcher's passes (every 0.3 s) tried to send its blocks again
        now = _restarted(v, victim)
        assert now is not None and now["blocks"] == []
        for p in probes:
            with pytest.raises(DataLoss):
                _answer(v, p)
        now = _restarted(v, victim)
        assert now is not None and now["blocks"] == []  # still nothing sent
        _flip_block_data(url)
        flipped = False
        assert [_answer(v, p) for p in probes] == answers  # sent at the next match
    finally:
        if flipped:
            _flip_block_data(url)
        v.close()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_node_that_joins_takes_blocks_and_one_that_leaves_gives_them_back(
        cluster: Cluster, hsm_config: HsmConfig, store: str,
        request: pytest.FixtureRequest) -> None:
    """Each new generation of shards is loaded before it serves: from the block files, or
    sent every block again from PostgreSQL."""
    if store == "sqlite":
        url = None
        data, probes, answers = request.getfixturevalue("gallery")
    else:
        data, url, probes, answers = request.getfixturevalue("pg_gallery")
    v = _open(data, hsm_config, cluster, store_url=url, watch_interval=0.3)
    try:
        before = {s["node"] for s in v.shards.status()}
        node = cluster.add_node(**NODE)
        _until(lambda: len(v.shards.status()) == 3)
        joined = [s for s in v.shards.status() if s["node"] not in before]
        assert len(joined) == 1 and joined[0]["blocks"], "the new node holds no block"
        assert sorted(len(s["blocks"]) for s in v.shards.status()) == [1, 1, 1]  # its share
        assert [_answer(v, p) for p in probes] == answers
        cluster.remove_node(node)
        _until(lambda: len(v.shards.status()) == 2
               and all(s["node"] in before for s in v.shards.status()))
        held = sorted(k[:3] for s in v.shards.status() for k in s["blocks"])
        assert held == [("c", 1, b) for b in sorted(v.galleries()[0].blocks)]
        assert [_answer(v, p) for p in probes] == answers
    finally:
        v.close()


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_vault_serve_with_ray_address_matches_through_the_shards(
        cluster: Cluster, tmp_path: Path, store: str, request: pytest.FixtureRequest) -> None:
    """``vault serve --ray-address`` (with ``--store postgresql://...`` too): imported
    blocks go to the cluster's shards, a 1:N over gRPC is scored there, and a server whose
    Ray is not token-authenticated is refused."""
    import urllib.request

    from vault.testing import ServerProcess, free_port
    from vault.v1 import vault_pb2 as pb
    from vault.v1 import vault_pb2_grpc

    rng = np.random.default_rng(5)
    faces, _ = _people(rng)
    metrics = f"127.0.0.1:{free_port()}"
    env = {"VAULT_RATE_LIMIT": "0", "VAULT_RAY_ADDRESS": cluster.address,
           "VAULT_METRICS_LISTEN": metrics}
    if store == "postgresql":
        env["VAULT_STORE"] = request.getfixturevalue("postgres").create_database()
    before = {a["ActorID"] for a in ray._private.state.actors().values()}
    with ServerProcess(tmp_path / "data", env=env) as server:
        stub = vault_pb2_grpc.TemplateVaultStub(server.channel())
        stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM,
                                                         threshold=0.55), timeout=60)
        batch = pb.ImportTemplatesRequest(collection_id="c")
        for i, face in enumerate(faces[:400]):
            batch.items.add(subject_id=f"s{i // 4}", embedding=face.tolist())
        results = [r for answer in stub.ImportTemplates(iter([batch]), timeout=120)
                   for r in answer.results]
        assert len(results) == 400 and all(r.code == 0 for r in results)
        answer = stub.Match(pb.MatchRequest(collection_id="c", embedding=faces[9].tolist(),
                                            top_k=10), timeout=60)
        assert answer.matched and "s2" in {c.subject_id for c in answer.candidates}

        def shards() -> list[Any]:
            return [a for a in ray._private.state.actors().values()
                    if a["ActorID"] not in before and a["State"] == "ALIVE"
                    and a["ActorClassName"].endswith("Shard")]

        _until(lambda: len(shards()) == 2)  # one block: the other shard may still be starting
        # Each shard's calls are timed, labelled by shard number and operation only.
        text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=30).read().decode()
        timed = [line for line in text.splitlines()
                 if line.startswith("vault_shard_call_duration_seconds_count{")]
        assert timed and all('operation="score"' in line for line in timed)
        assert {line.split('shard="')[1].split('"')[0] for line in timed} <= {"0", "1"}
        assert sum(float(line.rsplit(" ", 1)[1]) for line in timed) >= 1
    if store != "sqlite":
        return
    refused = ServerProcess(tmp_path / "plain", env={**env, "RAY_AUTH_MODE": "disabled"})
    with pytest.raises(RuntimeError, match="token authentication"):
        refused.start(timeout=60)


def test_two_replicas_on_one_postgresql_and_one_ray_cluster(
        cluster: Cluster, postgres: PostgresServer, tmp_path: Path) -> None:
    """Two `vault serve` replicas on one PostgreSQL store, each with its shards on the same
    Ray cluster: an import acknowledged by the primary (blocks, scored in Ray) matches
    through the standby's shards; a deletion is never named by the standby after it was
    acknowledged; a key rotation run by the primary is served through both replicas'
    shards."""
    from tests.test_replicas import Replica, _until
    from vault.v1 import vault_pb2 as pb

    rng = np.random.default_rng(8)
    faces, _ = _people(rng)
    url = postgres.create_database()
    # Half a CPU per shard: the test cluster's nodes have one each, for two replicas.
    extra = ["--ray-address", cluster.address, "--ray-shard-cpus", "0.5", "--rate-limit", "0"]
    a = Replica(tmp_path, "a", url, tmp_path / "hsm", extra).start()
    b = Replica(tmp_path, "b", url, tmp_path / "hsm", extra).start()
    try:
        primary, standby = (a, b) if a.is_primary() else (b, a)
        primary.stub.CreateCollection(pb.CreateCollectionRequest(collection_id="c", dimension=DIM,
                                                                 threshold=0.55), timeout=60)
        batch = pb.ImportTemplatesRequest(collection_id="c")
        for i, face in enumerate(faces[:400]):
            batch.items.add(subject_id=f"s{i // 4}", embedding=face.tolist())
        results = [r for answer in primary.stub.ImportTemplates(iter([batch]), timeout=120)
                   for r in answer.results]
        assert len(results) == 400 and all(r.code == 0 for r in results)
        probe = faces[9].tolist()  # a capture of s2
        _until(lambda: "s2" in standby.identify("c", probe, top_k=10), timeout=60)
        assert "s2" in primary.identify("c", probe, top_k=10)
        # Each replica placed its own shards on the one cluster.
        shards = [x for x in ray._private.state.actors().values()
                  if x["State"] == "ALIVE" and x["ActorClassName"].endswith("Shard")]
        assert len(shards) >= 4
        primary.stub.DeleteSubject(pb.DeleteSubjectRequest(collection_id="c", subject_id="s2"))
        for replica in (standby, primary):
            assert "s2" not in replica.identify("c", probe, top_k=10)
            assert not replica.verify("c", "s2", probe)
        job = primary.stub.RotateCollectionKey(pb.RotateCollectionKeyRequest(collection_id="c"))
        _until(lambda: primary.stub.GetKeyJob(pb.GetKeyJobRequest(job_id=job.job_id)).state
               == pb.KeyJob.STATE_DONE, timeout=120)
        for replica in (primary, standby):
            _until(lambda r=replica: r.stub.ListKeyVersions(
                pb.ListKeyVersionsRequest(collection_id="c")).key_version == 2, timeout=60)
            assert "s3" in replica.identify("c", faces[13].tolist(), top_k=10)
            assert "s2" not in replica.identify("c", probe, top_k=10)
    finally:
        a.stop()
        b.stop()
