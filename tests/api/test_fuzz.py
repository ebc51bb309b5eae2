"""Property-based fuzzing of a real ``vault serve`` process ("Hostile conditions": malformed input).

Attacked: every field of every TemplateVault RPC (CreateCollection, GetCollection, Enroll,
Match 1:1 and 1:N, DeleteSubject, ImportTemplates streams, and the key lifecycle:
ListKeyVersions, GetKeyJob, SetMinKeyVersion, RewrapKeys, RotateCollectionKey) with random
and boundary values: dimensions from 0 to
2^32-1, embeddings of every length up to just under and just over the 1 MiB message limit,
NaN, +-inf, subnormals, huge and tiny floats, empty, huge and unicode ids (emoji, combining
marks, NUL and other control characters), unknown collections and collections of another
dimension, any top_k and threshold; and raw bytes that are not (or barely) protobuf,
including negative varints in unsigned fields and strings that are not UTF-8.

Asserted for every request sent:

- the status is OK or one of INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
  RESOURCE_EXHAUSTED, FAILED_PRECONDITION; never UNKNOWN or INTERNAL, no traceback in the
  details; and it agrees with an independent model of the documented validation rules
  (a request the model finds invalid is never OK, a valid one is never refused as invalid);
- a refused request changes nothing: row counts (and fill levels) of ``collections``,
  ``subjects``, ``templates``, ``pages``, ``blocks``, ``verify_attempts``, read
  from the server's SQLite file, and ``template_count`` of the fuzzed collections are
  compared right before and right after it;
- the server process is still alive.

Counts scale with VAULT_STRESS=1 (at least 10,000 requests in all); the real totals are
written with :func:`vault.testing.record_figures` as ``fuzz``.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import tempfile
import unicodedata
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from vault.testing import ServerProcess, record_figures, scaled
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

# database=None keeps Hypothesis's example database out of the repo, but it still caches
# (unicode tables, source constants) under ./.hypothesis/ unless told to write elsewhere.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY",
                      str(Path(tempfile.gettempdir()) / "vault-test-hypothesis"))

Code = grpc.StatusCode
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS,
           Code.RESOURCE_EXHAUSTED, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED}
MAX_MESSAGE_BYTES = 1 << 20  # the server's receive limit (vault.api.server)

# The collections under attack. Small dimensions keep a valid enrollment cheap (one CKKS
# ciphertext per dimension); two of them give "right embedding, wrong collection".
PREFIX = "fuzz-"
RUN = uuid.uuid4().hex[:8]
FIXED = {f"{PREFIX}{RUN}-16": 16, f"{PREFIX}{RUN}-8": 8}
MAIN, OTHER = FIXED
SUBJECTS = ["fuzz-alice", "fuzz-bob"]
# New collections made by valid CreateCollection requests: each one generates CKKS keys,
# so only a few are allowed; past that, a would-be-valid create is aimed at MAIN instead
# (ALREADY_EXISTS), which still runs every validation step.
CREATE_BUDGET = scaled(8, 40)

SETTINGS = settings(
    max_examples=scaled(100, 2500), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)

# -- an independent model of the documented validation rules -----------------------------

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def collection_id_ok(value: str) -> bool:
    return _ID.fullmatch(value) is not None  # the whole string: no trailing newline either


def text_id_ok(value: str, limit: int, required: bool) -> bool:
    if not value:
        return not required
    # The service refuses C0 controls (and lone surrogates, which cannot reach it as proto3
    # strings); DEL and C1 controls are accepted today, so the model accepts them too.
    return (len(value.encode("utf-8", errors="surrogatepass")) <= limit
            and not any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value))


_INVISIBLE = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}


def subject_id_ok(value: str) -> bool:
    """As text ids, and no invisible characters; the NFC form is what must fit."""
    return (text_id_ok(value, 256, required=True)
            and not any(unicodedata.category(c) in _INVISIBLE for c in value)
            and text_id_ok(unicodedata.normalize("NFC", value), 256, required=True))


def reference_mean_ok(values: list[float], dimension: int) -> bool:
    return not values or (len(values) == dimension and all(math.isfinite(v) for v in values)
                          and math.hypot(*values) < 0.999)


def threshold_ok(value: float) -> bool:
    return math.isfinite(value) and -1.0 <= value <= 1.0


def embedding_ok(values: list[float], dimension: int) -> bool:
    if len(values) != dimension or not all(math.isfinite(v) for v in values):
        return False
    norm = math.hypot(*values)
    return math.isfinite(norm) and norm >= 1e-12  # a zero vector has no direction


# -- raw protobuf wire encoding, for what the generated classes refuse to build ----------

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative numbers: ten bytes, as int64 on the wire
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def wire_field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def packed_floats(number: int, count: int, pattern: list[float]) -> bytes:
    """``count`` float32 values repeating ``pattern``, as one packed field (fast for 1 MiB)."""
    with np.errstate(over="ignore"):
        values = np.resize(np.asarray(pattern, dtype=np.float64).astype("<f4"), count)
    return wire_field(number, 2, values.tobytes())


# -- the harness: one call, every assertion ----------------------------------------------

# RotateMasterKey takes no fields: any decodable bytes are a rotation, so it is left to
# tests/api/test_keys.py. RotateCollectionKey is sent for collections that do not exist
# (a real one would start a rotation).
REQUEST = {"CreateCollection": pb.CreateCollectionRequest, "GetCollection": pb.GetCollectionRequest,
           "Enroll": pb.EnrollRequest, "Match": pb.MatchRequest,
           "DeleteSubject": pb.DeleteSubjectRequest,
           "ListKeyVersions": pb.ListKeyVersionsRequest, "GetKeyJob": pb.GetKeyJobRequest,
           "SetMinKeyVersion": pb.SetMinKeyVersionRequest, "RewrapKeys": pb.RewrapKeysRequest,
           "RotateCollectionKey": pb.RotateCollectionKeyRequest}
RESPONSE = {"CreateCollection": pb.Collection, "GetCollection": pb.Collection,
            "Enroll": pb.EnrollResponse, "Match": pb.MatchResponse,
            "DeleteSubject": pb.DeleteSubjectResponse, "ListKeyVersions": pb.KeyVersions,
            "GetKeyJob": pb.KeyJob, "SetMinKeyVersion": pb.Collection,
            "RewrapKeys": pb.MasterKeyRotation, "RotateCollectionKey": pb.KeyJob}
READ_ONLY = {"GetCollection", "Match", "ListKeyVersions", "GetKeyJob", "RewrapKeys"}

_STATE_SQL = """SELECT
  (SELECT count(*) FROM collections),
  (SELECT count(*) FROM subjects),
  (SELECT count(*) FROM templates), (SELECT count(*) FROM templates WHERE state = 1),
  (SELECT count(*) FROM blocks), (SELECT total(fill) + total(generation) FROM blocks),
  (SELECT count(*) FROM pages), (SELECT total(fill) + total(generation) FROM pages),
  (SELECT count(*) FROM verify_attempts),
  (SELECT total(failures) + total(locked_until) FROM verify_attempts),
  (SELECT total(key_version) + total(min_key_version) FROM collections),
  (SELECT count(*) FROM key_jobs), (SELECT count(*) FROM collection_keys)"""


@dataclass
class Figures:
    requests: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    unknown: int = 0
    internal: int = 0
    crashes: int = 0
    state_changes_from_rejected: int = 0
    created: int = 0


FIGURES = Figures()


class Fuzzer:
    """Sends raw bytes to the server and checks the answer against the model and the store."""

    def __init__(self, server: ServerProcess, channel: grpc.Channel, db: sqlite3.Connection) -> None:
        self.server = server
        self.db = db
        # Identity (de)serializers: structured requests and garbage take the same path.
        self._raw = {m: channel.unary_unary(f"/vault.v1.TemplateVault/{m}",
                                            request_serializer=None, response_deserializer=None)
                     for m in REQUEST}
        self._import = channel.stream_stream(
            "/vault.v1.TemplateVault/ImportTemplates",
            request_serializer=pb.ImportTemplatesRequest.SerializeToString,
            response_deserializer=pb.ImportTemplatesResponse.FromString)
        self.state = self.snapshot()

    def dimension_of(self, collection_id: str) -> int | None:
        row = self.db.execute("SELECT dimension FROM collections WHERE collection_id = ?",
                              (collection_id,)).fetchone()
        return None if row is None else row[0]

    def snapshot(self) -> tuple:
        counts = self.db.execute(_STATE_SQL).fetchone()
        counts_of = tuple(
            RESPONSE["GetCollection"].FromString(self._raw["GetCollection"](
                pb.GetCollectionRequest(collection_id=c).SerializeToString(), timeout=30)).template_count
            for c in FIXED)
        return counts, counts_of

    def expect(self, method: str, payload: bytes) -> set[Code]:
        """The statuses the documented rules allow for these bytes."""
        if len(payload) > MAX_MESSAGE_BYTES:
            return {Code.RESOURCE_EXHAUSTED}
        try:
            request = REQUEST[method].FromString(payload)
        except DecodeError:
            return {Code.INVALID_ARGUMENT}
        return self.expect_request(method, request)

    def expect_request(self, method: str, r: Message) -> set[Code]:
        if method == "RewrapKeys":
            return {Code.OK}
        if method == "GetKeyJob":  # no rotation ever runs on this server
            return {Code.NOT_FOUND} if re.fullmatch(r"[0-9a-f]{32}", r.job_id) else {Code.INVALID_ARGUMENT}
        if method == "ListKeyVersions" and not r.collection_id:
            return {Code.OK}  # the master key only
        problems: set[Code] = set()  # the server reports whichever it checks first
        dimension = None
        if not collection_id_ok(r.collection_id):
            problems.add(Code.INVALID_ARGUMENT)
        else:
            dimension = self.dimension_of(r.collection_id)
        if method == "CreateCollection":
            if (problems or not 2 <= r.dimension <= 1024 or not r.HasField("threshold")
                    or not threshold_ok(r.threshold)
                    or not reference_mean_ok(list(r.reference_mean), r.dimension)):
                return {Code.INVALID_ARGUMENT}
            return {Code.ALREADY_EXISTS} if dimension is not None else {Code.OK}
        if not problems and dimension is None:
            problems.add(Code.NOT_FOUND)
        if method in ("GetCollection", "ListKeyVersions", "RotateCollectionKey"):
            return problems or {Code.OK}
        if method == "SetMinKeyVersion":  # our collections are at key version 1, minimum 1
            return problems or ({Code.OK} if r.min_key_version == 1 else {Code.FAILED_PRECONDITION})
        subject_required = method in ("Enroll", "DeleteSubject") or bool(r.subject_id)
        if subject_required and not subject_id_ok(r.subject_id):
            problems.add(Code.INVALID_ARGUMENT)
        if method == "DeleteSubject":
            return problems or {Code.OK, Code.NOT_FOUND}
        if dimension is not None and not embedding_ok(list(r.embedding), dimension):
            problems.add(Code.INVALID_ARGUMENT)
        if method == "Enroll":
            if not text_id_ok(r.request_id, 128, required=False):
                problems.add(Code.INVALID_ARGUMENT)
            # ALREADY_EXISTS: the request_id was used before for another subject.
            # PERMISSION_DENIED: the subject is enrolled and this face does not match it;
            # RESOURCE_EXHAUSTED: too many such tries (the attempt limit).
            allowed = {Code.OK, Code.PERMISSION_DENIED, Code.RESOURCE_EXHAUSTED}
            return problems or (allowed | {Code.ALREADY_EXISTS} if r.request_id else allowed)
        if len(r.purpose) > 128 or not r.purpose.isprintable():
            problems.add(Code.INVALID_ARGUMENT)
        if r.subject_id:  # 1:1; NOT_FOUND: no such subject; RESOURCE_EXHAUSTED: locked out
            if r.top_k > 1:
                problems.add(Code.INVALID_ARGUMENT)
            return problems or {Code.OK, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
        if r.top_k > 10:
            problems.add(Code.INVALID_ARGUMENT)
        # RESOURCE_EXHAUSTED: the probing guard (hypothesis repeats its probes).
        return problems or {Code.OK, Code.RESOURCE_EXHAUSTED}

    def would_write_elsewhere(self, method: str, payload: bytes) -> bool:
        """A valid write to a collection other than ours (another test's, or a new one)."""
        try:
            request = REQUEST[method].FromString(payload)
        except DecodeError:
            return False
        if method == "CreateCollection":
            return self.expect_request(method, request) == {Code.OK}
        if method == "RotateCollectionKey":  # any collection that exists would rotate
            return self.expect_request(method, request) == {Code.OK}
        return (method in ("Enroll", "DeleteSubject", "Match", "SetMinKeyVersion")
                and request.collection_id not in FIXED
                and collection_id_ok(request.collection_id)
                and self.dimension_of(request.collection_id) is not None)

    def send(self, method: str, payload: bytes | Message) -> tuple[Code, str, bytes | None]:
        if isinstance(payload, Message):
            payload = payload.SerializeToString()
        expected = self.expect(method, payload)
        before = self.state
        try:
            response, code, details = self._raw[method](payload, timeout=60), Code.OK, ""
        except grpc.RpcError as err:
            response, code, details = None, err.code(), err.details() or ""
        FIGURES.requests += 1
        FIGURES.by_status[code.name] += 1
        FIGURES.unknown += code == Code.UNKNOWN
        FIGURES.internal += code == Code.INTERNAL
        alive = self.server.proc is not None and self.server.proc.poll() is None
        FIGURES.crashes += not alive
        assert alive, f"server died on {method} ({len(payload)} bytes)"
        assert code in ALLOWED, f"{method}: {code.name}: {details!r}"
        assert "Traceback" not in details and 'File "' not in details, details
        self.state = self.snapshot()
        if code != Code.OK:
            # A face refused for an enrolled subject counts as a failed attempt, nothing else.
            mask = ((lambda st: (st[0][:8], st[0][10:], st[1]))
                    if (method, code) == ("Enroll", Code.PERMISSION_DENIED) else (lambda st: st))
            FIGURES.state_changes_from_rejected += mask(self.state) != mask(before)
            assert mask(self.state) == mask(before), \
                f"refused {method} ({code.name}: {details}) changed state"
        elif method == "Match":  # may count a failed 1:1 attempt, nothing else
            assert (self.state[0][:8], self.state[0][10:]) == (before[0][:8], before[0][10:]), \
                "Match wrote templates, blocks or keys"
        elif method in READ_ONLY:
            assert self.state == before, f"{method} changed the vault's state"
        assert code in expected, f"{method}: got {code.name} ({details!r}), model allows {expected}"
        if response is not None:
            RESPONSE[method].FromString(response)  # a well-formed answer
        return code, details, response


    def template_ids(self, live: bool) -> set[str]:
        return {r[0] for r in self.db.execute(
            "SELECT template_id FROM templates WHERE collection_id IN (?, ?)"
            + (" AND state = 1" if live else ""), tuple(FIXED))}

    def send_import(self, messages: list[pb.ImportTemplatesRequest]) -> Code:
        """One ImportTemplates stream; checks the stream's status and every item's result."""
        first = messages[0].collection_id
        expected: set[Code] = set()
        if not collection_id_ok(first):
            expected = {Code.INVALID_ARGUMENT}
        elif self.dimension_of(first) is None:
            expected = {Code.NOT_FOUND}
        elif any(m.collection_id not in ("", first) for m in messages[1:]):
            expected = {Code.INVALID_ARGUMENT}
        before, ids_before = self.state, self.template_ids(live=False)
        results: dict[int, pb.ImportResult] = {}
        try:
            for response in self._import(iter(messages), timeout=120):
                for r in response.results:
                    assert r.index not in results, "an item answered twice"
                    results[r.index] = r
            code, details = Code.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        FIGURES.requests += 1
        FIGURES.by_status[code.name] += 1
        FIGURES.unknown += code == Code.UNKNOWN
        FIGURES.internal += code == Code.INTERNAL
        assert self.server.proc is not None and self.server.proc.poll() is None, "server died"
        assert code in ALLOWED and "Traceback" not in details, (code, details)
        self.state = self.snapshot()
        if code != Code.OK:
            FIGURES.state_changes_from_rejected += self.state != before
            assert self.state == before, f"a refused import ({code.name}: {details}) changed state"
            assert code in expected, (code, details, expected)
            return code
        assert not expected, f"the import should have been refused with {expected}"
        items = [i for m in messages for i in m.items]
        assert sorted(results) == list(range(len(items)))
        for index, item in enumerate(items):
            allowed = self.expect_request("Enroll", pb.EnrollRequest(
                collection_id=first, subject_id=item.subject_id, embedding=item.embedding,
                request_id=item.request_id))
            got = Code.OK if results[index].code == 0 else next(
                c for c in Code if c.value[0] == results[index].code)
            assert got in allowed, (index, got, results[index].message, allowed)
            assert "Traceback" not in results[index].message
            FIGURES.by_status[f"item {got.name}"] += 1
        # New live templates are exactly the accepted items that were not retries; a retry
        # answers its first template id (even if that template was deleted since).
        answered = {r.template_id for r in results.values() if r.code == 0}
        new = self.template_ids(live=True) - ids_before
        assert new <= answered and answered - new <= ids_before
        return code


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server of its own, without background maintenance: erasing earlier deletions
    would change the state between two requests and be blamed on the second."""
    # No match budgets nor probing guard either: thousands of generated probes (the long
    # version) spend them, and refusals the model does not predict are not what is fuzzed
    # here (tests/api/test_release.py and tests/test_probing.py attack those).
    with ServerProcess(tmp_path_factory.mktemp("fuzz") / "data",
                       env={"VAULT_MAINTENANCE_INTERVAL": "0", "VAULT_VERIFY_BUDGET": "0",
                            "VAULT_IDENTIFY_BUDGET": "0", "VAULT_SCORE_BUDGET": "0",
                            "VAULT_PROBE_CLUSTER": "0"}) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz(fuzz_server: ServerProcess) -> Iterator[Fuzzer]:
    server = fuzz_server
    db_path: Path = server.data_dir / "vault.db"
    with server.channel() as channel:
        stub = vault_pb2_grpc.TemplateVaultStub(channel)
        for cid, dim in FIXED.items():
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id=cid, dimension=dim,
                                                             threshold=0.5))
            for subject in SUBJECTS:
                stub.Enroll(pb.EnrollRequest(collection_id=cid, subject_id=subject,
                                             embedding=enrolled(subject, dim)))
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, check_same_thread=False)
        try:
            yield Fuzzer(server, channel, db)
        finally:
            db.close()
            record_figures("fuzz", {
                "requests": FIGURES.requests, "by_status": dict(sorted(FIGURES.by_status.items())),
                "unknown": FIGURES.unknown, "internal": FIGURES.internal,
                "crashes": FIGURES.crashes,
                "state_changes_from_rejected": FIGURES.state_changes_from_rejected,
                "collections_created": FIGURES.created,
            })


def enrolled(subject: str, dimension: int) -> list[float]:
    seed = SUBJECTS.index(subject) + 1
    return np.random.default_rng(seed).standard_normal(dimension).astype(np.float32).tolist()


# -- strategies ----------------------------------------------------------------------------

def either(valid: st.SearchStrategy, hostile: st.SearchStrategy) -> st.SearchStrategy:
    """A valid value half the time, a hostile one otherwise: most requests break one or two
    fields, so every check is reached, not only the first one the server makes. (Not
    ``one_of``: it would flatten the branches and make valid values rare.)"""
    return st.booleans().flatmap(lambda ok: valid if ok else hostile)


SPECIAL_FLOATS = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 5e-324, 1e-45, 1.4e-45,
                  1.1754942e-38, 1.17549435e-38, 1e-13, 1e-12, 3.4028235e38, -3.4028235e38,
                  3.5e38, 1e300, -1e300, 1e-300, 1.0, -1.0]
hostile_float = st.one_of(
    st.floats(width=32),  # NaN, inf, subnormals and everything between
    st.floats(),  # float64: overflows to inf, or underflows to 0, as float32
    st.sampled_from(SPECIAL_FLOATS),
)
sane_float = st.floats(-10, 10, width=32)

ours = st.sampled_from(list(FIXED))
BOUNDARY_IDS = ["", "a", "A" * 64, "A" * 65, "-a", ".a", "_a", "a b", "a/b", "a\n", "a\r\n",
                "a\x00", "\x00", "é", "fuzz-😀", "a" * 1000, "a" * 100_000, f"{PREFIX}missing",
                f"{MAIN}\n", f"{MAIN}\x00", f" {MAIN}", f"{MAIN} ", MAIN.upper(), "../" + MAIN,
                "ﬀ", "Ａ", "a\u0301", "０", f"{OTHER}\n"]
ID_CHARS = st.characters(codec="ascii")
collection_ids = st.one_of(
    st.sampled_from(BOUNDARY_IDS),
    st.text(max_size=80),  # any unicode: emoji, combining marks, controls
    st.text(ID_CHARS, min_size=1, max_size=70),  # near misses, and unknown valid ids
)

valid_subjects = st.one_of(
    st.sampled_from(SUBJECTS),
    st.text(st.characters(min_codepoint=32, codec="utf-8",  # emoji, RTL scripts
                          exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
            min_size=1, max_size=60),
)
BOUNDARY_TEXT = ["", " ", "s" * 256, "s" * 257, "é" * 128, "é" * 129, "😀" * 64, "😀" * 64 + "a",
                 "a\x00b", "\x00", "\x1f", "\x7f", "\u0085", "\u2028", "e\u0301", "\u200b",
                 "\ufeff", "\U0010ffff", "\U000e0001", "\u202eevil", "👨‍👩‍👧‍👦" * 10, "x" * 10_000]
subject_ids = st.one_of(
    st.sampled_from(BOUNDARY_TEXT),
    st.text(max_size=300),
    st.text(st.characters(categories=["Mn", "Me", "So", "Cc", "Cf", "Zs"]), max_size=40),
)
valid_request_ids = st.one_of(st.just(""), st.uuids().map(lambda u: u.hex), st.just("fuzz-req"))
request_ids = st.one_of(
    st.sampled_from(["r" * 128, "r" * 129, "é" * 64, "é" * 65, "a\x00", "\n", "r" * 100_000]),
    st.text(max_size=200),
)
# uint32 on the wire; negative values are sent as raw varints by test_garbage_bytes.
uint32s = st.one_of(
    st.integers(0, 2**32 - 1), st.integers(0, 1100),
    st.sampled_from([0, 1, 2, 3, 99, 100, 101, 1023, 1024, 1025, 4096, 10**6,
                     2**31 - 1, 2**31, 2**32 - 1]),
)
valid_thresholds = st.floats(-1, 1, width=32)
thresholds = st.one_of(
    hostile_float,
    st.sampled_from([-1.0000001, 1.0000001, 1.00000001, -1.00000001, 2.0, -2.0]),
)


def valid_embeddings(dimension: int) -> st.SearchStrategy[list[float]]:
    return st.one_of(
        st.sampled_from([enrolled(s, dimension) for s in SUBJECTS]),  # genuine 1:1 attempts
        st.lists(sane_float, min_size=dimension, max_size=dimension),
    )


embeddings = st.one_of(
    st.sampled_from([enrolled(s, d) for s in SUBJECTS for d in FIXED.values()]),  # other dimension
    st.integers(0, 17).flatmap(lambda n: st.lists(hostile_float, min_size=n, max_size=n)),
    st.lists(st.floats(-1e-30, 1e-30), min_size=8, max_size=16),  # tiny: no direction
    st.lists(hostile_float, max_size=300),
    st.builds(lambda n, v: [v] * n, st.integers(0, 5000), hostile_float | sane_float),
)


@st.composite
def create_requests(draw: st.DrawFn) -> pb.CreateCollectionRequest:
    return pb.CreateCollectionRequest(
        collection_id=draw(either(st.text(ID_CHARS, max_size=70).map(PREFIX.__add__),
                                  collection_ids | ours)),
        dimension=draw(either(st.integers(2, 1024), uint32s)),
        threshold=draw(either(valid_thresholds, thresholds)))


@st.composite
def enroll_requests(draw: st.DrawFn) -> pb.EnrollRequest:
    cid = draw(either(ours, collection_ids))
    return pb.EnrollRequest(
        collection_id=cid, subject_id=draw(either(valid_subjects, subject_ids)),
        embedding=draw(either(valid_embeddings(FIXED.get(cid, 16)), embeddings)),
        request_id=draw(either(valid_request_ids, request_ids)))


@st.composite
def match_requests(draw: st.DrawFn) -> pb.MatchRequest:
    cid = draw(either(ours, collection_ids))
    one_to_one = draw(st.booleans())
    return pb.MatchRequest(
        collection_id=cid,
        subject_id=draw(either(valid_subjects, subject_ids)) if one_to_one else "",
        embedding=draw(either(valid_embeddings(FIXED.get(cid, 16)), embeddings)),
        top_k=draw(either(st.integers(0, 1) if one_to_one else st.integers(0, 10), uint32s)),
        release_scores=draw(st.booleans()),
        purpose=draw(either(st.text(max_size=128).filter(str.isprintable), st.text(max_size=200))))


@st.composite
def delete_requests(draw: st.DrawFn) -> pb.DeleteSubjectRequest:
    return pb.DeleteSubjectRequest(collection_id=draw(either(ours, collection_ids)),
                                   subject_id=draw(either(valid_subjects, subject_ids)))


# -- the tests -----------------------------------------------------------------------------

@SETTINGS
@given(request=create_requests())
def test_create_collection(fuzz: Fuzzer, request: pb.CreateCollectionRequest) -> None:
    if fuzz.would_write_elsewhere("CreateCollection", request.SerializeToString()):
        if request.collection_id.startswith(PREFIX) and FIGURES.created < CREATE_BUDGET:
            FIGURES.created += 1
        else:
            request.collection_id = MAIN
    fuzz.send("CreateCollection", request)


@SETTINGS
@given(cid=either(ours, collection_ids))
def test_get_collection(fuzz: Fuzzer, cid: str) -> None:
    code, _, response = fuzz.send("GetCollection", pb.GetCollectionRequest(collection_id=cid))
    if code == Code.OK and cid in FIXED:
        assert pb.Collection.FromString(response).dimension == FIXED[cid]


@SETTINGS
@given(request=enroll_requests())
def test_enroll(fuzz: Fuzzer, request: pb.EnrollRequest) -> None:
    if fuzz.would_write_elsewhere("Enroll", request.SerializeToString()):
        reject()
    fuzz.send("Enroll", request)


@SETTINGS
@given(request=match_requests())
def test_match(fuzz: Fuzzer, request: pb.MatchRequest) -> None:
    if fuzz.would_write_elsewhere("Match", request.SerializeToString()):
        reject()  # a 1:1 miss counts towards another test's subject lockout
    code, _, response = fuzz.send("Match", request)
    if code == Code.OK:
        answer = pb.MatchResponse.FromString(response)
        assert len(answer.candidates) <= (1 if request.subject_id else max(request.top_k, 1))
        assert all(-1.001 <= c.score <= 1.001 for c in answer.candidates)
        assert answer.matched == bool(answer.candidates)


@SETTINGS
@given(request=delete_requests())
def test_delete_subject(fuzz: Fuzzer, request: pb.DeleteSubjectRequest) -> None:
    if fuzz.would_write_elsewhere("DeleteSubject", request.SerializeToString()):
        reject()
    fuzz.send("DeleteSubject", request)


@st.composite
def import_items(draw: st.DrawFn, cid: str) -> pb.ImportItem:
    return pb.ImportItem(subject_id=draw(either(valid_subjects, subject_ids)),
                         embedding=draw(either(valid_embeddings(FIXED.get(cid, 16)), embeddings)),
                         request_id=draw(either(valid_request_ids, request_ids)))


@st.composite
def import_streams(draw: st.DrawFn) -> list[pb.ImportTemplatesRequest]:
    cid = draw(either(ours, collection_ids))
    messages = []
    for k in range(draw(st.integers(1, 3))):
        named = cid if k == 0 or draw(st.booleans()) else draw(either(st.just(""), collection_ids))
        messages.append(pb.ImportTemplatesRequest(
            collection_id=named, items=draw(st.lists(import_items(cid), max_size=5))))
    return messages


@SETTINGS
@given(messages=import_streams())
def test_import_templates(fuzz: Fuzzer, messages: list[pb.ImportTemplatesRequest]) -> None:
    first = messages[0].collection_id
    if first not in FIXED and collection_id_ok(first) and fuzz.dimension_of(first) is not None:
        reject()  # another test's collection
    fuzz.send_import(messages)


job_ids = st.one_of(
    st.sampled_from(["", "0" * 32, "f" * 32, "F" * 32, "0" * 31, "0" * 33, "g" * 32,
                     "0" * 32 + "\n", " " + "0" * 31, "../" + "0" * 29]),
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.text(max_size=80),
)


@SETTINGS
@given(cid=either(ours | st.just(""), collection_ids))
def test_list_key_versions(fuzz: Fuzzer, cid: str) -> None:
    code, _, response = fuzz.send("ListKeyVersions", pb.ListKeyVersionsRequest(collection_id=cid))
    if code == Code.OK:
        answer = pb.KeyVersions.FromString(response)
        assert answer.current_master_key_version in answer.master_key_versions
        if cid in FIXED:
            assert (answer.key_version, answer.min_key_version, list(answer.key_versions)) == (1, 1, [1])


@SETTINGS
@given(job_id=job_ids)
def test_get_key_job(fuzz: Fuzzer, job_id: str) -> None:
    fuzz.send("GetKeyJob", pb.GetKeyJobRequest(job_id=job_id))


@SETTINGS
@given(cid=either(ours, collection_ids), version=either(st.just(1), uint32s))
def test_set_min_key_version(fuzz: Fuzzer, cid: str, version: int) -> None:
    request = pb.SetMinKeyVersionRequest(collection_id=cid, min_key_version=version)
    if fuzz.would_write_elsewhere("SetMinKeyVersion", request.SerializeToString()):
        reject()
    fuzz.send("SetMinKeyVersion", request)


@settings(SETTINGS, max_examples=scaled(30, 300))
@given(cid=collection_ids)
def test_rotate_collection_key_of_what_does_not_exist(fuzz: Fuzzer, cid: str) -> None:
    request = pb.RotateCollectionKeyRequest(collection_id=cid)
    if fuzz.would_write_elsewhere("RotateCollectionKey", request.SerializeToString()):
        reject()
    fuzz.send("RotateCollectionKey", request)


def test_rewrap_with_nothing_to_rewrap_changes_nothing(fuzz: Fuzzer) -> None:
    code, _, response = fuzz.send("RewrapKeys", pb.RewrapKeysRequest())
    assert code == Code.OK
    answer = pb.MasterKeyRotation.FromString(response)
    assert answer.rewrapped == 0 and not answer.destroyed_versions


# float32 values that fit under the limit beside a short id (5 bytes of key and length).
NEAR_LIMIT = (MAX_MESSAGE_BYTES - 128) // 4


@settings(SETTINGS, max_examples=scaled(20, 300))
@given(method=st.sampled_from(["Enroll", "Match"]), cid=st.sampled_from(list(FIXED)),
       count=st.one_of(st.integers(17, NEAR_LIMIT), st.integers(NEAR_LIMIT - 64, NEAR_LIMIT + 64),
                       st.integers(NEAR_LIMIT + 1, 2 * NEAR_LIMIT)),
       pattern=st.lists(hostile_float | sane_float, min_size=1, max_size=8),
       huge_id=st.one_of(st.none(), st.integers(257, 100_000),
                         st.integers(MAX_MESSAGE_BYTES - 256, MAX_MESSAGE_BYTES + 256),
                         st.integers(MAX_MESSAGE_BYTES, 2 * MAX_MESSAGE_BYTES)))
def test_huge_messages(fuzz: Fuzzer, method: str, cid: str, count: int, pattern: list[float],
                       huge_id: int | None) -> None:
    """Embeddings far longer than the dimension (and ids far longer than allowed), up to and
    just over 1 MiB: INVALID_ARGUMENT below the limit, RESOURCE_EXHAUSTED above it."""
    subject = "s" * huge_id if huge_id is not None else SUBJECTS[0]
    if huge_id is not None:
        count = min(count, 64)
    head = REQUEST[method](collection_id=cid, subject_id=subject).SerializeToString()
    number = REQUEST[method].DESCRIPTOR.fields_by_name["embedding"].number
    fuzz.send(method, head + packed_floats(number, count, pattern))  # concatenation = merge


def valid_request(method: str, cid: str) -> bytes:
    """A request of ``method`` that the server accepts (or answers ALREADY_EXISTS/NOT_FOUND)."""
    return {
        "CreateCollection": lambda: pb.CreateCollectionRequest(collection_id=cid, dimension=16,
                                                               threshold=0.5),
        "GetCollection": lambda: pb.GetCollectionRequest(collection_id=cid),
        "Enroll": lambda: pb.EnrollRequest(collection_id=cid, subject_id=SUBJECTS[0],
                                           embedding=enrolled(SUBJECTS[0], FIXED[cid])),
        "Match": lambda: pb.MatchRequest(collection_id=cid, embedding=enrolled(SUBJECTS[1], FIXED[cid])),
        "DeleteSubject": lambda: pb.DeleteSubjectRequest(collection_id=cid, subject_id="nobody"),
        "ListKeyVersions": lambda: pb.ListKeyVersionsRequest(collection_id=cid),
        "GetKeyJob": lambda: pb.GetKeyJobRequest(job_id="0" * 32),
        "SetMinKeyVersion": lambda: pb.SetMinKeyVersionRequest(collection_id=cid, min_key_version=1),
        "RewrapKeys": lambda: pb.RewrapKeysRequest(),
        "RotateCollectionKey": lambda: pb.RotateCollectionKeyRequest(collection_id=f"{PREFIX}nope"),
    }[method]().SerializeToString()


def garbled(valid: bytes, data: st.DataObject) -> bytes:
    """A valid request with bytes flipped, cut, or inserted."""
    raw = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and pos < len(raw):
            raw[pos] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[pos:]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


# Fields the generated classes would never write: any field number and wire type, negative
# varints (int64 on the wire) in uint32 fields such as dimension and top_k, strings that are
# not UTF-8 or encode lone surrogates, groups and the reserved wire types 6 and 7.
wire_fields = st.lists(st.tuples(
    st.sampled_from([1, 2, 3, 4, 5, 6, 15, 16, 1000, 2**29 - 1]),
    st.one_of(
        st.tuples(st.just(0), st.integers(-2**63, 2**64 - 1).map(varint)),
        st.tuples(st.just(0), st.integers(-2**31, -1).map(varint)),
        st.tuples(st.just(1), st.binary(min_size=8, max_size=8)),
        st.tuples(st.just(2), st.one_of(
            st.binary(max_size=64),
            st.text(st.characters() | st.characters(categories=["Cs"]), max_size=20)
              .map(lambda s: s.encode("utf-8", "surrogatepass")),
            st.sampled_from([b"\xed\xa0\x80", b"a\xffb", b"\xc0\x80", b"\xf4\x90\x80\x80"]))),
        st.tuples(st.just(5), st.binary(min_size=4, max_size=4)),
        st.tuples(st.sampled_from([3, 4, 6, 7]), st.binary(max_size=4)),
    )), max_size=6)


@SETTINGS
@given(method=st.sampled_from(list(REQUEST)), data=st.data())
def test_garbage_bytes(fuzz: Fuzzer, method: str, data: st.DataObject) -> None:
    """Bytes that are not, or only just, a request: undecodable ones get INVALID_ARGUMENT
    ("request is not a valid ..."), decodable ones whatever the model says."""
    kind = data.draw(st.sampled_from(["random", "garbled", "wire", "valid+wire"]))
    if kind == "random":
        payload = data.draw(st.binary(max_size=512))
    elif kind == "garbled":
        payload = garbled(valid_request(method, data.draw(ours)), data)
    else:
        # Appended fields override (scalars) or extend (repeated) those of a valid request.
        base = valid_request(method, data.draw(ours)) if kind == "valid+wire" else b""
        payload = base + b"".join(wire_field(n, wt, body) for n, (wt, body) in data.draw(wire_fields))
    if fuzz.would_write_elsewhere(method, payload):
        reject()
    code, _, _ = fuzz.send(method, payload)
    try:
        REQUEST[method].FromString(payload)
    except DecodeError:
        assert code == Code.INVALID_ARGUMENT


@settings(SETTINGS, max_examples=scaled(50, 500))
@given(target=st.sampled_from([("CreateCollection", "dimension"), ("Match", "top_k")]),
       value=st.one_of(st.integers(-2**63, -1), st.integers(-2**32 - 1100, -2**32),
                       st.sampled_from([-1, -2, -100, -101, -1024, -2**31, -2**32 + 16])),
       cid=ours)
def test_negative_numbers_on_the_wire(fuzz: Fuzzer, target: tuple[str, str], value: int,
                                      cid: str) -> None:
    """A negative dimension or top_k (an int64 varint where a uint32 is expected) reads as
    its low 32 bits; the server must judge that value like any other."""
    method, name = target
    number = REQUEST[method].DESCRIPTOR.fields_by_name[name].number
    fuzz.send(method, valid_request(method, cid) + wire_field(number, 0, varint(value)))


def test_undecodable_request_names_its_type(fuzz: Fuzzer) -> None:
    for method, request in REQUEST.items():
        code, details, _ = fuzz.send(method, b"\xff\xff\xff\xff garbage")
        assert (code, details) == (Code.INVALID_ARGUMENT,
                                   f"request is not a valid {request.DESCRIPTOR.full_name}")
