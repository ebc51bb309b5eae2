"""Enroll, 1:1 and 1:N latency over gRPC, next to the same operations in plaintext numpy.

Starts a real `vault serve` on 127.0.0.1 with a fresh data directory, enrolls N synthetic
clustered templates (several samples per identity), then measures. Machines here are
shared and noisy: read medians and the encrypted/plaintext ratios.

    .venv/bin/python bench/match_latency.py              # N = 1,000
    .venv/bin/python bench/match_latency.py --large      # N = 10,000
    .venv/bin/python bench/match_latency.py --n 5000 --dim 512 --out bench/out
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common import TRUSTED_ENV, clustered, dir_bytes, machine, stats, timed  # isort: skip
from vault import logs
from vault.progress import progress
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

log = logs.get("bench.match_latency")

SETTLE_PASS = 1.0  # seconds between the server's maintenance passes


def run(n: int, dim: int, queries: int, out: Path) -> dict:
    rng = np.random.default_rng(1)
    x, ids = clustered(n + queries, dim, per_identity=4, rng=rng)
    gallery_x, gallery_ids = x[:n], ids[:n]
    probe_idx = rng.choice(n, size=queries, replace=False)
    probes = x[probe_idx] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim)

    results: dict = {"n": n, "dim": dim, "queries": queries, "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="vault-bench-") as tmp:
        # Latency, not abuse limits, is measured; maintenance passes every second and a
        # journal quiet for a second is checkpointed, so that the matches run on a settled
        # gallery: otherwise they measure how many pages the last pass happened to leave.
        server = ServerProcess(Path(tmp) / "data", log_path=Path(tmp) / "server.log",
                               env={**TRUSTED_ENV, "VAULT_MAINTENANCE_INTERVAL": str(SETTLE_PASS),
                                    "VAULT_JOURNAL_QUIET": str(SETTLE_PASS)})
        with server, server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            # Threshold -1: every 1:N probe gets its best candidate (top-1 hits).
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="bench", dimension=dim,
                                                             threshold=-1.0))
            enroll = []
            for i in progress(range(n), n, "enroll"):
                req = pb.EnrollRequest(collection_id="bench", subject_id=f"id-{gallery_ids[i]}",
                                       embedding=gallery_x[i].tolist(), request_id=f"r{i}")
                enroll.append(timed(stub.Enroll, req)[0])
            time.sleep(4 * SETTLE_PASS)  # one pass sees the journal, one a pass later moves it
            verify, identify, hits = [], [], 0
            for q in progress(range(queries), queries, "match"):
                claimed = f"id-{gallery_ids[probe_idx[q]]}"
                verify.append(timed(stub.Match, pb.MatchRequest(
                    collection_id="bench", subject_id=claimed, embedding=probes[q].tolist()))[0])
                t = time.perf_counter()
                r = stub.Match(pb.MatchRequest(collection_id="bench", embedding=probes[q].tolist(),
                                               top_k=1))
                identify.append(time.perf_counter() - t)
                hits += bool(r.candidates) and r.candidates[0].subject_id == claimed
            results["data_dir_bytes"] = dir_bytes(Path(tmp) / "data")
    results["encrypted"] = {"enroll": stats(enroll), "verify": stats(verify),
                            "identify": stats(identify), "identify_top1_hits": hits}

    # Plaintext baseline, same data, same run: normalise + append, dot, matrix-vector top-1.
    plain_enroll, plain_verify, plain_identify = [], [], []
    gallery = np.empty((n, dim), dtype=np.float32)
    for i in range(n):
        t = time.perf_counter()
        v = gallery_x[i] / np.linalg.norm(gallery_x[i])
        gallery[i] = v
        plain_enroll.append(time.perf_counter() - t)
    by_subject = {s: np.flatnonzero(gallery_ids == s) for s in np.unique(gallery_ids)}
    for q in range(queries):
        p = probes[q] / np.linalg.norm(probes[q])
        rows = by_subject[gallery_ids[probe_idx[q]]]
        plain_verify.append(timed(lambda rows=rows, p=p: float((gallery[rows] @ p).max()))[0])
        plain_identify.append(timed(lambda p=p: int(np.argmax(gallery @ p)))[0])
    results["plaintext"] = {"enroll": stats(plain_enroll), "verify": stats(plain_verify),
                            "identify": stats(plain_identify)}
    results["bytes_per_template"] = results["data_dir_bytes"] / n
    results["ratio_p50"] = {op: results["encrypted"][op]["p50_ms"] / max(results["plaintext"][op]["p50_ms"], 1e-6)
                            for op in ("enroll", "verify", "identify")}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"match_latency_n{n}_d{dim}.json"
    path.write_text(json.dumps(results, indent=2))
    _plot(results, out / f"match_latency_n{n}_d{dim}.png")
    _table(results)
    print(f"wrote {path}")
    return results


def _table(r: dict) -> None:
    print(f"\nN = {r['n']}, dim = {r['dim']}, {r['queries']} queries, "
          f"{r['bytes_per_template'] / 1024:.1f} KiB on disk per template")
    print(f"{'operation':<10} {'encrypted p50':>14} {'p95':>10} {'plaintext p50':>14} {'ratio':>9}")
    for op in ("enroll", "verify", "identify"):
        e, p = r["encrypted"][op], r["plaintext"][op]
        print(f"{op:<10} {e['p50_ms']:>11.2f} ms {e['p95_ms']:>7.2f} ms {p['p50_ms'] * 1e3:>11.1f} us "
              f"{r['ratio_p50'][op]:>8.0f}x")
    print(f"1:N top-1 hits: {r['encrypted']['identify_top1_hits']}/{r['queries']}")


def _plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = ["enroll", "verify", "identify"]
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = np.arange(len(ops))
    ax.bar(xs - 0.2, [r["encrypted"][o]["p50_ms"] for o in ops], 0.4, label="encrypted (gRPC), p50")
    ax.bar(xs + 0.2, [r["plaintext"][o]["p50_ms"] for o in ops], 0.4, label="plaintext numpy, p50")
    ax.set_yscale("log")
    ax.set_xticks(xs, ops)
    ax.set_ylabel("latency (ms, log scale)")
    ax.set_title(f"Template vault, N = {r['n']}, dim = {r['dim']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--large", action="store_true", help="N = 10,000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    args = parser.parse_args()
    logs.configure()
    run(10_000 if args.large else args.n, args.dim, args.queries, args.out)


if __name__ == "__main__":
    main()
