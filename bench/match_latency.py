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
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vault import logs  # noqa: E402
from vault.testing import ServerProcess  # noqa: E402
from vault.v1 import vault_pb2 as pb  # noqa: E402
from vault.v1 import vault_pb2_grpc  # noqa: E402

log = logs.get("bench.match_latency")


def clustered(n: int, dim: int, per_identity: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors, ``per_identity`` samples around each identity centre (cosine ~0.7)."""
    ids = np.arange(n) // per_identity
    centres = rng.standard_normal((ids.max() + 1, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((n, dim)) / np.sqrt(dim)
    x = centres[ids] + 0.65 * noise
    return x.astype(np.float32), ids


def _progress(iterable, total: int, desc: str):
    """A bar on a terminal, structured log lines every 10% otherwise."""
    if sys.stderr.isatty():
        yield from tqdm(iterable, total=total, desc=desc)
        return
    step = max(1, total // 10)
    for i, item in enumerate(iterable, 1):
        yield item
        if i % step == 0 or i == total:
            log.info("progress", kind=desc, count=i, status=f"{i}/{total}")


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
            "n": len(samples)}


def _timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def run(n: int, dim: int, queries: int, out: Path) -> dict:
    rng = np.random.default_rng(1)
    x, ids = clustered(n + queries, dim, per_identity=4, rng=rng)
    gallery_x, gallery_ids = x[:n], ids[:n]
    probe_idx = rng.choice(n, size=queries, replace=False)
    probes = x[probe_idx] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32) / np.sqrt(dim)

    results: dict = {"n": n, "dim": dim, "queries": queries, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory(prefix="vault-bench-") as tmp:
        # Latency, not abuse limits, is measured: no lock-out after failed 1:1 matches.
        server = ServerProcess(Path(tmp) / "data", log_path=Path(tmp) / "server.log",
                               env={"VAULT_MAX_FAILED_VERIFICATIONS": "0"})
        with server, server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="bench", dimension=dim,
                                                             threshold=0.5))
            enroll = []
            for i in _progress(range(n), n, "enroll"):
                req = pb.EnrollRequest(collection_id="bench", subject_id=f"id-{gallery_ids[i]}",
                                       embedding=gallery_x[i].tolist(), request_id=f"r{i}")
                enroll.append(_timed(stub.Enroll, req, None))
            verify, identify, hits = [], [], 0
            for q in _progress(range(queries), queries, "match"):
                claimed = f"id-{gallery_ids[probe_idx[q]]}"
                verify.append(_timed(stub.Match, pb.MatchRequest(
                    collection_id="bench", subject_id=claimed, embedding=probes[q].tolist())))
                t = time.perf_counter()
                r = stub.Match(pb.MatchRequest(collection_id="bench", embedding=probes[q].tolist(),
                                               top_k=1, threshold=-1.0))
                identify.append(time.perf_counter() - t)
                hits += bool(r.candidates) and r.candidates[0].subject_id == claimed
            results["data_dir_bytes"] = sum(p.stat().st_size for p in (Path(tmp) / "data").rglob("*")
                                            if p.is_file())
    results["encrypted"] = {"enroll": _stats(enroll), "verify": _stats(verify),
                            "identify": _stats(identify), "identify_top1_hits": hits}

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
        plain_verify.append(_timed(lambda: float((gallery[rows] @ p).max())))
        plain_identify.append(_timed(lambda: int(np.argmax(gallery @ p))))
    results["plaintext"] = {"enroll": _stats(plain_enroll), "verify": _stats(plain_verify),
                            "identify": _stats(plain_identify)}
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
