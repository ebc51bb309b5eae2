"""1:N identification at scale: encrypted over gRPC, next to plaintext FAISS, same run.

Builds a synthetic clustered gallery (5 samples per identity, same-person cosine ~0.7),
imports it through ``ImportTemplates`` into a fresh ``vault serve`` on 127.0.0.1, then
measures over gRPC: Identify (p50, p95, top-1 recall against exhaustive plaintext cosine
on the same vectors), Verify (1:1, genuine claims), single Enroll, the bulk import rate,
bytes at rest per template and the server's peak RSS. In the same run, the same queries
in plaintext: FAISS exact search (IndexFlatIP) and a plaintext twin of the vault's
pre-filter (the same balanced clustering of the same import chunks, the same number of
blocks scored). Prints a table, writes JSON, and a PNG of latency against N from every
result in the output folder.

    .venv/bin/python bench/identify_scale.py --n 10000 --dim 128 --json bench/results/x.json
    .venv/bin/python bench/identify_scale.py --n 1000000 --dim 512 --workdir /big/disk
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from common import (TRUSTED_ENV, arguments, clustered, dir_bytes, machine,  # isort: skip
                    peak_rss_mb, sample_of, save_figure, stats, timed)
from vault import logs
from vault.gallery import Routing
from vault.gallery.prefilter import balanced_clusters, sketch
from vault.ops.imports import MAX_CHUNK_BLOCKS
from vault.progress import Progress, progress
from vault.service import Tuning
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

log = logs.get("bench.identify_scale")
SLOTS = 4096  # templates per block
PER_IDENTITY = 5


def _batches(x: np.ndarray, owner: np.ndarray, batch: int):  # type: ignore[no-untyped-def]
    for start in range(0, len(x), batch):
        msg = pb.ImportTemplatesRequest(collection_id="bench")
        for i in range(start, min(start + batch, len(x))):
            msg.items.add(subject_id=f"id{owner[i]}", embedding=x[i], request_id=f"r{i}")
        yield msg


def _import(stub, x: np.ndarray, owner: np.ndarray) -> float:  # type: ignore[no-untyped-def]
    batch = max(16, (900 * 1024) // (x.shape[1] * 5 + 40))  # stay under the 1 MiB limit
    done = 0
    t = time.perf_counter()
    bar = Progress(len(x), "import")
    for response in stub.ImportTemplates(_batches(x, owner, batch), timeout=24 * 3600):
        bad = [r for r in response.results if r.code != 0]
        if bad:
            raise RuntimeError(f"import refused {len(bad)} items: {bad[0].message}")
        bar.advance(len(response.results))
        done += len(response.results)
    if done != len(x):
        raise RuntimeError(f"import answered {done} of {len(x)} items")
    return time.perf_counter() - t


CONCURRENCY = (1, 4, 16)


def _breakdown(data: Path) -> dict:
    """Bytes at rest by kind: block files, the database (and its WAL, by table), the rest."""
    import sqlite3

    out = {"block_files": dir_bytes(data / "blocks") if (data / "blocks").exists() else 0}
    for p in data.iterdir():
        if p.is_file():
            out[p.name] = p.stat().st_size
    try:
        db = sqlite3.connect(f"file:{data / 'vault.db'}?mode=ro", uri=True)
        out["vault.db_by_table"] = dict(db.execute(
            "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall())
        db.close()
    except sqlite3.Error as exc:  # dbstat is not compiled into every SQLite
        out["vault.db_by_table"] = str(exc)
    return out


def _throughput(stub, probes: np.ndarray, levels: tuple[int, ...]) -> dict:  # type: ignore[no-untyped-def]
    """Identify QPS and latency with ``c`` concurrent clients (threads on one channel),
    every probe once per level."""
    from concurrent.futures import ThreadPoolExecutor

    out = {}
    for clients in levels:
        def one(p: np.ndarray) -> float:
            dt, _ = timed(stub.Match, pb.MatchRequest(collection_id="bench", embedding=p, top_k=1),
                          timeout=600)
            return dt
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            times = list(pool.map(one, probes))
        wall = time.perf_counter() - t
        st = stats(times)
        out[str(clients)] = {"qps": len(probes) / wall, "p50_ms": st["p50_ms"],
                             "p99_ms": float(np.percentile(np.array(times) * 1e3, 99))}
    return out


def plaintext_twin(unit: np.ndarray, probes: np.ndarray, dim: int, tuning: Tuning) -> dict:
    """The same queries in plaintext: exact FAISS, and the vault's pre-filter replayed."""
    flat = faiss.IndexFlatIP(dim)
    flat.add(unit)
    exact_top, flat_times = [], []
    for p in probes:
        dt, (_, idx) = timed(flat.search, p[None, :], 1)
        flat_times.append(dt)
        exact_top.append(int(idx[0, 0]))
    # The server chunks the import stream and clusters each chunk into full blocks; what is
    # left over is scored for every probe (journal pages, then mixed blocks).
    chunk = SLOTS * min(MAX_CHUNK_BLOCKS, max(1, tuning.import_chunk_bytes // (8 * dim * SLOTS)))
    members, always = [], []
    for start in range(0, len(unit), chunk):
        groups, leftover = balanced_clusters(unit[start:start + chunk].astype(np.float64), SLOTS)
        members += [g + start for g in groups]
        always.append(leftover + start)
    always_idx = np.concatenate(always) if always else np.empty(0, np.int64)
    sketches = faiss.IndexFlatIP(dim)
    if members:
        sketches.add(np.stack([sketch(unit[m]) for m in members]))
    block_index = []
    for m in members:
        ix = faiss.IndexFlatIP(dim)
        ix.add(unit[m])
        block_index.append(ix)
    rest = faiss.IndexFlatIP(dim)
    if always_idx.size:
        rest.add(unit[always_idx])
    count = tuning.routing.count(len(members))
    pre_top, pre_times = [], []
    for p in probes:
        t = time.perf_counter()
        best, best_i = -2.0, -1
        if members:
            _, routed = sketches.search(p[None, :], count)
            for b in routed[0]:
                d, i = block_index[b].search(p[None, :], 1)
                if d[0, 0] > best:
                    best, best_i = float(d[0, 0]), int(members[b][i[0, 0]])
        if always_idx.size:
            d, i = rest.search(p[None, :], 1)
            if d[0, 0] > best:
                best, best_i = float(d[0, 0]), int(always_idx[i[0, 0]])
        pre_times.append(time.perf_counter() - t)
        pre_top.append(best_i)
    return {"exact_top": np.array(exact_top), "prefilter_top": np.array(pre_top),
            "flat": stats(flat_times), "prefilter": stats(pre_times),
            "blocks": len(members), "blocks_scored": count, "always_scored": int(always_idx.size)}


def run(n: int, dim: int, queries: int, verifies: int, enrolls: int, workdir: Path | None,
        tuning: Tuning) -> dict:
    rng = np.random.default_rng(2026)
    x, owner = clustered(n, dim, PER_IDENTITY, rng)
    pick = rng.choice(n, size=queries, replace=False)
    probes = sample_of(x[pick], rng)  # fresh samples of enrolled identities
    probe_owner = owner[pick]
    result: dict = {"n": n, "dim": dim, "queries": queries, "machine": machine(),
                    "server": {"route_fraction": tuning.routing.fraction,
                               "route_min_blocks": tuning.routing.min_blocks}}
    env = {**TRUSTED_ENV,
           "VAULT_ROUTE_FRACTION": str(tuning.routing.fraction),
           "VAULT_ROUTE_MIN_BLOCKS": str(tuning.routing.min_blocks)}
    with tempfile.TemporaryDirectory(prefix="vault-scale-", dir=workdir) as tmp:
        server = ServerProcess(Path(tmp) / "data", log_path=Path(tmp) / "server.log", env=env)
        with server, server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            # Threshold -1: every probe gets its best candidate (rank-1 accuracy).
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="bench", dimension=dim,
                                                             threshold=-1.0))
            seconds = _import(stub, x, owner)
            result["bulk_enroll_per_s"] = n / seconds
            result["bytes_per_template"] = dir_bytes(Path(tmp) / "data") / n
            result["bytes_at_rest"] = _breakdown(Path(tmp) / "data")
            for p in probes[:5]:  # warm-up: compiled kernels, caches
                stub.Match(pb.MatchRequest(collection_id="bench", embedding=p, top_k=1))
            identify, got = [], []
            for p in progress(probes, queries, "identify"):
                dt, r = timed(stub.Match, pb.MatchRequest(collection_id="bench", embedding=p,
                                                          top_k=1), timeout=600)
                identify.append(dt)
                got.append(int(r.candidates[0].subject_id[2:]) if r.candidates else -1)
            verify = []
            for k in progress(range(verifies), verifies, "verify"):
                q = k % queries
                dt, _ = timed(stub.Match, pb.MatchRequest(
                    collection_id="bench", subject_id=f"id{probe_owner[q]}", embedding=probes[q]))
                verify.append(dt)
            fresh, _ = clustered(enrolls, dim, 1, np.random.default_rng(7))
            enroll = []
            for k in progress(range(enrolls), enrolls, "enroll"):
                dt, _ = timed(stub.Enroll, pb.EnrollRequest(collection_id="bench", subject_id=f"new{k}",
                                                            embedding=fresh[k], request_id=f"e{k}"))
                enroll.append(dt)
            result["throughput"] = _throughput(stub, probes, CONCURRENCY)
            result["peak_rss_mb"] = peak_rss_mb(server.proc.pid)
        # Restart: from `vault serve` to SERVING on the same data directory (block files
        # read and their digests checked, rows MACed, live sets recomputed), then a match.
        t = time.perf_counter()
        server.start(timeout=3600)
        result["restart_s"] = time.perf_counter() - t
        try:
            with server.channel() as channel:
                stub = vault_pb2_grpc.TemplateVaultStub(channel)
                dt, r = timed(stub.Match, pb.MatchRequest(collection_id="bench", embedding=probes[0],
                                                          top_k=1), timeout=600)
                result["first_match_after_restart_ms"] = dt * 1e3
                result["first_match_after_restart_ok"] = bool(r.candidates)
        finally:
            server.stop()
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    punit = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    del x
    plain = plaintext_twin(unit, punit, dim, tuning)
    exact_owner = owner[plain["exact_top"]]
    ident = stats(identify)
    result.update({
        "identify_p50_ms": ident["p50_ms"], "identify_p95_ms": ident["p95_ms"],
        "recall_at_1": float(np.mean(np.array(got) == exact_owner)),
        "plaintext_flat_p50_ms": plain["flat"]["p50_ms"],
        "plaintext_prefilter_p50_ms": plain["prefilter"]["p50_ms"],
        "plaintext_prefilter_recall_at_1": float(np.mean(owner[plain["prefilter_top"]] == exact_owner)),
        "verify_p50_ms": stats(verify)["p50_ms"], "verify_p95_ms": stats(verify)["p95_ms"],
        "enroll_p50_ms": stats(enroll)["p50_ms"], "enroll_p95_ms": stats(enroll)["p95_ms"],
        "blocks": plain["blocks"], "blocks_scored": plain["blocks_scored"],
        "always_scored_templates": plain["always_scored"],
        "exact_top1_is_own_identity": float(np.mean(exact_owner == probe_owner)),
    })
    result["ratio_identify_to_flat"] = result["identify_p50_ms"] / result["plaintext_flat_p50_ms"]
    result["ratio_identify_to_prefilter"] = (result["identify_p50_ms"]
                                             / result["plaintext_prefilter_p50_ms"])
    result["us_per_template"] = result["identify_p50_ms"] * 1e3 / n
    return result


def table(r: dict) -> str:
    rows = [
        ("Identify p50 / p95", f"{r['identify_p50_ms']:.1f} / {r['identify_p95_ms']:.1f} ms"),
        ("top-1 recall vs exhaustive plaintext", f"{r['recall_at_1']:.4f}"),
        ("plaintext FAISS flat p50", (f"{r['plaintext_flat_p50_ms']:.2f} ms "
                                     f"(encrypted {r['ratio_identify_to_flat']:.0f}x)")),
        ("plaintext, same pre-filter p50", (f"{r['plaintext_prefilter_p50_ms']:.2f} ms "
                                           f"(encrypted {r['ratio_identify_to_prefilter']:.0f}x; "
                                           f"recall {r['plaintext_prefilter_recall_at_1']:.4f})")),
        ("blocks scored per 1:N", (f"{r['blocks_scored']} of {r['blocks']} clustered "
                                  f"+ {r['always_scored_templates']} unclustered templates")),
        ("Verify p50", f"{r['verify_p50_ms']:.1f} ms"),
        ("single Enroll p50", f"{r['enroll_p50_ms']:.1f} ms"),
        ("bulk import", f"{r['bulk_enroll_per_s']:.0f} templates/s"),
        ("bytes at rest per template", f"{r['bytes_per_template'] / 1024:.2f} KiB"),
        ("server peak RSS", f"{r['peak_rss_mb']:.0f} MiB"),
        ("restart to SERVING", f"{r['restart_s']:.1f} s"),
    ] + [(f"Identify, {c} concurrent clients",
          f"{t['qps']:.1f} QPS, p50 {t['p50_ms']:.0f} ms, p99 {t['p99_ms']:.0f} ms")
         for c, t in r["throughput"].items()]
    width = max(len(a) for a, _ in rows)
    head = f"N = {r['n']:,}, dim = {r['dim']}, {r['queries']} queries"
    return "\n".join([head] + [f"  {a:<{width}}  {b}" for a, b in rows])


def plot(folder: Path, path: Path) -> None:
    """Latency against N, for every identify_scale result in ``folder``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [json.loads(p.read_text()) for p in sorted(folder.glob("identify_scale_*.json"))]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for dim in sorted({r["dim"] for r in found}):
        rs = sorted((r for r in found if r["dim"] == dim), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        line, = ax.plot(ns, [r["identify_p50_ms"] for r in rs], "o-",
                        label=f"encrypted Identify p50, gRPC, {dim}-d")
        ax.plot(ns, [r["plaintext_prefilter_p50_ms"] for r in rs], "s:", color=line.get_color(),
                label=f"plaintext, same pre-filter, {dim}-d")
        ax.plot(ns, [r["plaintext_flat_p50_ms"] for r in rs], "^--", color=line.get_color(),
                alpha=0.6, label=f"plaintext FAISS flat, {dim}-d")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("templates in the gallery (N)")
    ax.set_ylabel("latency per query (ms)")
    ax.set_title("1:N identification: encrypted vault vs plaintext, same machine, same run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--verifies", type=int, default=200)
    parser.add_argument("--enrolls", type=int, default=200)
    parser.add_argument("--route-fraction", type=float, default=Routing().fraction)
    parser.add_argument("--route-min-blocks", type=int, default=Routing().min_blocks)
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default bench/out/identify_scale_n<N>_d<D>.json)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the server's data directory goes (needs N x 3 KiB at 128-d, "
                             "N x 12 KiB at 512-d)")
    args = parser.parse_args()
    logs.configure()
    tuning = Tuning(routing=Routing(args.route_fraction, args.route_min_blocks))
    result = run(args.n, args.dim, args.queries, args.verifies, args.enrolls, args.workdir, tuning)
    out = args.json or Path("bench/out") / f"identify_scale_n{args.n}_d{args.dim}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(out.parent, out.parent / "identify_scale.png")
    print(table(result))
    print(f"wrote {out} and {out.parent / 'identify_scale.png'}")


if __name__ == "__main__":
    main()
