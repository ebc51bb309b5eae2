"""Gallery (matcher): the encrypted templates of one collection key version.

Two tiers, like a log-structured store:

- **journal pages** (:mod:`vault.gallery.pages`): template-major, one ciphertext per
  N // D templates; a single enrollment adds to one page.
- **blocks** (:mod:`vault.gallery.blocks`): dimension-major, D ciphertexts per 4,096
  templates, memory-mapped from files; imports write them directly, journal checkpoints
  move pages into them (:mod:`vault.ops.maintenance`).

A 1:N match scores the blocks the pre-filter picks (:mod:`vault.gallery.prefilter`), the
mixed blocks and the pages, on several threads (the kernels release the GIL). The
gallery holds the public context only, never the secret key, and never a subject id:
subjects are opaque group numbers here, keyed by their HMAC.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from vault import logs
from vault.decider import ScoreCiphertext
from vault.domain.errors import Cancelled
from vault.domain.records import BLOCK, CLUSTERED, MIXED, PAGE
from vault.gallery import blocks as block_ops
from vault.gallery import pages as page_ops
from vault.gallery.blocks import Block
from vault.gallery.pages import Page, live_owners
from vault.gallery.prefilter import Prefilter
from vault.he import HeParams, PublicContext, poly

if TYPE_CHECKING:
    from vault.gallery.shards import ShardPool

log = logs.get("vault.gallery")

_NOT_HERE = np.empty((0, 2, 0), np.uint64)  # a block's residues, when its shard holds them

_THREADS = os.cpu_count() or 2
_SCORERS = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="score")


class Routing:
    """How many clustered blocks a 1:N match scores: the ``fraction`` nearest the probe,
    at least ``min_blocks`` (all of them below that)."""

    def __init__(self, fraction: float = 0.15, min_blocks: int = 16) -> None:
        if not 0.0 < fraction <= 1.0 or min_blocks < 1:
            raise ValueError("routing fraction must be in (0, 1] and min_blocks >= 1")
        self.fraction, self.min_blocks = fraction, min_blocks

    def count(self, clustered: int) -> int:
        return min(clustered, max(self.min_blocks, math.ceil(self.fraction * clustered)))


class CollectionGallery:
    """Encrypted templates of one (collection, key version)."""

    def __init__(self, collection_id: str, key_version: int, dimension: int,
                 params: HeParams, public_context: bytes, routing: Routing | None = None,
                 shards: ShardPool | None = None) -> None:
        self.collection_id = collection_id
        self.key_version = key_version
        self.dimension = dimension
        self.params = params
        self.public_context = public_context
        self.ctx = PublicContext(public_context, params)
        self.routing = routing or Routing()
        # Ray shards (vault.gallery.shards): blocks are scored there, not here, and their
        # residues are not kept in this process.
        self.shards = shards
        self.prefilter = Prefilter(dimension)
        self.blocks: dict[int, Block] = {}
        self.pages: dict[int, Page] = {}
        self._sealed_pages: set[int] = set()  # being checkpointed: no new enrollments
        self._next_page_no = 0  # page numbers are never reused (dead rows still name them)
        self._next_block_no = 0  # handed out before the blocks are installed
        self._group_of: dict[bytes, int] = {}
        self._subjects: list[bytes] = []
        self._lock = threading.Lock()
        # write_lock: held across every commit (store and install), and by single
        # enrollments from start to end. block_lock: held by the long block jobs
        # (import chunks, checkpoints, compaction) while they compute, outside write_lock.
        self.write_lock = threading.Lock()
        self.block_lock = threading.RLock()  # a rotation's final step checkpoints inside it
        # Set when a key rotation has replaced this key version: writers that acquire its
        # locks afterwards must start again on the collection's new gallery.
        self.retired = False
        # The highest collection row revision served with this gallery (vault.core).
        self.row_revision = 0
        # Set at load when a block or page failed its checks: 1:N answers DATA_LOSS.
        self.damaged = False

    @property
    def page_slots(self) -> int:
        return self.params.page_slots(self.dimension)

    # -- subjects as groups ----------------------------------------------------------------

    def group(self, subject_hmac: bytes) -> int:
        """The group number of a subject (allocated on first sight)."""
        with self._lock:
            found = self._group_of.get(subject_hmac)
            if found is None:
                found = self._group_of[subject_hmac] = len(self._subjects)
                self._subjects.append(subject_hmac)
            return found

    def subject(self, group: int) -> bytes:
        """The subject HMAC of a slot owner (a group number at or above 0)."""
        if group < 0:  # -1 marks a slot not live; as an index it would name the newest subject
            raise LookupError("a slot that is not live has no subject")
        with self._lock:
            return self._subjects[group]

    # -- installing state ----------------------------------------------------------------

    def install_block(self, block: Block, moved: Iterable[tuple[int, int, int]] = (),
                      keep_owners: bool = True) -> None:
        """Make a block (new, or a new generation of one) visible to matching, with the
        owners of the templates ``moved`` into it from pages, (page_no, page slot, block
        slot) each. A new generation starts from a copy of its predecessor's slot owners
        (``keep_owners``), so deletions made meanwhile are not undone, while a match still
        scoring the predecessor's ciphertexts never sees the new slots as live."""
        with self._lock:
            old = self.blocks.get(block.block_no)
            if old is not None and keep_owners:
                block.groups = old.groups.copy()
            for page_no, page_slot, block_slot in moved:
                page = self.pages.get(page_no)
                block.groups[block_slot] = page.groups[page_slot] if page is not None else -1
            self.blocks[block.block_no] = block
        if self.shards is not None:
            self.shards.register(self.shards.ref(self.collection_id, self.key_version, block),
                                 block.residues)
            block.residues = _NOT_HERE
        if block.kind == CLUSTERED and block.centroid is not None:
            self.prefilter.add(block.block_no, block.centroid)

    def install_page(self, page: Page) -> None:
        if page.scored is None:
            page.scored = page_ops.scored(self.ctx, page.ct)
        with self._lock:
            self.pages[page.page_no] = page
            self._next_page_no = max(self._next_page_no, page.page_no + 1)

    def drop_pages(self, page_nos: Iterable[int]) -> None:
        """Pages whose templates moved into blocks (after the blocks are installed)."""
        with self._lock:
            for page_no in list(page_nos):
                self.pages.pop(page_no, None)
                self._sealed_pages.discard(page_no)

    def reserve_page_numbers(self, at_least: int) -> None:
        """Never hand out page numbers below ``at_least`` (rows of dropped pages)."""
        with self._lock:
            self._next_page_no = max(self._next_page_no, at_least)

    def holder(self, tier: int, loc: int) -> Block | Page | None:
        """The page or block a template row names (tier, loc), if installed."""
        return self.pages.get(loc) if tier == PAGE else self.blocks.get(loc)

    def set_owners(self, tier: int, loc: int, groups: np.ndarray) -> None:
        """Replace every slot owner of a page or block at once (a replica's refresh)."""
        with self._lock:
            holder = self.holder(tier, loc)
            if holder is not None:
                holder.groups = groups

    def set_live(self, tier: int, loc: int, slot: int, group: int) -> None:
        """Mark a slot live for ``group``, or not live with ``group = -1`` (a deletion:
        from this moment the slot's score is never released)."""
        with self._lock:
            holder = self.holder(tier, loc)
            if holder is not None:
                holder.groups[slot] = group

    # -- reading state ---------------------------------------------------------------------

    def template_count(self) -> int:
        with self._lock:
            return int(sum(int((b.groups >= 0).sum()) for b in self.blocks.values())
                       + sum(int((p.groups >= 0).sum()) for p in self.pages.values()))

    def next_page_slot(self) -> tuple[int, int, Page | None]:
        """Where the next single enrollment goes: (page_no, slot, page or None if new)."""
        with self._lock:
            open_pages = [p for p in self.pages.values()
                          if p.fill < self.page_slots and p.page_no not in self._sealed_pages]
            if open_pages:
                page = max(open_pages, key=lambda p: p.page_no)
                return page.page_no, page.fill, page
            return self._next_page_no, 0, None

    def seal_pages(self, page_nos: Iterable[int]) -> None:
        """Send single enrollments to other pages from now on (a checkpoint takes these)."""
        with self._lock:
            self._sealed_pages.update(page_nos)

    def reserve_block_numbers(self, at_least: int) -> None:
        """Never hand out block numbers below ``at_least`` (rows of blocks not loaded)."""
        with self._lock:
            self._next_block_no = max(self._next_block_no, at_least)

    def new_block_numbers(self, count: int) -> list[int]:
        with self._lock:
            start = max(self._next_block_no, max(self.blocks, default=-1) + 1)
            self._next_block_no = start + count
            return list(range(start, start + count))

    def mixed_tail(self) -> Block | None:
        """The newest mixed block that still has free slots."""
        with self._lock:
            open_mixed = [b for b in self.blocks.values()
                          if b.kind == MIXED and b.fill < self.params.slots]
            return max(open_mixed, key=lambda b: b.block_no) if open_mixed else None

    # -- matching --------------------------------------------------------------------------

    def _score_blocks(self, chosen: Sequence[tuple[Block, np.ndarray | None]], scalars: np.ndarray,
                      cancelled: Callable[[], bool] | None, at_slots: bool = False
                      ) -> list[ScoreCiphertext]:
        """Score blocks on the scoring threads; ``(block, slots)`` each, slots None for
        every live slot. ``at_slots`` (1:1, a few slots): c0 only at the slots, one block
        at a time with its dimensions split over the threads
        (:func:`vault.gallery.blocks.score_at`)."""
        q = self.ctx.moduli[0]
        if self.shards is not None:
            return self._score_on_shards(chosen, scalars, q, cancelled)

        def one(item: tuple[Block, np.ndarray | None]) -> ScoreCiphertext | None:
            block, slots = item
            if cancelled is not None and cancelled():
                return None
            slots, groups = live_owners(block.groups.copy(), slots)
            if slots.size == 0:
                return None
            if at_slots:
                ct = block_ops.score_at(block, scalars, q, slots, _THREADS,
                                        _SCORERS.submit, _THREADS - 1)
            else:
                ct = block_ops.score(block, scalars, q)
            return ScoreCiphertext(ct[0], ntt=False, positions=slots.astype(np.int64),
                                   groups=groups, slots=slots, tier=BLOCK,
                                   loc=block.block_no, low=ct[1] if len(ct) > 1 else None)

        # at_slots: the blocks in turn from this thread, each spread over it and the pool
        # (a task of the pool waiting on others of it could wait for ever).
        results = (list(_SCORERS.map(one, chosen)) if len(chosen) > 1 and not at_slots
                   else [one(c) for c in chosen])
        if cancelled is not None and cancelled():
            done = sum(r is not None for r in results)
            log.info("match abandoned: the caller is gone", collection_id=self.collection_id,
                     blocks_done=done, blocks_total=len(chosen))
            raise Cancelled("the caller cancelled or its deadline passed")
        return [r for r in results if r is not None]

    def _score_on_shards(self, chosen: Sequence[tuple[Block, np.ndarray | None]],
                         scalars: np.ndarray, q: int, cancelled: Callable[[], bool] | None
                         ) -> list[ScoreCiphertext]:
        """The same score ciphertexts as the scoring threads, computed by the Ray shards
        that own the blocks; the slot owners never leave this process."""
        assert self.shards is not None
        live = []
        for block, given in chosen:
            slots, groups = live_owners(block.groups.copy(), given)
            if slots.size:
                live.append((block, slots, groups))
        refs = [self.shards.ref(self.collection_id, self.key_version, b) for b, _, _ in live]
        cts = self.shards.score(refs, scalars, q, cancelled)
        return [ScoreCiphertext(ct[0], ntt=False, positions=slots.astype(np.int64),
                                groups=groups, slots=slots, tier=BLOCK, loc=block.block_no,
                                low=ct[1] if len(ct) > 1 else None)  # one per probe digit
                for (block, slots, groups), ct in zip(live, cts, strict=True)]

    def probe_scalars(self, probe: np.ndarray) -> np.ndarray:
        """The probe's integer digits (k, D) for this key version's parameters."""
        return poly.probe_digits(probe, self.params.probe_scale_bits, self.params.probe_low_bits)

    def score_all(self, probe: np.ndarray, cancelled: Callable[[], bool] | None = None
                  ) -> list[ScoreCiphertext]:
        """Score ciphertexts for a 1:N match: routed clustered blocks, mixed blocks, pages."""
        scalars = self.probe_scalars(probe)
        with self._lock:
            clustered = [b for b in self.blocks.values() if b.kind == CLUSTERED]
            mixed = [b for b in self.blocks.values() if b.kind != CLUSTERED]
            pages = list(self.pages.values())
        want = self.routing.count(len(clustered))
        if want < len(clustered):
            nearest = set(self.prefilter.nearest(probe, want))
            clustered = [b for b in clustered if b.block_no in nearest]
        parts = self._score_blocks([(b, None) for b in clustered + mixed], scalars, cancelled)
        return parts + page_ops.score(self.ctx, pages, scalars, cancelled=cancelled)

    def resolve(self, places: Iterable[tuple[int, int, int]], group: int
                ) -> list[tuple[int, Block | Page, np.ndarray]] | None:
        """The holders of the given places (tier, loc, slot), as they are now, with their
        slots; None when a place is not live for ``group`` (rows and memory disagree)."""
        found: dict[tuple[int, int], tuple[Block | Page, list[int]]] = {}
        with self._lock:
            for tier, loc, slot in places:
                holder = self.holder(tier, loc)
                if holder is None or not 0 <= slot < holder.groups.size or holder.groups[slot] != group:
                    return None
                found.setdefault((tier, loc), (holder, []))[1].append(slot)
        return [(tier, holder, np.array(slots, np.int64))
                for (tier, _loc), (holder, slots) in found.items()]

    def score_held(self, probe: np.ndarray, held: list[tuple[int, Block | Page, np.ndarray]],
                   cancelled: Callable[[], bool] | None = None) -> list[ScoreCiphertext]:
        """Score ciphertexts for given slots of given holders (1:1)."""
        scalars = self.probe_scalars(probe)
        # A holder's tier and type agree (BLOCK: a Block, PAGE: a Page).
        chosen_blocks = [(h, slots) for _, h, slots in held if isinstance(h, Block)]
        chosen_pages = [h for _, h, _ in held if isinstance(h, Page)]
        page_slots = {h.page_no: slots for _, h, slots in held if isinstance(h, Page)}
        return (self._score_blocks(chosen_blocks, scalars, cancelled, at_slots=True)
                + page_ops.score(self.ctx, chosen_pages, scalars, page_slots))
