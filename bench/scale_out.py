"""1:N over Ray shards against the in-process gallery: the same data, the same run.

Builds a synthetic clustered gallery (5 samples per identity) in a fresh data directory
(in-process import), then times 1:N identification (``Vault.identify``, the RPC's body)
on the in-process gallery and on 1, 2 and 4 Ray shards of one local Ray (token
authentication, 127.0.0.1), every block scored (``--route-fraction 1``, so the figures are
scan bandwidth) unless told otherwise. Checks that every configuration names the same
subjects. Prints a table, writes JSON and a PNG.

    .venv/bin/python bench/scale_out.py --n 100000 --dim 512
    .venv/bin/python bench/scale_out.py --n 1000000 --dim 512 --workdir /big/disk  # ~20 GiB RAM
    .venv/bin/python bench/scale_out.py --store postgresql://...  # blocks sent from the database

On one machine the shards share its cores: the ratio to in-process is the fan-out
overhead, not a speed-up; docs/SCALING.md turns the per-shard figures into a model.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from common import clustered, machine, sample_of, stats  # isort: skip
from vault import logs
from vault.gallery import Routing
from vault.gallery import shards as shard_ops
from vault.he.poly import residue_dtype
from vault.keys import softhsm
from vault.ops.imports import ImportItem
from vault.service import Tuning, Vault

SLOTS = 4096
PER_IDENTITY = 5


def _build(data: Path, hsm, x: np.ndarray, owner: np.ndarray,  # type: ignore[no-untyped-def]
           store: str | None = None) -> float:
    v = Vault.open(data, hsm, store_url=store, tuning=Tuning(maintenance_interval=0))
    try:
        v.create_collection("bench", x.shape[1], 0.5)
        t = time.perf_counter()
        session = v.start_import("bench")
        for start in range(0, len(x), 20000):
            session.add([ImportItem(f"id{owner[i]}", x[i].tolist())
                         for i in range(start, min(start + 20000, len(x)))])
        session.finish()
        return time.perf_counter() - t
    finally:
        v.close()


def _measure(v: Vault, probes: np.ndarray, warm: int = 5) -> tuple[dict, list[frozenset[str]]]:
    named, times = [], []
    for k, p in enumerate(probes):
        t = time.perf_counter()
        result = v.identify("bench", p.tolist(), top_k=5)
        if k >= warm:
            times.append(time.perf_counter() - t)
        named.append(frozenset(c.subject_id for c in result.candidates))
    return stats(times), named


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=60)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--route-fraction", type=float, default=1.0)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a ROOT an earlier run of the same --n and --dim built (skip the import)")
    ap.add_argument("--store", default=None, help="an empty PostgreSQL database's URL "
                    "(default: SQLite in the data directory)")
    args = ap.parse_args()
    logs.configure()
    rng = np.random.default_rng(1)
    x, owner = clustered(args.n, args.dim, PER_IDENTITY, rng)
    firsts = rng.choice(args.n // PER_IDENTITY, args.queries, replace=False) * PER_IDENTITY
    probes = sample_of(x[firsts], rng)
    root = args.reuse or Path(tempfile.mkdtemp(prefix="scale-out-", dir=args.workdir))
    hsm = softhsm.provision(root / "hsm", token_label="bench")
    data = root / "data"
    built = root / f"built-n{args.n}-d{args.dim}"
    if args.reuse is None or not built.exists():
        built.write_text(str(_build(data, hsm, x, owner, args.store)))
    import_s = float(built.read_text())
    print(f"gallery in {root}")
    del x
    routing = Routing(args.route_fraction, 1)
    figures: dict = {"n": args.n, "dim": args.dim, "queries": args.queries,
                     "route_fraction": args.route_fraction, "machine": machine(),
                     "import_s": import_s, "store": "postgresql" if args.store else "sqlite",
                     "runs": {}}
    v = Vault.open(data, hsm, store_url=args.store,
                   tuning=Tuning(maintenance_interval=0, routing=routing))
    blocks = len(v.galleries()[0].blocks)
    residue_bytes = residue_dtype(v.galleries()[0].ctx.moduli[0]).itemsize
    try:
        base, expected = _measure(v, probes)
        figures["decrypt_ms_per_block"] = _decrypt_ms(v, probes[0])
    finally:
        v.close()
    figures["blocks"] = blocks
    figures["runs"]["in-process"] = base
    # Bytes a full scan reads: the score prime's residues, 2 x D per template.
    scan_bytes = blocks * SLOTS * args.dim * 2 * residue_bytes
    figures["scan_bytes"] = scan_bytes
    shard_ops.connect("local")  # one Ray for every run (the pools below do not own it)
    try:
        for count in [int(c) for c in args.shards.split(",")]:
            settings = shard_ops.RaySettings("local", per_node=count, cpus=0.01, timeout=120)
            t = time.perf_counter()
            v = Vault.open(data, hsm, store_url=args.store,
                           tuning=Tuning(maintenance_interval=0, routing=routing, ray=settings))
            placed = time.perf_counter() - t
            try:
                run, named = _measure(v, probes)
                rss = _shard_rss(v)
            finally:
                v.close()
            run.update(open_s=placed, same_subjects=named == expected,
                       ratio_to_in_process=run["p50_ms"] / base["p50_ms"],
                       fan_out_overhead_ms=run["p50_ms"] - base["p50_ms"],
                       per_shard_gb_s=scan_bytes / count / (run["p50_ms"] / 1e3) / 1e9,
                       shard_rss_mb=rss)
            figures["runs"][f"{count} shards"] = run
    finally:
        import ray

        ray.shutdown()
    figures["load_average"] = [round(x, 1) for x in os.getloadavg()]  # others' work too
    _report(figures, args.out)


def _decrypt_ms(v: Vault, probe: np.ndarray, rounds: int = 5) -> float:
    """The decider's cost per score ciphertext (one per block scored), in the vault."""
    gallery = v.galleries()[0]
    row = v.store.collection("bench")
    assert row is not None
    scaled = probe / np.linalg.norm(probe)
    parts = gallery.score_all(scaled)
    t = time.perf_counter()
    for _ in range(rounds):
        v.decider.decide(row, parts, 1, threshold=2.0)  # nothing passes: no id opened
    return (time.perf_counter() - t) / rounds / len(parts) * 1e3


def _shard_rss(v: Vault) -> list[float]:
    out = []
    for s in v.shards.status():
        try:
            text = Path(f"/proc/{s['pid']}/status").read_text()
        except (OSError, TypeError):
            continue
        out += [int(line.split()[1]) / 1024 for line in text.splitlines() if line.startswith("VmRSS:")]
    return out


def _report(figures: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = f"scale_out_n{figures['n']}_d{figures['dim']}"
    if figures.get("store") == "postgresql":
        name += "_postgresql"
    (out / f"{name}.json").write_text(json.dumps(figures, indent=1))
    print(f"\n1:N over {figures['n']:,} x {figures['dim']} ({figures['blocks']} blocks, "
          f"route fraction {figures['route_fraction']}, store {figures.get('store')}), "
          f"{os.cpu_count()} cores")
    print(f"decider: {figures['decrypt_ms_per_block']:.2f} ms per score ciphertext; load "
          f"average {figures['load_average']}")
    print("| gallery | p50 (ms) | p95 (ms) | ratio to in-process | per-shard scan (GB/s) | "
          "open (s) | same subjects |")
    print("|---|---|---|---|---|---|---|")
    for label, run in figures["runs"].items():
        ratio = run.get("ratio_to_in_process", 1.0)
        bw = run.get("per_shard_gb_s", figures["scan_bytes"] / (run["p50_ms"] / 1e3) / 1e9)
        print(f"| {label} | {run['p50_ms']:.1f} | {run['p95_ms']:.1f} | {ratio:.2f}x | "
              f"{bw:.2f} | {run.get('open_s', float('nan')):.1f} | "
              f"{run.get('same_subjects', True)} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = list(figures["runs"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(labels, [figures["runs"][k]["p50_ms"] for k in labels], label="p50")
    ax.scatter(labels, [figures["runs"][k]["p95_ms"] for k in labels], color="k", label="p95", zorder=3)
    ax.set_ylabel("1:N latency (ms)")
    ax.set_title(f"{figures['n']:,} x {figures['dim']}, every block scored, {os.cpu_count()} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)


if __name__ == "__main__":
    main()
