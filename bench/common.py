"""Shared by the benchmarks: synthetic faces, progress, statistics, the machine."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# The server env of a trusted benchmark caller (the analyst role: without TLS every caller
# has every role): latency and accuracy are measured, not abuse limits, so no lock-out
# after failed 1:1 matches, no match budgets and no probing guard.
TRUSTED_ENV = {"VAULT_MAX_FAILED_VERIFICATIONS": "0", "VAULT_VERIFY_BUDGET": "0",
               "VAULT_IDENTIFY_BUDGET": "0", "VAULT_SCORE_BUDGET": "0", "VAULT_PROBE_CLUSTER": "0"}


def clustered(n: int, dim: int, per_identity: int, rng: np.random.Generator,
              spread: float = 0.65) -> tuple[np.ndarray, np.ndarray]:
    """``n`` vectors (float32), ``per_identity`` samples around each identity centre.

    A sample is centre + spread * N(0, I/dim): two samples of one identity have cosine
    about 1 / (1 + spread^2), 0.70 for the default.
    """
    ids = np.arange(n) // per_identity
    centres = rng.standard_normal((ids.max() + 1, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 65536):  # in pieces: a million 512-d samples at once is 4 GB
        part = ids[start:start + 65536]
        noise = rng.standard_normal((len(part), dim)).astype(np.float32) / np.sqrt(dim)
        out[start:start + len(part)] = centres[part] + spread * noise
    return out, ids


def sample_of(centre_rows: np.ndarray, rng: np.random.Generator, spread: float = 0.65) -> np.ndarray:
    """A fresh sample of the identities whose (unnormalised) samples are given."""
    dim = centre_rows.shape[1]
    return (centre_rows + spread * rng.standard_normal(centre_rows.shape).astype(np.float32)
            / np.sqrt(dim)).astype(np.float32)


def stats(seconds: list[float]) -> dict[str, float]:
    a = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": len(seconds)}


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t, out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of a live process's resident memory (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "")
    mem = next((int(line.split()[1]) // 1024 for line in
                Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    versions = {}
    for name in ("numpy", "tenseal", "numba", "faiss", "grpc"):
        try:
            versions[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_mb": mem, "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions,
            "note": "shared development machine: read medians and ratios"}


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser, its module docstring as the help text."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def save_figure(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Lay out, write as a PNG and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
