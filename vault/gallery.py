"""Gallery (matcher): encrypted templates of one collection key version, public context only.

Templates sit in dimension-major blocks (see :mod:`vault.he`): ciphertext ``j`` of block
``b`` holds dimension ``j`` of up to ``slots`` templates. Scoring a probe against a block is
``sum_j probe[j] * ct_j``, one score ciphertext per block, decrypted only by the decider.

Enrolling into a block adds, to each of its D ciphertexts, a fresh encryption of zero and
the plaintext that puts one value in the template's slot. The fresh zero is what makes the
new ciphertext unrelated to the old one for someone who diffs two copies of the database;
zeros are encrypted ahead of time by a child process (each used once), so the request
path only encodes and adds.

The gallery never holds the CKKS secret key and never sees a subject id, only its HMAC.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import tenseal as ts

from vault import he, logs
from vault.errors import Cancelled

# Probe values whose encoding at scale 2^29 would round to the zero polynomial: SEAL refuses
# to multiply by it ("transparent" result); skipping them is the same rounding.
_NEGLIGIBLE = 2.0 ** -29
# Ciphertexts scored between two looks at whether the caller is still there (~3 ms).
_POLL_EVERY = 32

log = logs.get("vault.gallery")


def block_digest(ct_bytes: Iterable[bytes]) -> bytes:
    """SHA-256 over the SHA-256 of each ciphertext of a block, in dimension order."""
    outer = hashlib.sha256()
    for data in ct_bytes:
        outer.update(hashlib.sha256(data).digest())
    return outer.digest()


@dataclass
class Block:
    """One dimension-major block: D ciphertexts, ``used`` slots handed out so far."""

    block_no: int
    cts: list[ts.CKKSVector]
    generation: int
    used: int


@dataclass(frozen=True)
class BlockWrite:
    """A new state of one block, computed but not yet stored nor visible to matches."""

    block_no: int
    slot: list[int]
    generation: int
    used: int
    cts: list[ts.CKKSVector] = field(repr=False)
    ct_bytes: list[bytes] = field(repr=False)
    digest: bytes = field(repr=False)


@dataclass(frozen=True)
class LiveTemplate:
    template_id: str
    subject_hmac: bytes = field(repr=False)
    block_no: int
    slot: int


def _zero_worker(public_context: bytes, slots: int, out: mp.Queue, stop: mp.Event,
                 parent: int) -> None:
    """Child process: encrypt zeros ahead of time (TenSEAL holds the GIL, so a thread would
    slow every request of the server down). Exits when told to or when its parent is gone."""
    ctx = ts.context_from(public_context)
    while not stop.is_set() and os.getppid() == parent:
        data = ts.ckks_vector(ctx, [0.0] * slots).serialize()
        while not stop.is_set() and os.getppid() == parent:
            try:
                out.put(data, timeout=0.5)
                break
            except queue.Full:
                continue


class ZeroPool:
    """Fresh encryptions of the zero vector, made ahead by a child process, each used once.

    The pool lives in memory only and is refilled after a restart: a zero that was handed
    out is never handed out again. When the pool runs dry, zeros are encrypted on the spot.
    """

    def __init__(self, ctx: ts.Context, public_context: bytes, slots: int, target: int) -> None:
        self._ctx = ctx
        self._public_context = public_context
        self._slots = slots
        self._target = target
        self._lock = threading.Lock()
        self._process: mp.process.BaseProcess | None = None
        self._queue: mp.Queue | None = None
        self._stop: mp.Event | None = None

    def start(self) -> None:
        """Start the child process (idempotent)."""
        with self._lock:
            if self._process is not None:
                return
            spawn = mp.get_context("spawn")  # never fork a process that holds gRPC and PKCS#11 state
            self._queue = spawn.Queue(maxsize=self._target)
            self._stop = spawn.Event()
            self._process = spawn.Process(
                target=_zero_worker, name="vault-zero-pool", daemon=True,
                args=(self._public_context, self._slots, self._queue, self._stop, os.getpid()))
            self._process.start()

    def _encrypt_zero(self) -> ts.CKKSVector:
        return ts.ckks_vector(self._ctx, [0.0] * self._slots)

    def take(self, n: int) -> list[ts.CKKSVector]:
        """``n`` fresh zeros; encrypts on the spot what the pool lacks."""
        self.start()
        out = []
        for _ in range(n):
            try:
                data = self._queue.get_nowait() if self._queue is not None else None
            except queue.Empty:
                data = None
            out.append(self._encrypt_zero() if data is None else ts.ckks_vector_from(self._ctx, data))
        return out

    def close(self) -> None:
        with self._lock:
            if self._process is None:
                return
            self._stop.set()
            self._process.join(timeout=2)
            if self._process.is_alive():
                self._process.kill()
            self._queue.close()
            self._queue.cancel_join_thread()
            self._process = None


class CollectionGallery:
    """Encrypted templates of one (collection, key version)."""

    def __init__(self, collection_id: str, key_version: int, dimension: int,
                 params: he.HeParams, public_context: bytes, zero_pool_target: int | None = None) -> None:
        self.collection_id = collection_id
        self.key_version = key_version
        self.dimension = dimension
        self.params = params
        self._ctx = he.load_public(public_context, params)
        self._blocks: dict[int, Block] = {}
        self._live: dict[str, LiveTemplate] = {}
        self._by_subject: dict[bytes, set[str]] = {}
        self._state_lock = threading.Lock()
        # Held by the service across compute, store and apply of one enrollment.
        self.write_lock = threading.Lock()
        self._zeros = ZeroPool(self._ctx, public_context, params.slots,
                               zero_pool_target or 4 * dimension)

    @property
    def context(self) -> ts.Context:
        return self._ctx

    def close(self) -> None:
        self._zeros.close()

    # -- loading ---------------------------------------------------------------------

    def load_block(self, block_no: int, ct_bytes: list[bytes], generation: int, used: int) -> None:
        """Install a stored block (its MAC already checked by the caller)."""
        cts = [ts.ckks_vector_from(self._ctx, data) for data in ct_bytes]
        with self._state_lock:
            self._blocks[block_no] = Block(block_no, cts, generation, used)

    def add_live(self, template: LiveTemplate) -> None:
        with self._state_lock:
            self._live[template.template_id] = template
            self._by_subject.setdefault(template.subject_hmac, set()).add(template.template_id)

    def remove_templates(self, template_ids: Iterable[str]) -> None:
        """Tombstone: the templates stop matching at once (their slots stay in the block)."""
        with self._state_lock:
            for template_id in template_ids:
                live = self._live.pop(template_id, None)
                if live is not None:
                    ids = self._by_subject.get(live.subject_hmac)
                    if ids is not None:
                        ids.discard(template_id)
                        if not ids:
                            del self._by_subject[live.subject_hmac]

    # -- enrollment --------------------------------------------------------------------

    def prepare(self, templates: np.ndarray) -> list[BlockWrite]:
        """New block states holding ``templates`` (n, D) in the next free slots.

        Nothing changes until :meth:`apply`; the caller holds :attr:`write_lock` from here
        until the write is stored and applied (or abandoned).
        """
        templates = np.atleast_2d(templates)
        slots = self.params.slots
        writes: list[BlockWrite] = []
        with self._state_lock:
            tail = max(self._blocks.values(), key=lambda b: b.block_no, default=None)
        start = 0
        while start < len(templates):
            if tail is None or tail.used >= slots:
                block_no = 0 if tail is None else tail.block_no + 1
                base_cts, generation, used = None, 0, 0
            else:
                block_no, base_cts, generation, used = tail.block_no, tail.cts, tail.generation, tail.used
            take = min(slots - used, len(templates) - start)
            chunk = templates[start:start + take]
            slot_ids = list(range(used, used + take))
            plain = np.zeros((self.dimension, slots))
            plain[:, used:used + take] = chunk.T
            zeros = self._zeros.take(self.dimension)
            new_cts = []
            for j in range(self.dimension):
                ct = zeros[j]
                if base_cts is not None:
                    ct.add_(base_cts[j])
                ct.data.add_plain_(plain[j].tolist())  # skips TenSEAL's slow list wrapper
                new_cts.append(ct)
            ct_bytes = [ct.serialize() for ct in new_cts]
            write = BlockWrite(block_no, slot_ids, generation + 1, used + take,
                               new_cts, ct_bytes, block_digest(ct_bytes))
            writes.append(write)
            tail = Block(block_no, new_cts, write.generation, write.used)
            start += take
        return writes

    def apply(self, writes: list[BlockWrite], templates: list[LiveTemplate]) -> None:
        """Make stored writes visible to matching."""
        with self._state_lock:
            for w in writes:
                self._blocks[w.block_no] = Block(w.block_no, w.cts, w.generation, w.used)
            for t in templates:
                self._live[t.template_id] = t
                self._by_subject.setdefault(t.subject_hmac, set()).add(t.template_id)

    # -- matching ----------------------------------------------------------------------

    def subject_templates(self, subject_hmac: bytes) -> list[LiveTemplate]:
        with self._state_lock:
            return [self._live[t] for t in self._by_subject.get(subject_hmac, ())]

    def live_templates(self) -> list[LiveTemplate]:
        with self._state_lock:
            return list(self._live.values())

    def template_count(self) -> int:
        with self._state_lock:
            return len(self._live)

    def score(self, probe: np.ndarray, block_nos: Iterable[int],
              cancelled: Callable[[], bool] | None = None) -> dict[int, bytes]:
        """Encrypted scores of ``probe`` against the given blocks: {block_no: ciphertext}.

        ``cancelled`` is polled every few ciphertexts: when the caller is gone the work
        stops with :class:`Cancelled` instead of running on for nobody.
        """
        with self._state_lock:
            blocks = [self._blocks[b] for b in sorted(set(block_nos))]
        weights = [(j, float(v)) for j, v in enumerate(probe) if abs(v) >= _NEGLIGIBLE]
        out: dict[int, bytes] = {}
        for done, block in enumerate(blocks):
            (j0, w0), rest = weights[0], weights[1:]
            acc = block.cts[j0] * w0
            for k, (j, w) in enumerate(rest, 1):
                if cancelled is not None and k % _POLL_EVERY == 0 and cancelled():
                    log.info("match abandoned: the caller is gone", collection_id=self.collection_id,
                             blocks_done=done, blocks_total=len(blocks))
                    raise Cancelled("the caller cancelled or its deadline passed")
                acc.add_(block.cts[j] * w)
            out[block.block_no] = acc.serialize()
        return out

    def block_ciphertexts(self, block_no: int) -> list[ts.CKKSVector]:
        """The ciphertexts of one block (for compaction and for tests)."""
        with self._state_lock:
            return list(self._blocks[block_no].cts)
