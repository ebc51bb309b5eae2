"""Journal pages: template-major ciphertexts that take single enrollments cheaply.

A page is one ciphertext (NTT form) whose plaintext holds up to S = N // D templates,
template ``k`` in coefficients ``k*D .. k*D+D-1``. Enrolling one template adds a fresh
encryption of zero and the template's plaintext to the page: one encryption and one
ciphertext written (64 KiB: both primes, see write()) instead of D of each for a block.

Scoring multiplies the page by the probe polynomial ``sum_j s_j X^-j`` (pointwise in the
NTT domain): coefficient ``k*D`` of the product is template ``k``'s score. Its other
coefficients are partial correlations of the template with the probe; they would let
whoever decrypts them rebuild the template, so the matcher adds, before the product
leaves it, values uniform mod q on every coefficient that is not a live template's score
(a one-time pad: the decider sees only scores). Pages are merged into blocks by the
checkpoint (:mod:`vault.ops.maintenance`), which keeps their number, and the cost of scoring
them, bounded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vault.decider import ScoreCiphertext
from vault.domain.errors import Cancelled
from vault.domain.records import PAGE
from vault.he import PublicContext, kernels, linear, poly


@dataclass
class Page:
    page_no: int
    generation: int
    fill: int
    ct: np.ndarray = field(repr=False)  # (2, levels, N) NTT form, as stored
    groups: np.ndarray = field(repr=False)  # (S,) int32: subject group of a live slot, else -1
    # (2, 1, N) NTT form at the score prime, templates at the template scale: what scoring
    # and checkpoints read (set by the gallery when it installs the page, see scored()).
    scored: np.ndarray | None = field(default=None, repr=False)


def _plaintext_ntt(ctx: PublicContext, templates: np.ndarray, first_slot: int,
                   levels: int) -> np.ndarray:
    n, dimension = ctx.n, templates.shape[1]
    values = np.zeros(n, np.int64)
    start = first_slot * dimension
    values[start:start + templates.size] = poly.quantise(templates.reshape(-1),
                                                         ctx.params.template_scale)
    if levels > 1:  # lifted: times the rotation prime, so that scored() divides the noise
        values *= ctx.moduli[1]  # |t| * 2^27 * 2^30 at most: exact in int64
    return ctx.to_ntt(poly.residues(values, ctx.level_moduli(levels)))


def write(ctx: PublicContext, ct: np.ndarray | None, first_slot: int,
          templates: np.ndarray) -> np.ndarray:
    """A page's next state: ``ct`` (None for a new page) plus a fresh encryption of
    ``templates`` (k, D) in slots ``first_slot..``. Nothing is modified in place.

    A page is a sum of one fresh encryption per enrollment, so its noise grows with the
    square root of its fill (5.7x a fresh one for 32 templates at 128-d): new pages are
    kept at both data primes with templates times q1, and :func:`scored` rescales them by
    q1, which divides that sum by 2^30 and leaves one rounding (fresh-size) noise. Pages
    written at one prime (before issue 14) stay at one prime."""
    levels = ct.shape[1] if ct is not None else ctx.params.levels
    moduli = ctx.level_moduli(levels)
    zero = ctx.encrypt_zero()[:, :levels]
    zero[0] = poly.add(zero[0], _plaintext_ntt(ctx, templates, first_slot, levels), moduli)
    return zero if ct is None else poly.add(zero, ct, moduli)


def scored(ctx: PublicContext, ct: np.ndarray) -> np.ndarray:
    """A page as scored (2, 1, N), NTT form at the score prime: a two-prime page rescaled
    by the rotation prime (templates back at the template scale), a one-prime page as is."""
    if ct.shape[1] == 1:
        return ct
    coeff = ctx.ciphertext_from_ntt(np.ascontiguousarray(ct[:, :2]))
    return ctx.ciphertext_to_ntt(linear.rescale(coeff, ctx.moduli))


def live_owners(owners: np.ndarray, slots: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """A holder's live slots and their owners, or the given ``slots`` and their owners
    as they are now (-1 for one deleted since: the decider never releases it; scoring it
    anyway keeps a 1:1's cost), from one read of the owner array (pass a copy). A deletion
    marks a slot -1 in place and a replica's refresh swaps the array: slots and owners
    read apart could disagree, and a slot freed mid-search was once named as the newest
    subject (group -1 read as an index)."""
    chosen = np.flatnonzero(owners >= 0) if slots is None else slots
    return chosen, owners[chosen]


def score(ctx: PublicContext, pages: list[Page], scalars: np.ndarray,
          only_slots: dict[int, np.ndarray] | None = None,
          cancelled: Callable[[], bool] | None = None) -> list[ScoreCiphertext]:
    """Masked score ciphertexts of ``pages`` (live slots, or ``only_slots[page_no]``).
    Stops with :class:`Cancelled` when ``cancelled()`` says the caller is gone."""
    if not pages:
        return []
    q, n = ctx.moduli[0], ctx.n
    digits = np.atleast_2d(scalars)  # (k, D): one product per probe digit
    dimension = digits.shape[1]
    probes = [ctx.to_ntt(poly.residues(poly.negacyclic_reverse(s, n), (q,)))[0] for s in digits]
    chosen = []
    for page in pages:
        slots, groups = live_owners(page.groups.copy(),
                                    None if only_slots is None else only_slots[page.page_no])
        if slots.size:
            chosen.append((page, slots, groups))
    if not chosen:
        return []
    masks = poly.uniform((len(chosen) * len(probes), n), (q,))  # (pages * digits, 1, N)
    for k, (_, slots, _) in enumerate(chosen):
        masks[k * len(probes):(k + 1) * len(probes), 0, slots.astype(np.int64) * dimension] = 0
    masks = ctx.many_to_ntt(masks)
    out = []
    for k, (page, slots, groups) in enumerate(chosen):
        if cancelled is not None and cancelled():
            raise Cancelled("the caller cancelled or its deadline passed")
        held = page.scored if page.scored is not None else scored(ctx, page.ct)
        products = []
        for d, probe in enumerate(probes):  # each digit's product masked on its own
            product = np.empty((2, 1, n), np.uint64)
            kernels.mulmod(held[0, 0], probe, q, product[0, 0])
            kernels.mulmod(held[1, 0], probe, q, product[1, 0])
            product[0] = poly.add(product[0], masks[k * len(probes) + d], (q,))
            products.append(product)
        out.append(ScoreCiphertext(products[0], ntt=True,
                                   positions=slots.astype(np.int64) * dimension,
                                   groups=groups, slots=slots, tier=PAGE,
                                   loc=page.page_no,
                                   low=products[1] if len(products) > 1 else None))
    return out


def pack(ct: np.ndarray, moduli: tuple[int, ...]) -> bytes:
    """A page ciphertext (2, levels, N) as stored: per prime, uint32 residues where the
    prime allows, else uint64."""
    return b"".join(np.ascontiguousarray(ct[:, level, :], dtype=poly.residue_dtype(q)).tobytes()
                    for level, q in enumerate(moduli[:ct.shape[1]]))


def unpack(data: bytes, levels: int, n: int, moduli: tuple[int, ...]) -> np.ndarray:
    out = np.empty((2, levels, n), np.uint64)
    offset = 0
    for level, q in enumerate(moduli[:levels]):
        dtype = poly.residue_dtype(q)
        size = 2 * n * dtype.itemsize
        out[:, level, :] = np.frombuffer(data, dtype, 2 * n, offset).reshape(2, n)
        offset += size
    if offset != len(data):
        raise ValueError("page ciphertext has the wrong size")
    return out


def packed_levels(data: bytes, n: int, moduli: tuple[int, ...]) -> int:
    """How many primes a packed page holds (pages keep the level they were written at)."""
    size = 0
    for level, q in enumerate(moduli):
        size += 2 * n * poly.residue_dtype(q).itemsize
        if size == len(data):
            return level + 1
    raise ValueError("page ciphertext has the wrong size")
