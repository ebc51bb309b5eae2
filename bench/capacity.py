"""Capacity: the largest gallery this machine serves, measured by filling it.

Starts a fresh ``vault serve`` on 127.0.0.1 (its default memory reserve, as shipped) and
imports synthetic clustered templates (5 samples per identity, as identify_scale.py) in
steps of ``--step`` through ``ImportTemplates``, generated step by step so that the
client holds one step at a time. After each step: the server's and the decider's
resident memory, the machine's available memory, and Identify / Verify p50 over fresh
samples of identities of every step so far (top-1 = own identity counted). The run ends
when the vault refuses an import (RESOURCE_EXHAUSTED: its memory reserve) or ``--max``
is reached; then the vault is restarted on the same data directory (time to SERVING)
and matched again. Prints a table, writes JSON and a PNG.

    .venv/bin/python bench/capacity.py --dim 512 --workdir /big/disk \\
        --json bench/results/capacity_d512.json
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from common import (TRUSTED_ENV, arguments, clustered, machine, sample_of, save_figure,  # isort: skip
                    stats, timed)
from vault import logs
from vault.memory import available_bytes
from vault.progress import Progress
from vault.testing import ServerProcess
from vault.v1 import vault_pb2 as pb
from vault.v1 import vault_pb2_grpc

log = logs.get("bench.capacity")
PER_IDENTITY = 5
PROBES_PER_STEP = 8


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the decider, encryption workers)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_children(k)]
    return out


def _step_data(step: int, size: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """One step's samples and owners (identity numbers unique across steps)."""
    x, owner = clustered(size, dim, PER_IDENTITY, np.random.default_rng(1000 + step))
    return x, owner + step * (size // PER_IDENTITY + 1)


def _import(stub, x: np.ndarray, owner: np.ndarray, first: int, bar: Progress) -> str:  # type: ignore[no-untyped-def]
    """Import one step; '' when all was stored, else the refusal's status and message."""
    batch = max(16, (900 * 1024) // (x.shape[1] * 5 + 40))  # under the 1 MiB message limit

    def batches():  # type: ignore[no-untyped-def]
        for start in range(0, len(x), batch):
            msg = pb.ImportTemplatesRequest(collection_id="cap")
            for i in range(start, min(start + batch, len(x))):
                msg.items.add(subject_id=f"id{owner[i]}", embedding=x[i], request_id=f"r{first + i}")
            yield msg

    try:
        for response in stub.ImportTemplates(batches(), timeout=24 * 3600):
            bad = [r for r in response.results if r.code != 0]
            if bad:
                raise RuntimeError(f"import refused {len(bad)} items: {bad[0].message}")
            bar.advance(len(response.results))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return f"{exc.code().name}: {exc.details()}"
    return ""


def _matches(stub, probes: list[tuple[int, np.ndarray]]) -> dict:  # type: ignore[no-untyped-def]
    identify, verify, right = [], [], 0
    for owner, p in probes:
        dt, r = timed(stub.Match, pb.MatchRequest(collection_id="cap", embedding=p, top_k=1),
                      timeout=600)
        identify.append(dt)
        right += bool(r.candidates) and r.candidates[0].subject_id == f"id{owner}"
        dt, r = timed(stub.Match, pb.MatchRequest(collection_id="cap", subject_id=f"id{owner}",
                                                  embedding=p))
        verify.append(dt)
    return {"identify_p50_ms": stats(identify)["p50_ms"], "verify_p50_ms": stats(verify)["p50_ms"],
            "top1_own_identity": right / len(probes), "probes": len(probes)}


def run(dim: int, step: int, most: int, workdir: Path | None) -> dict:
    result: dict = {"dim": dim, "step": step, "machine": machine(), "steps": []}
    probes: list[tuple[int, np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="vault-capacity-", dir=workdir) as tmp:
        server = ServerProcess(Path(tmp) / "data", log_path=Path(tmp) / "server.log",
                               env=dict(TRUSTED_ENV))
        with server, server.channel() as channel:
            stub = vault_pb2_grpc.TemplateVaultStub(channel)
            stub.CreateCollection(pb.CreateCollectionRequest(collection_id="cap", dimension=dim,
                                                             threshold=-1.0))
            assert server.proc is not None
            bar = Progress(most, "import")
            stored, k, refusal = 0, 0, ""
            while stored < most and not refusal:
                x, owner = _step_data(k, min(step, most - stored), dim)
                rng = np.random.default_rng(k)
                pick = rng.choice(len(x), size=PROBES_PER_STEP, replace=False)
                probes += list(zip(owner[pick].tolist(), sample_of(x[pick], rng)))
                t = time.perf_counter()
                refusal = _import(stub, x, owner, stored, bar)
                seconds = time.perf_counter() - t
                del x
                count = stub.GetCollection(pb.GetCollectionRequest(collection_id="cap")).template_count
                if refusal:  # the probes of a step not stored in full may name nobody
                    probes = probes[:-PROBES_PER_STEP]
                free = available_bytes() or 0
                entry = {"templates": count, "import_per_s": (count - stored) / seconds,
                         "server_rss_mb": _rss_mb(server.proc.pid),
                         "available_mb": free / 2 ** 20, **_matches(stub, probes)}
                result["steps"].append(entry)
                log.info("capacity step", count=count, status=(
                    f"rss_mb={entry['server_rss_mb']:.0f} available_mb={entry['available_mb']:.0f} "
                    f"identify_ms={entry['identify_p50_ms']:.0f}"))
                stored, k = count, k + 1
            result["refusal"] = refusal
            result["largest_served"] = stored
        t = time.perf_counter()
        server.start(timeout=3600)
        result["restart_s"] = time.perf_counter() - t
        try:
            with server.channel() as channel:
                stub = vault_pb2_grpc.TemplateVaultStub(channel)
                result["after_restart"] = _matches(stub, probes)
                result["after_restart"]["server_rss_mb"] = _rss_mb(server.proc.pid) if server.proc else 0
        finally:
            server.stop()
    return result


def table(r: dict) -> str:
    lines = [f"capacity, dim = {r['dim']}, steps of {r['step']:,}",
             (f"  {'templates':>10}  {'import/s':>8}  {'RSS MiB':>8}  {'avail MiB':>9}  "
              f"{'identify':>8}  {'verify':>7}  top-1")]
    for s in r["steps"]:
        lines.append(f"  {s['templates']:>10,}  {s['import_per_s']:>8.0f}  {s['server_rss_mb']:>8.0f}  "
                     f"{s['available_mb']:>9.0f}  {s['identify_p50_ms']:>6.0f}ms  "
                     f"{s['verify_p50_ms']:>5.1f}ms  {s['top1_own_identity']:.3f}")
    a = r.get("after_restart", {})
    lines.append(f"  largest served: {r['largest_served']:,} ({r['refusal'] or 'no refusal: --max reached'})")
    lines.append(f"  restart to SERVING: {r['restart_s']:.1f} s; after it identify "
                 f"{a.get('identify_p50_ms', float('nan')):.0f} ms, top-1 {a.get('top1_own_identity', 0):.3f}")
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [s["templates"] / 1e6 for s in r["steps"]]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.plot(n, [s["server_rss_mb"] / 1024 for s in r["steps"]], "o-", label="vault RSS (GiB)")
    ax.plot(n, [s["available_mb"] / 1024 for s in r["steps"]], "s--", label="machine available (GiB)")
    ax.set_xlabel(f"templates stored (millions, {r['dim']}-d)")
    ax.set_ylabel("GiB")
    ax2 = ax.twinx()
    ax2.plot(n, [s["identify_p50_ms"] for s in r["steps"]], "^:", color="C3", label="Identify p50 (ms)")
    ax2.set_ylabel("Identify p50 (ms)")
    ax.set_title(f"capacity: filled until refused; largest served {r['largest_served']:,}")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="center left", bbox_to_anchor=(0.1, 0.55), fontsize=7)
    save_figure(fig, path)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--step", type=int, default=500_000)
    parser.add_argument("--max", type=int, default=50_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/out/capacity.json"))
    args = parser.parse_args()
    logs.configure()
    result = run(args.dim, args.step, args.max, args.workdir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.json.with_suffix(".png"))
    print(table(result))
    print(f"wrote {args.json} and {args.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
