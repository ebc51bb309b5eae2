"""What the cancellable transform keeps and gives away, on real LFW face embeddings.

Uses the vault's own protector, with transform seeds derived in a SoftHSM token made for
the run, for collection "a" at key versions 1 and 2 and collection "b" at version 1.

- Verification accuracy: equal error rate and false rejects at 0.1% false accepts, over
  every same-person pair and a sample of different-person pairs, for plaintext cosine,
  for protected templates (enrolled and probed under the collection's key), and for an
  impostor who holds the transform key ("stolen key": he protects his own face with it).
  A rotation keeps cosine exactly, so all three agree; the HE layer adds about 1e-6 to a
  score (tests/test_accuracy.py), far below what moves an error rate.
- Unlinkability (Gomez-Barrero et al., "General framework to evaluate unlinkability in
  biometric template protection systems", IEEE TIFS 2018): D_sys between templates of the
  same faces (mated) and of different faces (non-mated) under two key versions of a
  collection, and under two collections, with the linkage score the attacker has (cosine
  between the two protected templates). 0 means unlinkable; the floor is D_sys between
  two halves of the non-mated scores (what estimation noise alone gives). For contrast,
  D_sys without any transform, and with both keys stolen (they undo the transforms).
  D_sys depends on the pair of keys, so it is also measured over many pairs.

    .venv/bin/python bench/protection.py --json bench/results/protection.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from common import machine  # isort: skip

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "lfw-dlib128.npz"


def eer_and_frr(genuine: np.ndarray, impostor: np.ndarray, far: float = 1e-3) -> tuple[float, float, float]:
    """(equal error rate, false reject rate at ``far`` false accepts, that threshold)."""
    thresholds = np.unique(np.concatenate([genuine, impostor]))
    imp = np.sort(impostor)
    gen = np.sort(genuine)
    fars = 1.0 - np.searchsorted(imp, thresholds, side="left") / imp.size
    frrs = np.searchsorted(gen, thresholds, side="left") / gen.size
    i = int(np.argmin(np.abs(fars - frrs)))
    eer = float((fars[i] + frrs[i]) / 2)
    ok = np.flatnonzero(fars <= far)
    j = ok[0] if ok.size else len(thresholds) - 1
    return eer, float(frrs[j]), float(thresholds[j])


def dsys(mated: np.ndarray, nonmated: np.ndarray, bins: int = 100, omega: float = 1.0) -> float:
    """Global unlinkability D_sys (Gomez-Barrero et al. 2018), histogram estimate."""
    lo, hi = min(mated.min(), nonmated.min()), max(mated.max(), nonmated.max())
    edges = np.linspace(lo, hi, bins + 1)
    pm = np.histogram(mated, edges)[0] / mated.size
    pn = np.histogram(nonmated, edges)[0] / nonmated.size
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(pn > 0, pm / pn, np.inf)
        local = np.where(lr * omega > 1, 2 * lr * omega / (1 + lr * omega) - 1, 0.0)
    local = np.nan_to_num(local, nan=0.0, posinf=1.0)
    return float(np.sum(pm * local))


def _pairs(ids: np.ndarray, rng: np.random.Generator, nonmated: int) -> tuple[np.ndarray, np.ndarray]:
    """Every same-person pair of distinct images; a sample of different-person pairs."""
    mated = []
    for person in np.unique(ids):
        idx = np.flatnonzero(ids == person)
        mated += [(a, b) for k, a in enumerate(idx) for b in idx[k + 1:]]
    a = rng.integers(0, ids.size, nonmated * 2)
    b = rng.integers(0, ids.size, nonmated * 2)
    keep = ids[a] != ids[b]
    return np.array(mated), np.stack([a[keep], b[keep]], axis=1)[:nonmated]


def run(nonmated: int, seed: int, key_pairs: int) -> dict:
    with np.load(DATA) as f:
        emb, ids = f["emb"].astype(np.float64), f["ids"]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    mated, non = _pairs(ids, rng, nonmated)

    with tempfile.TemporaryDirectory(prefix="vault-protection-") as tmp:
        os.environ.pop("SOFTHSM2_CONF", None)
        from vault.keys import softhsm
        from vault.keys.hsm import Hsm
        from vault.protector import Protector

        hsm = Hsm(softhsm.provision(Path(tmp) / "hsm", token_label="protection-bench"))
        hsm.ensure_keys()
        protector = Protector(hsm)
        dim = unit.shape[1]
        a1, a2, b1 = (protector.transform(c, v, dim) for c, v in (("a", 1), ("a", 2), ("b", 1)))
        protected = {"a1": a1.apply(unit), "a2": a2.apply(unit), "b1": b1.apply(unit)}
        # D_sys depends on the pair of keys (the relative rotation): many pairs, version 1
        # against version 2 of collections k0, k1, ...
        pairs_over_keys = [(protector.transform(f"k{k}", 1, dim), protector.transform(f"k{k}", 2, dim))
                           for k in range(key_pairs)]
        # An attacker with both keys maps version-1 templates onto version 2.
        undone = protected["a1"] @ a1.change_to(a2).T
        hsm.close()

    def scores(x: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", x[pairs[:, 0]], y[pairs[:, 1]])

    result: dict = {"data": "LFW, dlib 128-d (tests/data/lfw-dlib128.npz)",
                    "images": int(ids.size), "mated_pairs": int(len(mated)),
                    "nonmated_pairs": int(len(non)), "machine": machine()}
    # Accuracy: the attacker's impostor attempts are his own faces under the same key.
    eer_plain, frr_plain, thr_plain = eer_and_frr(scores(unit, unit, mated), scores(unit, unit, non))
    p = protected["a1"]
    eer_prot, frr_prot, thr_prot = eer_and_frr(scores(p, p, mated), scores(p, p, non))
    stolen = a1.apply(unit)  # the impostor protects his face with the victim's key
    eer_stolen, frr_stolen, _ = eer_and_frr(scores(p, p, mated), scores(p, stolen, non))
    result.update(eer_plain=eer_plain, eer_protected=eer_prot, eer_stolen_key=eer_stolen,
                  frr_at_far_0001_plain=frr_plain, frr_at_far_0001_protected=frr_prot,
                  frr_at_far_0001_stolen_key=frr_stolen, threshold_at_far_0001=thr_plain)
    # Unlinkability: the same faces under two keys (different images of each, as a
    # re-enrollment after a rotation would give).
    half = len(non) // 2
    plain_non = scores(unit, unit, non)
    result.update(
        dsys_key_versions=dsys(scores(protected["a1"], protected["a2"], mated),
                               scores(protected["a1"], protected["a2"], non)),
        dsys_collections=dsys(scores(protected["a1"], protected["b1"], mated),
                              scores(protected["a1"], protected["b1"], non)),
        dsys_floor=dsys(scores(protected["a1"], protected["a2"], non[:half]),
                        scores(protected["a1"], protected["a2"], non[half:])),
        dsys_no_transform=dsys(scores(unit, unit, mated), plain_non),
        dsys_both_keys_stolen=dsys(scores(undone, protected["a2"], mated),
                                   scores(undone, protected["a2"], non)),
    )
    over_keys = []
    for t1, t2 in pairs_over_keys:
        x, y = t1.apply(unit), t2.apply(unit)
        over_keys.append(dsys(scores(x, y, mated), scores(x, y, non)))
    result["dsys_key_versions_over_key_pairs"] = {
        "pairs": key_pairs, "median": float(np.median(over_keys)),
        "min": float(np.min(over_keys)), "max": float(np.max(over_keys))}
    result["_scores"] = {  # for the plot only
        "versions_mated": scores(protected["a1"], protected["a2"], mated),
        "versions_nonmated": scores(protected["a1"], protected["a2"], non),
        "plain_mated": scores(unit, unit, mated), "plain_nonmated": plain_non}
    return result


def table(r: dict) -> str:
    rows = [
        ("", "EER", "FRR at FAR 0.1%"),
        ("plaintext cosine", f"{r['eer_plain']:.2%}", f"{r['frr_at_far_0001_plain']:.2%}"),
        ("protected (collection key)", f"{r['eer_protected']:.2%}", f"{r['frr_at_far_0001_protected']:.2%}"),
        ("impostor with the stolen key", f"{r['eer_stolen_key']:.2%}", f"{r['frr_at_far_0001_stolen_key']:.2%}"),
    ]
    lines = [f"{a:<30} {b:>8} {c:>16}" for a, b, c in rows]
    lines += ["", f"{'unlinkability D_sys':<30} {'value':>8}",
              f"{'two key versions':<30} {r['dsys_key_versions']:>8.3f}",
              f"{'two collections':<30} {r['dsys_collections']:>8.3f}",
              f"{'noise floor':<30} {r['dsys_floor']:>8.3f}",
              f"{'versions, over key pairs':<30} {r['dsys_key_versions_over_key_pairs']['median']:>8.3f}"
              f"  (median of {r['dsys_key_versions_over_key_pairs']['pairs']}; "
              f"{r['dsys_key_versions_over_key_pairs']['min']:.3f} to "
              f"{r['dsys_key_versions_over_key_pairs']['max']:.3f})",
              f"{'no transform (contrast)':<30} {r['dsys_no_transform']:>8.3f}",
              f"{'both keys stolen (undone)':<30} {r['dsys_both_keys_stolen']:>8.3f}",
              f"({r['mated_pairs']} mated, {r['nonmated_pairs']} non-mated pairs, {r['images']} images)"]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["_scores"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (title, m, n) in zip(axes, (
            ("same key (no protection against linking)", s["plain_mated"], s["plain_nonmated"]),
            (f"key versions 1 and 2 (D_sys {r['dsys_key_versions']:.3f})", s["versions_mated"],
             s["versions_nonmated"]))):
        bins = np.linspace(min(m.min(), n.min()), max(m.max(), n.max()), 80)
        ax.hist(n, bins, density=True, alpha=0.6, label="different faces")
        ax.hist(m, bins, density=True, alpha=0.6, label="same face")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("cosine between the two templates")
        ax.legend(fontsize=8)
    fig.suptitle("Linking a face across protected templates, LFW dlib-128")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nonmated", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--key-pairs", type=int, default=20,
                        help="key pairs over which D_sys's spread is measured")
    parser.add_argument("--json", type=Path, default=Path("bench/out/protection.json"))
    args = parser.parse_args()
    result = run(args.nonmated, args.seed, args.key_pairs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    png = args.json.with_suffix(".png")
    plot(result, png)
    del result["_scores"]
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.json} and {png}")


if __name__ == "__main__":
    main()
