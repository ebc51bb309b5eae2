"""The cost of the decider's process boundary: each call in process (``Keeper``) and across
the Unix socket (``ProcessDecider``, what `vault serve` runs), on the same real SoftHSM
token and real ciphertexts. Read medians: machines here are shared and noisy.

    .venv/bin/python bench/decider_ipc.py [--repeat 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vault import he
from vault.decider import Decider, ScoreCiphertext
from vault.decider.keeper import Keeper
from vault.decider.process import ProcessDecider
from vault.domain.records import CollectionRow
from vault.keys import softhsm
from vault.keys.hsm import Hsm
from vault.keys.integrity import Integrity

DIM = 128


def _p50(fn: Callable[[], object], repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def _parts(public: he.PublicContext, count: int) -> list[ScoreCiphertext]:
    ct = public.ciphertext_from_ntt(public.encrypt_zero())[:, :1]
    pos = np.arange(public.n, dtype=np.int64)
    return [ScoreCiphertext(np.ascontiguousarray(ct), False, pos,
                            np.zeros(public.n, np.int32), pos, 1, i) for i in range(count)]


def measure(decider: Decider, hsm: Hsm, repeat: int) -> dict[str, float]:
    decider.init_pii(None)
    public = he.PublicContext(decider.create_key("bench", 1, he.DEFAULT_PARAMS)[0],
                              he.DEFAULT_PARAMS)
    row = CollectionRow("bench", DIM, 0.9, 1, 1, b"")
    row = dataclasses.replace(row, mac=Integrity(hsm).mac(*row.mac_fields()))
    x = np.ones(DIM) / np.sqrt(DIM)
    sealed = decider.seal_subjects("bench", [(b"h" * 32, "someone")])
    out = {"transform (1 probe)": _p50(lambda: decider.transform("bench", 1, DIM, x), repeat),
           "open_subjects (1 id)": _p50(lambda: decider.open_subjects(
               "bench", [(b"h" * 32, sealed[0])]), repeat)}
    for count in (1, 16, 64):
        parts = _parts(public, count)
        out[f"decide ({count} score ciphertexts)"] = _p50(
            lambda parts=parts: decider.decide(row, parts, 10), max(10, repeat // count))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vault-ipc-") as tmp:
        config = softhsm.provision(Path(tmp) / "hsm", "vault")
        hsm = Hsm(config)
        hsm.ensure_keys()
        local = measure(Keeper(hsm), hsm, args.repeat)
        child = ProcessDecider(config, workers=1)
        try:
            remote = measure(child, hsm, args.repeat)
        finally:
            child.close()
        hsm.close()
    print(f"{'call':34} {'in process p50':>15} {'child p50':>10} {'IPC':>9}")
    for name, ms in local.items():
        print(f"{name:34} {ms:12.3f} ms {remote[name]:7.3f} ms {remote[name] - ms:6.3f} ms")


if __name__ == "__main__":
    main()
