"""What a block scan would cost if every block shared its c1 (one public polynomial per
dimension, a secret per block generation: not built, see bench/results/README.md): the
kernel over c0 alone, i.e. a block of D/2 dimensions (the same bytes), against the full
512-d block. In process, 16 blocks of each (not cached), interleaved; medians.

    .venv/bin/python bench/kernel_c0_only.py
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vault.gallery import blocks  # noqa: E402
from vault.he import poly  # noqa: E402

q = 4294828033
rng = np.random.default_rng(0)
n, d = 4096, 512


def _blocks(dim: int) -> list[blocks.Block]:
    return [blocks.Block(i, 1, 1, n, 1, rng.integers(0, q, (dim, 2, n), dtype=np.uint32), b"",
                         np.zeros(n, np.int32)) for i in range(16)]


full, half = _blocks(d), _blocks(d // 2)
probe = rng.standard_normal(d)
probe /= np.linalg.norm(probe)
digits = poly.probe_digits(probe, 10, 6)
variants = {"c0 and c1 (8 B a dimension)": (full, digits),
            "c0 only (4 B a dimension)": (half, np.ascontiguousarray(digits[:, :d // 2]))}
for bl, dig in variants.values():
    blocks.score(bl[0], dig, q)  # compile
times: dict[str, list[float]] = {k: [] for k in variants}
for rep in range(10):
    for k, (bl, dig) in variants.items():
        for b in bl[rep % 2::2][:4]:
            s = time.perf_counter()
            blocks.score(b, dig, q)
            times[k].append(time.perf_counter() - s)
print("load average", os.getloadavg())
for k, v in times.items():
    print(f"{k:28s} median {np.median(v) * 1e3:.2f} ms")
