"""1:1 latency of two code trees on one data directory, interleaved (a noisy machine).

Imports N synthetic clustered templates (5 samples per identity, as identify_scale.py)
through ``ImportTemplates`` into a server of the ``--after`` tree, then serves the same
data directory in turn from each tree, ``--reps`` times, and times genuine 1:1 claims
over gRPC: the medians of each tree's p50s, their ratio and the load average.

    .venv/bin/python bench/verify_ab.py --before /tmp/old-tree --n 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from common import TRUSTED_ENV, clustered, machine, sample_of, stats, timed  # isort: skip
from vault import logs
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

HERE = str(Path(__file__).resolve().parents[1])


def run(n: int, dim: int, reps: int, verifies: int, trees: dict[str, str]) -> dict:
    rng = np.random.default_rng(2026)
    x, owner = clustered(n, dim, 5, rng)
    pick = rng.choice(n, size=200, replace=False)
    probes = sample_of(x[pick], rng)
    tmp = Path(tempfile.mkdtemp(prefix="vault-ab-"))

    def server(tree: str) -> ServerProcess:
        return ServerProcess(tmp / "data", log_path=tmp / f"{tree}.log",
                             env={**TRUSTED_ENV, "PYTHONPATH": trees[tree]})

    def claim(stub, q: int):  # type: ignore[no-untyped-def]
        return timed(stub.Match, pb.MatchRequest(collection_id="ab", subject_id=f"id{owner[pick[q]]}",
                                                 embedding=probes[q]))

    result: dict = {"n": n, "dim": dim, "reps": reps, "verifies": verifies, "machine": machine(),
                    "trees": trees, "p50_ms": {t: [] for t in trees}, "load": []}
    try:
        with server("after") as s, s.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="ab", dimension=dim,
                                                             threshold=-1.0))

            def batches():  # type: ignore[no-untyped-def]
                for start in range(0, n, 300):
                    msg = pb.ImportTemplatesRequest(collection_id="ab")
                    for i in range(start, min(n, start + 300)):
                        msg.items.add(subject_id=f"id{owner[i]}", embedding=x[i], request_id=f"r{i}")
                    yield msg

            for _ in stub.ImportTemplates(batches(), timeout=24 * 3600):
                pass
        for _ in range(reps):
            for tree in trees:
                with server(tree) as s, s.channel() as channel:
                    stub = vault_pb2_grpc.TemplateVaultStub(channel)
                    for q in range(10):  # warm-up: compiled kernels, caches
                        claim(stub, q)
                    seconds = []
                    for k in range(verifies):
                        dt, r = claim(stub, k % len(pick))
                        if not r.matched:
                            raise RuntimeError("a genuine claim did not match")
                        seconds.append(dt)
                    result["p50_ms"][tree].append(stats(seconds)["p50_ms"])
                    result["load"].append(os.getloadavg()[0])
                    print(f"{tree}: verify p50 {result['p50_ms'][tree][-1]:.2f} ms, "
                          f"load {result['load'][-1]:.1f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["median_p50_ms"] = {t: float(np.median(v)) for t, v in result["p50_ms"].items()}
    result["ratio_after_to_before"] = (result["median_p50_ms"]["after"]
                                       / result["median_p50_ms"]["before"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the other code tree (a checkout)")
    parser.add_argument("--after", default=HERE, help="this tree by default")
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--verifies", type=int, default=150)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logs.configure()
    result = run(args.n, args.dim, args.reps, args.verifies,
                 {"before": str(Path(args.before).resolve()), "after": str(Path(args.after).resolve())})
    print(json.dumps({k: result[k] for k in ("median_p50_ms", "ratio_after_to_before")}))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
