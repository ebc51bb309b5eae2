"""The 1:1 block kernel against the full one, in process (no gRPC): one 512-d block of
4,096 templates at a time, 24 different blocks (not cached), interleaved; medians.

    .venv/bin/python bench/kernel_1to1.py
"""
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vault.gallery import _SCORERS, blocks  # noqa: E402
from vault.he import poly  # noqa: E402

q = 4294828033
rng = np.random.default_rng(0)
nb, d, n = 24, 512, 4096
bl = [blocks.Block(i, 1, 1, n, 1, rng.integers(0, q, (d, 2, n), dtype=np.uint32), b"",
                   np.zeros(n, np.int32)) for i in range(nb)]
probe = rng.standard_normal(d)
probe /= np.linalg.norm(probe)
digits = poly.probe_digits(probe, 10, 6)
slots = np.array([17, 900], np.int64)
variants = {"full": lambda b: blocks.score(b, digits, q),  # a 1:1 before
            "c1_only": lambda b: blocks.score_at(b, digits, q, slots, 1),  # one thread
            "c1_2x1": lambda b: blocks.score_at(b, digits, q, slots, 2, _SCORERS.submit, 1),
            "c1_4x1": lambda b: blocks.score_at(b, digits, q, slots, 4, _SCORERS.submit, 1)}
for f in variants.values():
    f(bl[0])  # compile
t = {k: [] for k in variants}
for rep in range(20):
    for k, f in variants.items():
        for b in bl[rep % 3::3][:4]:
            s = time.perf_counter()
            f(b)
            t[k].append(time.perf_counter() - s)
print("load average", os.getloadavg())
for k, v in t.items():
    print(f"{k:10s} median {np.median(v) * 1e3:.2f} ms  min {min(v) * 1e3:.2f} ms")
