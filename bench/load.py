"""Bounded load test: concurrent clients mixing enroll, 1:1 and 1:N against a real server.

Starts `vault serve` on 127.0.0.1 with a fresh data directory, pre-enrolls a small gallery
of real LFW face embeddings (dlib, 128-d), then runs ``--clients`` threads, each with its
own gRPC channel, in a closed loop until ``--duration`` seconds or ``--max-requests``
requests, whichever comes first. A small fraction of requests is deliberately bad (wrong
dimension, unknown subject) and must fail with its precise status: those are "provoked"
errors. An enrollment of a further image of an enrolled person that does not pass 1:1
against that person's templates is refused (PERMISSION_DENIED: the vault's false-reject
rate at the threshold) and counted apart; any other non-OK status is unexpected.

Afterwards it checks that no acknowledged enrollment was lost (template count, idempotent
retry of every acknowledged Enroll returning the same template id, 1:1 self-match of a
sample) and reports throughput, p50/p99 latency, errors by status, and the server's
resident memory (server plus its child processes) after warm-up and at the end.

    .venv/bin/python bench/load.py                      # 4 clients, 60 s or 12,000 requests
    .venv/bin/python bench/load.py --duration 120 --json /tmp/load.json --png /tmp/load.png
    .venv/bin/python bench/load.py --clients 8 --mix 0.1/0.6/0.3 --max-requests 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vault import logs
from vault.progress import Progress, progress
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

log = logs.get("bench.load")

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "lfw-dlib128.npz"
DIM = 128
THRESHOLD = float(np.float32(0.92))  # as tests/test_accuracy.py: ~0.1% false accepts on LFW
OPS = ("enroll", "verify", "identify")
OK = grpc.StatusCode.OK.name
REFUSED_FACE = grpc.StatusCode.PERMISSION_DENIED.name  # a further face that failed 1:1


@dataclass
class Sample:
    """One finished request: what it was, when it ended (s since load start), how it went."""

    op: str
    end_s: float
    latency_s: float
    code: str
    provoked: bool = False
    expected: str = OK  # the status a provoked request must get


@dataclass
class Ack:
    """An acknowledged enrollment: enough to retry it and to match it afterwards."""

    request_id: str
    subject_id: str
    template_id: str
    index: int  # row of the LFW embedding that was enrolled


@dataclass
class Shared:
    """State shared by the client threads; counters under ``lock``."""

    max_requests: int
    deadline: float
    warmup: int
    server_pid: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    issued: int = 0
    completed: int = 0
    rss_after_warmup: float | None = None
    warmup_at_s: float | None = None
    t0: float = 0.0
    stop_reason: str = ""

    def claim(self) -> bool:
        """One more request may be sent: both bounds are checked before sending, never after."""
        with self.lock:
            if self.issued >= self.max_requests:
                self.stop_reason = self.stop_reason or "max_requests"
                return False
            if time.monotonic() >= self.deadline:
                self.stop_reason = self.stop_reason or "duration"
                return False
            self.issued += 1
            return True

    def done(self) -> None:
        with self.lock:
            self.completed += 1
            reached = self.completed == self.warmup
        if reached:  # measured right when the warm-up count is reached, not at the next tick
            self.rss_after_warmup = rss_mb(self.server_pid)
            self.warmup_at_s = time.monotonic() - self.t0


# --- memory ---------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    """Direct children of ``pid``, from /proc (psutil is not a dependency)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # Fields after the command name, which is in parentheses and may hold spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (the server spawns a zero-pool process per collection)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MiB (VmRSS from /proc)."""
    total_kb = 0
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


# --- the load -------------------------------------------------------------------------------

class Faces:
    """LFW embeddings split into a pre-enrolled gallery and probes (never logged)."""

    def __init__(self, gallery: int, rng: np.random.Generator) -> None:
        with np.load(DATA) as f:
            self.emb = f["emb"].astype(np.float32)
            self.ids = f["ids"]
        people, counts = np.unique(self.ids, return_counts=True)
        multi = people[counts >= 2]  # people with a second image: genuine 1:1 probes exist
        chosen = rng.choice(multi, size=min(gallery, len(multi)), replace=False)
        rows = {int(p): np.flatnonzero(self.ids == p) for p in chosen}
        self.gallery = [(f"p{p}", int(r[0])) for p, r in rows.items()]  # (subject, enrolled row)
        self.genuine = {f"p{p}": r[1:].tolist() for p, r in rows.items()}

    @staticmethod
    def subject(person: int) -> str:
        return f"p{person}"

    def vec(self, row: int) -> list[float]:
        return self.emb[row].tolist()


class Client(threading.Thread):
    """One client: its own channel, a closed loop of requests drawn from the mix."""

    def __init__(self, n: int, target: str, collection: str, faces: Faces, shared: Shared,
                 mix: tuple[float, float, float], provoke: float, seed: int, run_id: str,
                 timeout: float) -> None:
        super().__init__(name=f"load-client-{n}", daemon=True)
        self.n, self.target, self.collection, self.faces = n, target, collection, faces
        self.shared, self.mix, self.provoke, self.timeout = shared, mix, provoke, timeout
        self.rng = random.Random(seed * 1000 + n)
        self.run_id = run_id
        self.samples: list[Sample] = []
        self.acks: list[Ack] = []
        self.unacked_enrolls = 0  # enrolls with an unexpected error: outcome unknown
        self.seq = 0

    def run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            while self.shared.claim():
                self._one(stub)
                self.shared.done()

    def _one(self, stub: vault_pb2_grpc.TemplateVaultStub) -> None:
        rng, faces, cid = self.rng, self.faces, self.collection
        if rng.random() < self.provoke:
            self._provoked(stub)
            return
        op = rng.choices(OPS, weights=self.mix)[0]
        ack = None
        if op == "enroll":
            row = rng.randrange(len(faces.emb))
            self.seq += 1
            ack = Ack(f"{self.run_id}-c{self.n}-{self.seq}", faces.subject(int(faces.ids[row])),
                      "", row)
            call, req = stub.Enroll, pb.EnrollRequest(
                collection_id=cid, subject_id=ack.subject_id, embedding=faces.vec(row),
                request_id=ack.request_id)
        elif op == "verify":
            subject, _ = rng.choice(faces.gallery)
            if rng.random() < 0.8:  # genuine claim: another image of the same person
                row = rng.choice(faces.genuine[subject])
            else:  # impostor claim (lock-out is disabled for this server, see run())
                row = rng.randrange(len(faces.emb))
            call, req = stub.Match, pb.MatchRequest(collection_id=cid, subject_id=subject,
                                                    embedding=faces.vec(row))
        else:
            row = rng.randrange(len(faces.emb))
            call, req = stub.Match, pb.MatchRequest(collection_id=cid, embedding=faces.vec(row),
                                                    top_k=5)
        code, response, latency = self._call(call, req)
        self.samples.append(Sample(op, time.monotonic() - self.shared.t0, latency, code))
        if op == "enroll":
            if code == OK:
                ack.template_id = response.template_id
                self.acks.append(ack)
            elif code != REFUSED_FACE:
                self.unacked_enrolls += 1

    def _provoked(self, stub: vault_pb2_grpc.TemplateVaultStub) -> None:
        """A request that must fail with a precise status and change nothing."""
        row = self.rng.randrange(len(self.faces.emb))
        if self.rng.random() < 0.5:
            op, expected = "enroll", grpc.StatusCode.INVALID_ARGUMENT.name
            call, req = stub.Enroll, pb.EnrollRequest(
                collection_id=self.collection, subject_id=f"bad-{self.n}",
                embedding=self.faces.vec(row)[:DIM - 1])  # one float short
        else:
            op, expected = "verify", grpc.StatusCode.NOT_FOUND.name
            call, req = stub.Match, pb.MatchRequest(
                collection_id=self.collection, subject_id=f"nobody-{self.run_id}",
                embedding=self.faces.vec(row))
        code, _, latency = self._call(call, req)
        self.samples.append(Sample(op, time.monotonic() - self.shared.t0, latency, code,
                                   provoked=True, expected=expected))

    def _call(self, call, req) -> tuple[str, object, float]:
        t = time.perf_counter()
        try:
            response, code = call(req, timeout=self.timeout), OK
        except grpc.RpcError as exc:
            response, code = None, exc.code().name
        except Exception as exc:  # noqa: BLE001 - a client-side failure is an error too
            response, code = None, f"CLIENT_{type(exc).__name__}"
        return code, response, time.perf_counter() - t


def _pre_enroll(stub: vault_pb2_grpc.TemplateVaultStub, collection: str, faces: Faces,
                workers: int, run_id: str, timeout: float, show: bool) -> list[Ack]:
    def one(item: tuple[str, int]) -> Ack:
        subject, row = item
        rid = f"{run_id}-pre-{subject}"
        r = stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id=subject,
                                         embedding=faces.vec(row), request_id=rid), timeout=timeout)
        return Ack(rid, subject, r.template_id, row)

    with ThreadPoolExecutor(workers) as pool:
        return list(progress(pool.map(one, faces.gallery), len(faces.gallery), "pre-enroll", quiet=not show))


def _monitor(shared: Shared, stop: threading.Event, duration: float,
             timeline: list[tuple[float, float, int]], show: bool) -> None:
    """Every 0.5 s: server memory and completed count (for the plot), and progress."""
    with Progress(shared.max_requests, "load", "req", quiet=not show) as shown:
        while not stop.wait(0.5):
            now = time.monotonic() - shared.t0
            timeline.append((now, rss_mb(shared.server_pid), shared.completed))
            shown.update(shared.completed, note=f"{now:.0f}/{duration:.0f} s")
        shown.update(shared.completed)


def _check_lost(stub: vault_pb2_grpc.TemplateVaultStub, collection: str, faces: Faces,
                acks: list[Ack], unacked: int, workers: int, verify_sample: int,
                rng: random.Random, timeout: float, show: bool) -> dict:
    """Every acknowledged enrollment must still be there: count, idempotent retry, self-match."""
    count = stub.GetCollection(pb.GetCollectionRequest(collection_id=collection),
                               timeout=timeout).template_count
    shortfall = max(0, len(acks) - count)
    # Above the acknowledged count only by enrolls whose answer was lost (outcome unknown).
    extra = count - len(acks)

    def retry(a: Ack) -> str | None:
        try:
            r = stub.Enroll(pb.EnrollRequest(collection_id=collection, subject_id=a.subject_id,
                                             embedding=faces.vec(a.index), request_id=a.request_id),
                            timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
        return None if r.template_id == a.template_id else "other template_id"

    def self_match(a: Ack) -> str | None:
        try:
            r = stub.Match(pb.MatchRequest(collection_id=collection, subject_id=a.subject_id,
                                           embedding=faces.vec(a.index)), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code().name
        return None if r.matched else "not matched"

    sample = acks if len(acks) <= verify_sample else rng.sample(acks, verify_sample)
    with ThreadPoolExecutor(workers) as pool:
        retried = list(progress(pool.map(retry, acks), len(acks), "retry", quiet=not show))
        matched = list(progress(pool.map(self_match, sample), len(sample), "self-match", quiet=not show))
    count_after = stub.GetCollection(pb.GetCollectionRequest(collection_id=collection),
                                     timeout=timeout).template_count
    bad_retry = {a.request_id for a, e in zip(acks, retried) if e}
    bad_match = {a.request_id for a, e in zip(sample, matched) if e}
    return {
        "acknowledged_enrollments": len(acks),
        "template_count": count,
        "template_count_shortfall": shortfall,
        "unacknowledged_enrolls": unacked,
        "unexplained_extra_templates": max(0, extra - unacked),
        "retried": len(acks),
        "retry_failures": dict(Counter(e for e in retried if e)),
        "retry_created_templates": count_after - count,
        "self_matched": len(sample),
        "self_match_failures": dict(Counter(e for e in matched if e)),
        "lost_enrollments": max(shortfall, len(bad_retry | bad_match)),
    }


def _op_stats(samples: list[Sample], duration: float) -> dict:
    lat = np.asarray([s.latency_s for s in samples]) * 1e3
    codes = Counter(s.code for s in samples)
    return {"count": len(samples),
            "ok": codes.get(OK, 0),
            "throughput_per_s": len(samples) / duration if duration else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p90_ms": float(np.percentile(lat, 90)) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
            "max_ms": float(lat.max()) if len(lat) else None,
            "errors": len(samples) - codes.get(OK, 0),
            "codes": dict(codes)}


def run(clients: int = 4, duration: float = 60.0, max_requests: int = 12_000,
        mix: tuple[float, float, float] = (0.2, 0.5, 0.3), seed: int = 1, gallery: int = 200,
        warmup: int = 1_000, provoke: float = 0.01, verify_sample: int = 200,
        data_dir: Path | None = None, timeout: float = 60.0, progress: bool = True) -> dict:
    """Run the bounded load test and return its figures (counts and timings only).

    ``mix`` gives the proportions of enroll, 1:1 and 1:N; ``provoke`` the fraction of
    deliberately bad requests; ``warmup`` the completed-request count at which the server's
    memory is first measured. Stops at ``duration`` seconds or ``max_requests`` requests,
    whichever comes first (a request in flight then finishes, within ``timeout``).
    """
    total = sum(mix)
    mix = tuple(m / total for m in mix)  # type: ignore[assignment]
    rng = np.random.default_rng(seed)
    faces = Faces(gallery, rng)
    run_id = secrets.token_hex(4)
    collection = f"load-{run_id}"
    wall0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vault-load-") as tmp:
        root = Path(data_dir) if data_dir else Path(tmp) / "data"
        # 1:1 impostor claims are part of the mix: without this the lock-out after 5 failed
        # verifications (tested in tests/test_attempts.py) would turn them into errors; and
        # the load's rate is the point, not the budgets (tests/test_probing.py).
        server = ServerProcess(root, log_path=Path(tmp) / "server.log",
                               env={"VAULT_MAX_FAILED_VERIFICATIONS": "0", "VAULT_VERIFY_BUDGET": "0",
                                    "VAULT_IDENTIFY_BUDGET": "0", "VAULT_PROBE_CLUSTER": "0"})
        with server, server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(
                collection_id=collection, dimension=DIM, threshold=THRESHOLD), timeout=timeout)
            t = time.monotonic()
            pre = _pre_enroll(stub, collection, faces, clients, run_id, timeout, progress)
            pre_enroll_s = time.monotonic() - t
            rss_start = rss_mb(server.proc.pid)

            shared = Shared(max_requests, 0.0, warmup, server.proc.pid)
            workers = [Client(n, server.target, collection, faces, shared, mix, provoke, seed,
                              run_id, timeout) for n in range(clients)]
            timeline: list[tuple[float, float, int]] = []
            stop = threading.Event()
            shared.t0 = time.monotonic()
            shared.deadline = shared.t0 + duration
            monitor = threading.Thread(target=_monitor, daemon=True,
                                       args=(shared, stop, duration, timeline, progress))
            monitor.start()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            load_s = time.monotonic() - shared.t0
            stop.set()
            monitor.join()
            rss_end = rss_mb(server.proc.pid)
            processes = len(process_tree(server.proc.pid))

            acks = pre + [a for w in workers for a in w.acks]
            unacked = sum(w.unacked_enrolls for w in workers)
            t = time.monotonic()
            lost = _check_lost(stub, collection, faces, acks, unacked, clients, verify_sample,
                               random.Random(seed), timeout, progress)
            check_s = time.monotonic() - t
        server_log = server.log_path.read_text(errors="replace")
    samples = [s for w in workers for s in w.samples]
    normal = [s for s in samples if not s.provoked]
    provoked = [s for s in samples if s.provoked]
    # A provoked request counts as expected only if it got exactly the status it must get.
    provoked_ok = sum(s.code == s.expected for s in provoked)
    refused = [s for s in normal if (s.op, s.code) == ("enroll", REFUSED_FACE)]
    unexpected = ([s for s in normal if s.code != OK and (s.op, s.code) != ("enroll", REFUSED_FACE)]
                  + [s for s in provoked if s.code != s.expected])
    warmup_reached = shared.rss_after_warmup is not None
    rss_warm = shared.rss_after_warmup if warmup_reached else rss_start
    # Least-squares slope of memory against completed requests after warm-up: a leak shows
    # as a steady trend, allocator noise (tens of MiB up and down) mostly does not.
    after = [(c, m) for _, m, c in timeline if c >= min(warmup, shared.completed)]
    trend = (float(np.polyfit([c for c, _ in after], [m for _, m in after], 1)[0]) * 1000
             if len({c for c, _ in after}) >= 2 else 0.0)
    result = {
        "clients": clients, "mix": dict(zip(OPS, mix)), "provoke_fraction": provoke,
        "seed": seed, "max_requests": max_requests, "duration_limit_s": duration,
        "stop_reason": shared.stop_reason or "duration",
        "gallery_subjects": len(pre), "pre_enroll_s": round(pre_enroll_s, 2),
        "duration_s": round(load_s, 2), "check_s": round(check_s, 2),
        "wall_s": round(time.monotonic() - wall0, 2),
        "requests": len(samples),
        "throughput_per_s": len(samples) / load_s,
        "ops": {op: _op_stats([s for s in normal if s.op == op], load_s) for op in OPS},
        "provoked": {"count": len(provoked), "expected_status": provoked_ok,
                     "codes": dict(Counter(f"{s.op}:{s.code}" for s in provoked))},
        "enroll_refused_faces": len(refused),
        "unexpected_errors": len(unexpected),
        "unexpected_codes": dict(Counter(f"{s.op}:{s.code}" for s in unexpected)),
        "provoked_errors": provoked_ok,
        **lost,
        "warmup_requests": warmup, "warmup_reached": warmup_reached,
        "warmup_at_s": round(shared.warmup_at_s, 2) if warmup_reached else None,
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_after_warmup": round(rss_warm, 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_growth_mb": round(rss_end - rss_warm, 1),
        "rss_trend_mb_per_1k_requests": round(trend, 3),
        "server_processes": processes,
        "server_log_errors": sum('"level": "error"' in line for line in server_log.splitlines()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "timeline": {"t_s": [round(t, 2) for t, _, _ in timeline],
                     "rss_mb": [round(r, 1) for _, r, _ in timeline],
                     "completed": [c for _, _, c in timeline]},
        "_ends": {op: [round(s.end_s, 3) for s in normal if s.op == op] for op in OPS},
    }
    return result


def table(r: dict) -> str:
    """The printed summary: one row per operation, then the checks."""
    lines = [(f"\n{r['clients']} clients, {r['requests']} requests in {r['duration_s']:.1f} s "
             f"(stopped by {r['stop_reason']}), gallery {r['gallery_subjects']} subjects"),
             f"{'op':<10} {'count':>7} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'errors':>7}"]
    for op in OPS:
        s = r["ops"][op]
        if s["count"]:
            lines.append(f"{op:<10} {s['count']:>7} {s['throughput_per_s']:>8.1f} "
                         f"{s['p50_ms']:>9.1f} {s['p99_ms']:>9.1f} {s['errors']:>7}")
        else:
            lines.append(f"{op:<10} {0:>7}")
    lines.append(f"{'provoked':<10} {r['provoked']['count']:>7} {'':>8} {'':>9} {'':>9} "
                 f"{r['provoked']['count'] - r['provoked']['expected_status']:>7}")
    lines.append(f"{'total':<10} {r['requests']:>7} {r['throughput_per_s']:>8.1f}")
    codes = f" {r['unexpected_codes']}" if r["unexpected_codes"] else ""
    lines.append(f"unexpected errors: {r['unexpected_errors']}{codes}; "
                 f"provoked errors (expected status): {r['provoked_errors']}")
    lines.append(f"lost enrollments: {r['lost_enrollments']} of {r['acknowledged_enrollments']} "
                 f"acknowledged (template count {r['template_count']}, retried {r['retried']}, "
                 f"self-matched {r['self_matched']})")
    lines.append(f"server RSS: {r['rss_mb_after_warmup']:.1f} MiB after "
                 f"{r['warmup_requests'] if r['warmup_reached'] else 0} requests, "
                 f"{r['rss_mb_end']:.1f} MiB at the end ({r['rss_growth_mb']:+.1f} MiB, trend "
                 f"{r['rss_trend_mb_per_1k_requests']:+.2f} MiB per 1,000 requests), "
                 f"{r['server_processes']} processes")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Throughput per operation and server memory over time; latency percentiles per op."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lat) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]})
    width = max(1.0, r["duration_s"] / 40)
    bins = np.append(np.arange(0, r["duration_s"], width), r["duration_s"])
    for op in OPS:
        ends = np.asarray(r["_ends"][op])
        if len(ends):
            counts, _ = np.histogram(ends, bins)
            rate = counts / np.diff(bins)  # the last bin may be shorter
            ax.step(bins, np.append(rate, rate[-1]), where="post", label=f"{op} (req/s)")
    ax.set_xlabel("time since load start (s)")
    ax.set_ylabel(f"completed requests / s ({width:.0f} s bins)")
    mem = ax.twinx()
    mem.plot(r["timeline"]["t_s"], r["timeline"]["rss_mb"], color="black", lw=1, ls="--",
             label="server RSS (MiB)")
    mem.set_ylabel("server RSS incl. children (MiB)")
    if r["warmup_at_s"] is not None:
        ax.axvline(r["warmup_at_s"], color="grey", lw=0.8, ls=":")
    handles = ax.get_legend_handles_labels()[0] + mem.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center",
              bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8)
    ax.set_title(f"{r['clients']} clients, {r['requests']} requests, {r['duration_s']:.0f} s")

    xs = np.arange(len(OPS))
    for p, w in (("p50_ms", -0.27), ("p90_ms", 0), ("p99_ms", 0.27)):
        lat.bar(xs + w, [r["ops"][o][p] or 0 for o in OPS], 0.27, label=p.split("_")[0])
    lat.set_yscale("log")
    lat.set_xticks(xs, OPS)
    lat.set_ylabel("latency (ms, log scale)")
    lat.set_title("latency under load")
    lat.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mix(text: str) -> tuple[float, float, float]:
    parts = [float(x) for x in text.replace(",", "/").split("/")]
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(
            "expected ENROLL/VERIFY/IDENTIFY proportions, e.g. 0.2/0.5/0.3")
    return parts[0], parts[1], parts[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="client threads, one channel each")
    parser.add_argument("--duration", type=float, default=60.0, help="time bound, seconds")
    parser.add_argument("--max-requests", type=int, default=12_000, help="count bound")
    parser.add_argument("--mix", type=_mix, default=(0.2, 0.5, 0.3),
                        help="enroll/verify/identify proportions (default 0.2/0.5/0.3)")
    parser.add_argument("--provoke", type=float, default=0.01,
                        help="fraction of deliberately bad requests (default 0.01)")
    parser.add_argument("--gallery", type=int, default=200,
                        help="subjects enrolled before the load")
    parser.add_argument("--warmup", type=int, default=1_000,
                        help="completed requests before the first memory reading")
    parser.add_argument("--verify-sample", type=int, default=200,
                        help="acknowledged enrollments 1:1-matched afterwards (all are retried)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="default: a temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--png", type=Path, default=None, help="write the plot here")
    args = parser.parse_args()
    logs.configure()
    r = run(clients=args.clients, duration=args.duration, max_requests=args.max_requests,
            mix=args.mix, seed=args.seed, gallery=args.gallery, warmup=args.warmup,
            provoke=args.provoke, verify_sample=args.verify_sample, data_dir=args.data_dir)
    print(table(r))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot(r, args.png)
        print(f"wrote {args.png}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: v for k, v in r.items() if not k.startswith("_")},
                                        indent=2))
        print(f"wrote {args.json}")
    sys.exit(1 if r["unexpected_errors"] or r["lost_enrollments"] else 0)


if __name__ == "__main__":
    main()
