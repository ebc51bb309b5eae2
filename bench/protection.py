"""What the cancellable transform keeps and gives away, on real LFW face embeddings.

Uses the vault's own protector, with transform seeds derived in a SoftHSM token made for
the run, for collection "a" at key versions 1 and 2 and collection "b" at version 1.

- Verification accuracy: equal error rate and false rejects at 0.1% false accepts, over
  every same-person pair and a sample of different-person pairs, for plaintext cosine,
  for protected templates (enrolled and probed under the collection's key), and for an
  impostor who holds the transform key ("stolen key": he protects his own face with it).
  A rotation keeps cosine exactly, so all three agree.
- The encryption: every image against every other through the vault's block layout (SEAL
  encryption, the compiled kernel, decryption), for the 50-bit layout and the 32-bit one
  of issue 14: score error, EER and FRR on the exact encrypted scores, and how often
  decisions agree with plaintext cosine at the 0.1%-FAR threshold, exact and as released
  (flooded with the decider's noise, and with narrower bands for comparison).
- Unlinkability (Gomez-Barrero et al., "General framework to evaluate unlinkability in
  biometric template protection systems", IEEE TIFS 2018): D_sys between templates of the
  same faces (mated) and of different faces (non-mated) under two key versions of a
  collection, and under two collections, with the linkage score the attacker has (cosine
  between the two protected templates). 0 means unlinkable; the floor is D_sys between
  two halves of the non-mated scores (what estimation noise alone gives). For contrast,
  D_sys without any transform, and with both keys stolen (they undo the transforms).
  D_sys depends on the pair of keys, so it is also measured over many pairs.
- Wolves, and centring on a reference mean (``CreateCollectionRequest.reference_mean``):
  people with one image are the public; half of them give the vault's reference mean,
  the other half the attacker's "mean face". Everyone else is held out: each person with
  several images enrolls the first one, and the mean face is probed against all of them.
  Before (plain cosine) and after (centred), on the held-out images: acceptances of the mean
  face at 0.92 and at each system's threshold for 0.1% false accepts, EER, FRR at FAR 0.1%,
  D_sys, and what the probe-quality gate refuses (the mean face; genuine probes).

    .venv/bin/python bench/protection.py --json bench/results/protection.json
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from common import arguments, machine, save_figure  # isort: skip

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


def _blend_shift(name: str, v: np.ndarray, mean: np.ndarray) -> np.ndarray:
    from vault.protector import CENTRING
    by = {"plain": 0.0, "centred": CENTRING, "full": 1.0}[name]
    y = v - by * mean
    return y / np.linalg.norm(y)


def _refused(x: np.ndarray, mean: np.ndarray) -> bool:
    from vault.domain.errors import InvalidArgument
    from vault.protector import centre
    try:
        centre(x, mean)
    except InvalidArgument:
        return True
    return False


def _wolves(unit: np.ndarray, ids: np.ndarray, rng: np.random.Generator, nonmated: int,
            protector, key_pairs: int) -> dict:  # type: ignore[no-untyped-def]
    """Mean-face acceptances, accuracy and D_sys, uncentred against centred (held-out)."""
    from vault.protector import CENTRING, centre

    counts = {p: n for p, n in zip(*np.unique(ids, return_counts=True))}
    single = np.array([counts[p] == 1 for p in ids])
    public = np.unique(ids[single])
    rng.shuffle(public)
    reference_people = set(public[: public.size // 2].tolist())
    in_reference = np.array([p in reference_people for p in ids])
    attacker = single & ~in_reference
    mean = unit[in_reference].mean(axis=0)  # what the vault is given
    face = unit[attacker].mean(axis=0)
    face /= np.linalg.norm(face)  # the attacker's mean face, from other public people
    held = np.flatnonzero(~in_reference)
    h_unit, h_ids = unit[held], ids[held]
    mated, non = _pairs(h_ids, rng, nonmated)
    enrolled = np.array([np.flatnonzero(h_ids == p)[0] for p in np.unique(h_ids) if counts[p] > 1])
    dim = unit.shape[1]
    t1, t2 = protector.transform("w", 1, dim), protector.transform("w", 2, dim)

    spread = float(np.sqrt(1 - mean @ mean))
    ratios = np.linalg.norm(h_unit - mean, axis=1) / spread
    face_refused = _refused(face, mean)
    # Blends of k public faces (near the centre for k of 3 and more): how many enrolled
    # people accept each, among those the gate lets through.
    blends = {k: [] for k in (1, 2, 3, 5)}
    attacker_faces = unit[attacker]
    for k, found in blends.items():
        for _ in range(100):
            b = attacker_faces[rng.choice(len(attacker_faces), k, replace=False)].mean(axis=0)
            b /= np.linalg.norm(b)
            if not _refused(b, mean):
                found.append(b)
    out: dict = {"reference_images": int(in_reference.sum()), "attacker_images": int(attacker.sum()),
                 "held_out_images": int(held.size), "enrolled_people": int(enrolled.size),
                 "reference_mean_norm": float(np.linalg.norm(mean)),
                 "gate": {"mean_face_refused": face_refused,
                          "mean_face_centred_norm_over_spread": float(
                              np.linalg.norm(face - mean) / spread),
                          "floor": 0.6,
                          "genuine_min_centred_norm_over_spread": float(ratios.min()),
                          "genuine_refused": int(sum(_refused(x, mean) for x in h_unit))}}
    def shift(x: np.ndarray, by: float) -> np.ndarray:  # without the gate
        y = x - by * mean
        return y / np.linalg.norm(y, axis=-1, keepdims=True)

    # "centred" is what the vault does (CENTRING, gate aside: the mean face is probed as if
    # it had passed); "full" centring is the contrast.
    out["centring"] = CENTRING
    assert np.allclose(centre(h_unit, mean), shift(h_unit, CENTRING))
    for name, x, w in (("plain", h_unit, face), ("centred", shift(h_unit, CENTRING),
                                                 shift(face, CENTRING)),
                       ("full", shift(h_unit, 1.0), shift(face, 1.0))):
        a, b = t1.apply(x), t2.apply(x)  # protected under two key versions
        gen = np.einsum("ij,ij->i", a[mated[:, 0]], a[mated[:, 1]])
        imp = np.einsum("ij,ij->i", a[non[:, 0]], a[non[:, 1]])
        eer, frr, thr = eer_and_frr(gen, imp)
        probe = t1.apply(w)  # the mean face under the collection's key, as if not gated
        wolf = a[enrolled] @ probe
        over = []
        for k in range(key_pairs):
            u, v = protector.transform(f"wk{k}", 1, dim), protector.transform(f"wk{k}", 2, dim)
            xu, xv = u.apply(x), v.apply(x)
            over.append(dsys(np.einsum("ij,ij->i", xu[mated[:, 0]], xv[mated[:, 1]]),
                             np.einsum("ij,ij->i", xu[non[:, 0]], xv[non[:, 1]])))
        out[name] = {
            "eer": eer, "frr_at_far_0001": frr, "threshold_at_far_0001": thr,
            "mean_face_accepted_at_0.92": int((wolf >= 0.92).sum()),
            "mean_face_accepted_at_far_0001": int((wolf >= thr).sum()),
            "mean_face_best_score": float(wolf.max()),
            "blends_passing_gate": {
                str(k): {"count": len(b), "mean_accepted": float(np.mean(
                    [(a[enrolled] @ t1.apply(_blend_shift(name, v, mean)) >= thr).sum() for v in b]))
                    if b else None} for k, b in blends.items()},
            "dsys_key_versions": dsys(np.einsum("ij,ij->i", a[mated[:, 0]], b[mated[:, 1]]),
                                      np.einsum("ij,ij->i", a[non[:, 0]], b[non[:, 1]])),
            "dsys_over_key_pairs": {"pairs": key_pairs, "median": float(np.median(over)),
                                    "min": float(np.min(over)), "max": float(np.max(over))}}
    return out


def encrypted_scores(protected: np.ndarray, params) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Every image against every image, scored as the vault scores a block: the protected
    templates encrypted (SEAL, coefficient encoding, stored at the score prime as the
    layout of ``params`` keeps them) into one block, each image quantised as a probe and
    scored by the compiled kernel, the score ciphertext decrypted. (n, n) cosines."""
    from vault import he
    from vault.gallery import blocks
    from vault.he import poly

    secret_bytes, public_bytes = he.generate(params)
    public = he.PublicContext(public_bytes, params)
    secret = he.SecretContext(secret_bytes, params)
    n_img, n = protected.shape[0], params.slots
    q = public.moduli[0]
    assert n_img <= n
    plain = blocks.dimension_major_plaintexts(protected, 0, n, params.template_scale,
                                              public.level_moduli(params.levels))
    cts = blocks.encrypt_plaintexts(public, plain)
    block = blocks.Block(0, 1, 1, n_img, 1, blocks.held(cts[:, :, 0, :], q), b"",
                         np.zeros(n, np.int32))
    out = np.empty((n_img, n_img))
    scale = params.template_scale * params.probe_scale
    for i, x in enumerate(protected):
        digits = poly.probe_digits(x, params.probe_scale_bits, params.probe_low_bits)
        parts = [secret.decrypt(ct, False)[0][:n_img] for ct in blocks.score(block, digits, q)]
        out[i] = poly.combine_digits(parts, q, params.probe_low_bits) / scale
    return out


def agreement(plain: np.ndarray, enc: np.ndarray, ids: np.ndarray, mated: np.ndarray,
              non: np.ndarray, threshold: float, noise: float, seed: int) -> dict:
    """How often decisions on encrypted scores agree with plaintext cosine at ``threshold``:
    exact (the decrypted score) and as released (flooded with uniform noise in
    +-``noise``, as vault.decider does), 1:1 over the pairs and 1:N (each image against
    all others: the best one's identity and whether it reaches the threshold)."""
    rng = np.random.default_rng(seed)
    pairs = np.concatenate([mated, non])
    p, e = plain[pairs[:, 0], pairs[:, 1]], enc[pairs[:, 0], pairs[:, 1]]
    flooded = e + rng.uniform(-noise, noise, e.size)
    n_img = plain.shape[0]
    off = ~np.eye(n_img, dtype=bool)
    pm, em = np.where(off, plain, -2), np.where(off, enc, -2)
    fm = np.where(off, enc + rng.uniform(-noise, noise, enc.shape), -2)
    def one_n(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        best = m.argmax(axis=1)
        return ids[best], m[np.arange(n_img), best] >= threshold
    (pi, pa), (ei, ea), (fi, fa) = one_n(pm), one_n(em), one_n(fm)
    # A variant: the noise on the accept decision only, candidates ranked on exact scores.
    best = em.argmax(axis=1)
    ri = ids[best]
    ra = em[np.arange(n_img), best] + rng.uniform(-noise, noise, n_img) >= threshold
    same = lambda ai, aa: float(np.mean((aa == pa) & (~pa | (ai == pi))))  # noqa: E731
    return {"threshold": threshold, "max_abs_score_error": float(np.abs(enc - plain).max()),
            "score_error_std": float((enc - plain).std()),
            "one_to_one_exact": float(np.mean((e >= threshold) == (p >= threshold))),
            "one_to_one_released": float(np.mean((flooded >= threshold) == (p >= threshold))),
            "one_to_n_exact": same(ei, ea), "one_to_n_released": same(fi, fa),
            "one_to_n_released_exact_ranks": same(ri, ra),
            "eer_frr_exact": eer_and_frr(enc[mated[:, 0], mated[:, 1]], enc[non[:, 0], non[:, 1]])[:2],
            "eer_frr_released": eer_and_frr(flooded[:len(mated)], flooded[len(mated):])[:2]}


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
        wolves = _wolves(unit, ids, np.random.default_rng(seed + 1), nonmated, protector, key_pairs)
        hsm.close()

    def scores(x: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", x[pairs[:, 0]], y[pairs[:, 1]])

    result: dict = {"data": "LFW, dlib 128-d (tests/data/lfw-dlib128.npz)",
                    "images": int(ids.size), "mated_pairs": len(mated),
                    "nonmated_pairs": len(non), "machine": machine()}
    # Accuracy: the attacker's impostor attempts are his own faces under the same key.
    eer_plain, frr_plain, thr_plain = eer_and_frr(scores(unit, unit, mated), scores(unit, unit, non))
    p = protected["a1"]
    eer_prot, frr_prot, _thr_prot = eer_and_frr(scores(p, p, mated), scores(p, p, non))
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
    result["wolves"] = wolves
    # The encryption: the same protected templates through the vault's block layout, before
    # (the 50-bit layout) and after issue 14 (the 32-bit one), in the same run.
    from vault.decider import DECISION_NOISE
    from vault.he import DEFAULT_PARAMS
    from vault.he.params import LEGACY_PARAMS
    plain_all = p @ p.T
    result["encrypted"] = {}
    for name, params in (("legacy_50bit", LEGACY_PARAMS), ("uint32_32bit", DEFAULT_PARAMS)):
        enc = encrypted_scores(p, params)
        result["encrypted"][name] = {
            "params": json.loads(params.to_json()),
            **agreement(plain_all, enc, ids, mated, non, thr_plain, DECISION_NOISE, seed),
            "decision_noise": DECISION_NOISE}
        for narrower in (0.001, 0.0005):
            result["encrypted"][name][f"released_with_noise_{narrower}"] = {
                k: v for k, v in agreement(plain_all, enc, ids, mated, non, thr_plain, narrower,
                                           seed).items() if "released" in k}
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
              (f"{'versions, over key pairs':<30} {r['dsys_key_versions_over_key_pairs']['median']:>8.3f}"
              f"  (median of {r['dsys_key_versions_over_key_pairs']['pairs']}; "
              f"{r['dsys_key_versions_over_key_pairs']['min']:.3f} to "
              f"{r['dsys_key_versions_over_key_pairs']['max']:.3f})"),
              f"{'no transform (contrast)':<30} {r['dsys_no_transform']:>8.3f}",
              f"{'both keys stolen (undone)':<30} {r['dsys_both_keys_stolen']:>8.3f}",
              f"({r['mated_pairs']} mated, {r['nonmated_pairs']} non-mated pairs, {r['images']} images)"]
    w = r["wolves"]
    lines += ["", (f"wolves: mean of {w['attacker_images']} public faces against "
                   f"{w['enrolled_people']} enrolled people ({w['held_out_images']} held-out "
                   f"images; reference mean from {w['reference_images']} others)"),
              (f"{'':<10} {'EER':>7} {'FRR@0.1%':>9} {'thr':>6} {'acc@0.92':>9} {'acc@thr':>8} "
               f"{'best':>6} {'D_sys':>6} {'D_sys med':>9}")]
    for name in ("plain", "centred", "full"):
        x = w[name]
        lines.append(f"{name:<10} {x['eer']:>7.2%} {x['frr_at_far_0001']:>9.2%} "
                     f"{x['threshold_at_far_0001']:>6.3f} {x['mean_face_accepted_at_0.92']:>9} "
                     f"{x['mean_face_accepted_at_far_0001']:>8} {x['mean_face_best_score']:>6.3f} "
                     f"{x['dsys_key_versions']:>6.3f} {x['dsys_over_key_pairs']['median']:>9.3f}")
    g = w["gate"]
    lines.append(f"gate: mean face refused {g['mean_face_refused']} (centred norm "
                 f"{g['mean_face_centred_norm_over_spread']:.2f} of the spread, floor {g['floor']}); genuine "
                 f"probes refused {g['genuine_refused']} (lowest {g['genuine_min_centred_norm_over_spread']:.2f})")
    for name in ("plain", "centred", "full"):
        b = w[name]["blends_passing_gate"]
        lines.append(f"blends of k public faces passing the gate, enrolled people accepting each "
                     f"({name}): " + ", ".join(
                         f"k={k}: {v['mean_accepted']:.2f} (of {v['count']})" for k, v in b.items()
                         if v["mean_accepted"] is not None))
    for name, e in r.get("encrypted", {}).items():
        lines.append(f"encrypted ({name}): score error max {e['max_abs_score_error']:.1e} std "
                     f"{e['score_error_std']:.1e}; decisions agreeing with plaintext at "
                     f"{e['threshold']:.3f}: 1:1 exact {e['one_to_one_exact']:.4%}, released "
                     f"{e['one_to_one_released']:.4%}; 1:N exact {e['one_to_n_exact']:.4%}, released "
                     f"{e['one_to_n_released']:.4%}; EER/FRR exact {e['eer_frr_exact'][0]:.2%}/"
                     f"{e['eer_frr_exact'][1]:.2%}, released {e['eer_frr_released'][0]:.2%}/"
                     f"{e['eer_frr_released'][1]:.2%}")
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
    save_figure(fig, path)


def main() -> None:
    parser = arguments(__doc__)
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
