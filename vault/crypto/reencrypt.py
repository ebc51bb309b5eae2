"""Blind re-encryption, the one recipe of journal checkpoints, compaction and key rotation.

The matcher adds a mask uniform mod q to component 0 of each ciphertext (so its plaintext
becomes uniform), the decider decrypts, moves coefficients and encrypts afresh
(:meth:`vault.decider.Decider.reencrypt`), and the matcher subtracts the mask moved the
same way. The decider sees only uniform values; coefficients that no move names (erased
templates) leave nothing behind, not even their mask.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from vault.decider import Moves
from vault.he import PublicContext, poly


class Reencrypts(Protocol):
    """The decider's side of a blind re-encryption (its in-process or remote form)."""

    def reencrypt(self, collection_id: str, key_version: int, masked: np.ndarray, ntt: bool,
                  moves: Moves, target_version: int,
                  lift_to: tuple[int, ...] = ()) -> np.ndarray: ...


def blind_reencrypt(decider: Reencrypts, ctx: PublicContext, collection_id: str,
                    key_version: int, cts: np.ndarray, ntt: bool, moves: Moves,
                    target_version: int, lift_to: tuple[int, ...] = (),
                    margin: int = 0) -> np.ndarray:
    """Fresh ciphertexts (targets, 2, levels, N), coefficient form, whose plaintexts are
    those of ``cts`` (k, 2, levels, N; NTT form when ``ntt``) rearranged by ``moves``;
    ``cts`` is not modified. The fresh encryptions are under ``target_version``'s public
    key (the same version, or a key rotation's target). ``lift_to``: the result's primes
    when the input holds the score prime alone (key rotation); the mask then stays
    ``margin`` away from 0 and q so that no value wraps around (:func:`vault.he.poly.uniform_interior`)."""
    k, _, levels, n = cts.shape
    moduli = ctx.level_moduli(levels)
    if lift_to:
        if levels != 1:
            raise ValueError("lifting starts from the score prime alone")
        integers = poly.uniform_interior((k, n), moduli[0], margin)
        mask_in = integers[:, None, :].astype(np.uint64)
        mask_out = poly.residues(integers.astype(np.int64), lift_to).swapaxes(0, 1)
        out_moduli = lift_to
    else:
        mask_in = mask_out = poly.uniform((k, n), moduli)  # (k, levels, N)
        out_moduli = moduli
    masked = cts.copy()
    masked[:, 0] = poly.add(masked[:, 0], ctx.many_to_ntt(mask_in) if ntt else mask_in, moduli)
    fresh = decider.reencrypt(collection_id, key_version, masked, ntt, moves, target_version, lift_to)
    del masked
    moved = np.zeros((moves.targets, len(out_moduli), n), np.uint64)
    moved[moves.dst_ct, :, moves.dst_pos] = mask_out[moves.src_ct, :, moves.src_pos]
    fresh[:, 0] = poly.sub(fresh[:, 0], moved, out_moduli)
    return fresh
