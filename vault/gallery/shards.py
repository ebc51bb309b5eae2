"""Ray shards: a collection's blocks scored in Ray actors spread over a cluster's nodes.

The vault process keeps the pre-filter, the journal pages, the slot owners (group numbers)
and the decider; a shard holds only what a block file holds (score-prime residues of
ciphertexts) and scores them with the same kernel (:func:`vault.gallery.blocks.score`).
What a shard is sent: a block's place (collection id, key version, block number,
generation) and digest, the score prime, the probe as quantised by the protector (already
transformed), and the block's residues by one of two ways:

- block files (a SQLite data directory, :class:`~vault.block_files.BlockFiles`): the file's
  path; the shard reads the file (Ray nodes mount the data volume) and checks the digest;
- blocks in PostgreSQL (:class:`~vault.block_files.BlockBlobs`): the vault reads the row,
  checks its digest against the MACed block row, and sends the score prime's residues
  through Ray's object store (``ray.put``); the shard keeps its own copy and the vault
  drops the object once the load call is done. No database credential enters Ray.

No secret key, PII key, transform seed or subject id ever enters Ray
(``tests/test_shards.py`` inspects every call).

One placement group (SPREAD) per *generation* of the shard set: ``per_node`` shards per
live node. When the set of live nodes changes, a new generation is placed, every known
block is loaded into it, and only then does it serve (the old one is removed): a node that
joins takes blocks over, one that leaves gives them back. Each block (by place) is owned
by one shard of the generation, new places going to the shard that owns the fewest.

Faults: a shard actor restarts (``max_restarts``) and reloads its blocks: from their files
itself, or sent again by the vault from the store (on the next call that names them, and
eagerly from the watcher thread). A call to a shard
that is down, restarting, or slower than ``timeout`` is :class:`Unavailable`: a 1:N never
answers a silent non-match for blocks it could not score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vault import logs
from vault.block_files import BlockFiles, BlockStore
from vault.domain.errors import Cancelled, DataLoss, FailedPrecondition, Unavailable, VaultError
from vault.gallery import blocks as block_ops
from vault.gallery.blocks import Block

log = logs.get("vault.shards")

# (collection id, key version, block number, generation): a block generation's name.
BlockKey = tuple[str, int, int, int]

_SEND_BATCH = 4  # blocks per shard sent from the store at a time (bounds the vault's memory)


@dataclass(frozen=True)
class BlockRef:
    """What a shard is told about a block: where its file is (``path``; empty when the
    vault sends the residues) and what it must hash to; ``data``, when sent: an ObjectRef
    of the score prime's residues (D, 2, N), read and checked by the vault."""

    key: BlockKey
    path: str
    digest: bytes
    data: Any = None


class ShardDataLoss(Exception):
    """Raised in a shard: a block file is missing, unreadable or not the committed one."""


class ShardMissing(Exception):
    """Raised in a shard: it does not hold these blocks and cannot read them itself (they
    are in the vault's store): the vault sends them."""

    def __init__(self, keys: list[BlockKey]) -> None:
        super().__init__(keys)
        self.keys = keys


class _Missing(Unavailable):
    """A shard lacks blocks that only the vault can send (it restarted empty)."""

    def __init__(self, keys: list[BlockKey]) -> None:
        super().__init__("a scoring shard restarted and does not hold its blocks yet: retry")
        self.keys = keys


class Shard:
    """A Ray actor (``ray.remote(Shard)``): block residues in memory, scored on demand."""

    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex  # a restarted actor comes back empty
        self.blocks: dict[BlockKey, Block] = {}

    def where(self) -> tuple[str, int, str]:
        """(Ray node id, worker pid, incarnation)."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid(), self.incarnation

    def held(self) -> list[BlockKey]:
        """The block generations in memory."""
        return sorted(self.blocks)

    def load(self, refs: Sequence[BlockRef]) -> int:
        """Take the blocks not yet held: sent residues, or read from their files (digest
        checked); returns how many were taken. Older generations of a block are dropped
        once a newer one is in. :class:`ShardMissing` names blocks it can get neither way."""
        read = 0
        missing = []
        for ref in refs:
            if ref.key in self.blocks:
                continue
            if ref.data is not None:
                import ray

                # A private copy: the object store's is freed once the vault drops its ref
                # (a zero-copy view would pin it, on the vault's node, for as long as held).
                residues, digest = [np.array(ray.get(ref.data))], ref.digest
            elif ref.path:
                try:
                    residues, digest = BlockFiles.read(Path(ref.path), levels=1, as_stored=True)
                except (OSError, ValueError) as exc:
                    raise ShardDataLoss("a block file is missing or unreadable") from exc
                if digest != ref.digest:
                    raise ShardDataLoss("a block file is not the committed one")
            else:
                missing.append(ref.key)
                continue
            block_no, generation = ref.key[2], ref.key[3]
            self.blocks[ref.key] = Block(block_no, 0, generation, 0, 1, residues[0], digest,
                                         np.empty(0, np.int32))
            # Keep two generations: a match in flight may still name the previous one.
            for older in sorted(k for k in self.blocks if k[:3] == ref.key[:3])[:-2]:
                del self.blocks[older]
            read += 1
        if missing:
            raise ShardMissing(missing)
        return read

    def forget(self, collection_id: str, key_version: int) -> None:
        """Drop every block of a key version (retired, or its collection deleted)."""
        for key in [k for k in self.blocks if k[:2] == (collection_id, key_version)]:
            del self.blocks[key]

    def score(self, refs: Sequence[BlockRef], scalars: np.ndarray, q: int) -> list[np.ndarray]:
        """Score ciphertexts (k, 2, 1, N) for the probe's k digits, one per block, in the
        order given."""
        self.load(refs)
        return [block_ops.score(self.blocks[ref.key], scalars, q) for ref in refs]


@dataclass
class _Generation:
    number: int
    group: Any  # ray.util.placement_group.PlacementGroup
    actors: list[Any]
    names: list[str]
    nodes: frozenset[str]
    assignment: dict[tuple[str, int, int], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def owner(self, key: BlockKey) -> int:
        """The shard of a block, by its place (not its generation, so a block's new
        generation stays where the old one was): a new place goes to the shard that owns
        the fewest, so every shard of a generation gets its share."""
        place = key[:3]
        with self.lock:
            found = self.assignment.get(place)
            if found is None:
                counts = Counter(self.assignment.values())
                found = min(range(len(self.actors)), key=lambda i: (counts[i], i))
                self.assignment[place] = found
            return found

    def release(self, collection_id: str, key_version: int) -> None:
        with self.lock:
            for place in [p for p in self.assignment if p[:2] == (collection_id, key_version)]:
                del self.assignment[place]


def _ray() -> Any:
    import ray  # optional dependency (the ``ray`` extra): imported only when used

    return ray


def connect(address: str) -> bool:
    """Join the Ray cluster at ``address`` (``local``: start one on this machine, bound to
    127.0.0.1). Token authentication is required. Returns whether this call started Ray."""
    if address == "local":
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
            os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this machine's Ray only
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback node IP
    if os.environ.get("RAY_AUTH_MODE") != "token":
        raise FailedPrecondition("the Ray cluster must use token authentication: set "
                                 "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                                 "(the same on every node)")
    ray = _ray()
    if ray.is_initialized():
        return False
    if address == "local":
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # read when Ray was imported: loopback IP
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING",
                              "log_to_driver": False}
    if address == "local":
        # Results are small (64 KiB per block scored): a small object store will do.
        # address="local": a new Ray of our own, even if another runs on this machine.
        ray.init(address="local", _node_ip_address="127.0.0.1", object_store_memory=512 << 20,
                 **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


@dataclass(frozen=True)
class RaySettings:
    """``vault serve --ray-address`` and its knobs: ``per_node`` shards per live node,
    ``cpus`` reserved per shard, ``timeout`` seconds a shard may take to answer."""

    address: str = "local"
    per_node: int = 1
    cpus: float = 1.0
    timeout: float = 30.0
    watch_interval: float = 1.0


class _StoreSender:
    """Blocks kept in the database reach the shards from the vault: read from the store,
    checked, and sent through Ray's object store (shards need no database login)."""

    def __init__(self, files: BlockStore, get: Callable[..., list[Any]]) -> None:
        self.files = files
        self._get = get  # ShardPool._get: waits, maps Ray's faults to ours
        self._lock = threading.Lock()

    def send(self, generation: _Generation, by_shard: dict[int, list[BlockRef]],
              strict: bool, cancelled: Callable[[], bool] | None = None) -> None:
        """Send shards their blocks from the store, except those they already hold: a few
        per shard at a time, every shard at once, one sender at a time (the vault holds
        at most one batch per shard; a burst of matches after a restart reads each block
        once)."""
        with self._lock:
            owners = list(by_shard)
            held = self._get([generation.actors[i].held.remote() for i in owners], cancelled)
            todo = {i: [ref for ref in by_shard[i] if ref.key not in has]
                    for i, has in zip(owners, map(set, held), strict=True)}
            longest = max((len(part) for part in todo.values()), default=0)
            for start in range(0, longest, _SEND_BATCH):
                calls = []
                for i, part in todo.items():
                    sent = self.fetch(part[start:start + _SEND_BATCH], strict)
                    if sent:
                        calls.append(generation.actors[i].load.remote(sent))
                self._get(calls, cancelled)

    def fetch(self, refs: Sequence[BlockRef], strict: bool = True) -> list[BlockRef]:
        """``refs`` with their score prime's residues read from the store, the digest
        checked against the MACed block row the vault loaded (``ref.digest``), and put in
        Ray's object store. A block whose data is missing or not the committed one is
        DataLoss (``strict``), or left out: its shard lacks it, and the match that names
        it fetches it strictly."""
        ray = _ray()
        out = []
        for ref in refs:
            cid, version, block_no, generation = ref.key
            try:
                residues, digest = self.files.read(
                    self.files.path(cid, version, block_no, generation), levels=1,
                    as_stored=True)
            except (OSError, ValueError):
                residues, digest = [], b""
            if digest != ref.digest:
                log.error("integrity failure", kind="block_data_shard", collection_id=cid)
                if strict:
                    raise DataLoss("a block's data in the store is missing or not the "
                                   "committed one")
                continue
            out.append(dataclasses.replace(ref, data=ray.put(residues[0])))
        return out


class ShardPool:
    """The vault's side of the shards: placement, ownership, fan-out and faults."""

    def __init__(self, files: BlockStore, address: str = "local", per_node: int = 1,
                 cpus: float = 1.0, timeout: float = 30.0, watch_interval: float = 1.0) -> None:
        self.files = files
        # Blocks in the database (BlockBlobs): the vault reads them and sends the residues;
        # block files: the shards read them.
        self.sends = not isinstance(files, BlockFiles)
        self._sender = _StoreSender(files, self._get)
        self.address = address
        self.per_node = per_node
        self.cpus = cpus
        self.timeout = timeout
        # Told each shard call's latency (vault.api.metrics sets it when metrics are served).
        self.observe: Callable[[int, float], None] | None = None
        self.watch_interval = watch_interval
        self._known: dict[tuple[str, int, int], BlockRef] = {}  # newest generation of each block
        self._lock = threading.Lock()
        self._rebalance_lock = threading.Lock()
        self._generation: _Generation | None = None
        self._incarnations: dict[str, str] = {}
        self._started_ray = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    @classmethod
    def of(cls, files: BlockStore, settings: RaySettings) -> ShardPool:
        """A pool with the given settings (not started)."""
        return cls(files, settings.address, settings.per_node, settings.cpus, settings.timeout,
                   settings.watch_interval)

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> ShardPool:
        """Connect to Ray, place the first generation, start the watcher thread."""
        self._started_ray = connect(self.address)
        self.rebalance()
        if self.watch_interval > 0:
            self._watcher = threading.Thread(target=self._watch, name="shard-watch", daemon=True)
            self._watcher.start()
        return self

    def close(self) -> None:
        """Stop watching, remove the shards and their placement group (and Ray, if ours)."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)
        with self._lock:
            generation, self._generation = self._generation, None
        if generation is not None:
            self._remove(generation)
        if self._started_ray:
            _ray().shutdown()

    def _live_nodes(self) -> frozenset[str]:
        return frozenset(n["NodeID"] for n in _ray().nodes()
                         if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)

    def _place(self, number: int, nodes: frozenset[str]) -> _Generation:
        ray = _ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        count = max(1, self.per_node * len(nodes))
        group = placement_group([{"CPU": self.cpus}] * count, strategy="SPREAD")
        if not group.wait(timeout_seconds=max(self.timeout, 30.0)):
            ray.util.remove_placement_group(group)
            raise Unavailable("the Ray cluster has no room for the scoring shards")
        actor = ray.remote(Shard)
        actors = [actor.options(
            num_cpus=self.cpus, max_restarts=-1, max_task_retries=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=i)).remote()
            for i in range(count)]
        return _Generation(number, group, actors, [f"{number}:{i}" for i in range(count)], nodes)

    def _remove(self, generation: _Generation) -> None:
        ray = _ray()
        for actor in generation.actors:
            ray.kill(actor, no_restart=True)
        ray.util.remove_placement_group(generation.group)

    def rebalance(self) -> bool:
        """Place a new generation when the live nodes changed (or none is placed yet):
        every known block is loaded into it before it serves. Returns whether it did."""
        with self._rebalance_lock:
            nodes = self._live_nodes()
            old = self._generation
            if old is not None and old.nodes == nodes:
                return False
            new = self._place(old.number + 1 if old else 0, nodes)
            try:
                self._load_all(new)
            except BaseException:
                self._remove(new)
                raise
            with self._lock:
                self._generation = new
                self._incarnations = {}
            if old is not None:
                self._remove(old)
            log.info("shards placed", generation=new.number, count=len(new.actors),
                     nodes=len(nodes))
            return True

    def _load_all(self, generation: _Generation, only: int | None = None) -> None:
        with self._lock:
            refs = sorted(self._known.values(), key=lambda r: r.key)
        by_shard: dict[int, list[BlockRef]] = {}
        for ref in refs:
            by_shard.setdefault(generation.owner(ref.key), []).append(ref)
        if only is not None:
            by_shard = {i: part for i, part in by_shard.items() if i == only}
        if self.sends:
            self._sender.send(generation, by_shard, strict=False)
        else:
            self._get([generation.actors[i].load.remote(part) for i, part in by_shard.items()])

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_interval):
            try:
                self.rebalance()
                self._reload_restarted()
            except (VaultError, _ray().exceptions.RayError) as exc:  # the next pass retries
                log.warning("shard watch failed", error_type=type(exc).__name__)

    def _reload_restarted(self) -> None:
        """Reload the blocks of shards that came back from a restart (they come back empty)."""
        generation = self._generation
        if generation is None:
            return
        ray = _ray()
        for i, actor in enumerate(generation.actors):
            try:
                _node, _pid, incarnation = ray.get(actor.where.remote(), timeout=self.timeout)
            except ray.exceptions.RayError:  # down: a later pass reloads it
                continue
            name = generation.names[i]
            if self._incarnations.get(name) not in (None, incarnation):
                self._load_all(generation, only=i)
                log.info("shard restarted; blocks reloaded", shard=name)
            self._incarnations[name] = incarnation

    # -- what the gallery calls --------------------------------------------------------

    def ref(self, collection_id: str, key_version: int, block: Block) -> BlockRef:
        """The reference a shard loads ``block`` by."""
        path = "" if self.sends else str(
            self.files.path(collection_id, key_version, block.block_no, block.generation))
        return BlockRef((collection_id, key_version, block.block_no, block.generation),
                        path, block.digest)

    def register(self, ref: BlockRef, residues: np.ndarray | None = None) -> None:
        """A block (or its new generation) is installed: its owner loads it now, in the
        background (a match that names it before then loads it first). With blocks in
        the store, ``residues`` (the block's score prime, as installed) are sent."""
        with self._lock:
            self._known[ref.key[:3]] = ref
            generation = self._generation
        if generation is None:
            return
        if self.sends:
            if residues is None or residues.size == 0:
                return  # sent from the store when a match names it
            # Ray keeps the object while the call is pending; then only the shard's copy is left.
            ref = dataclasses.replace(ref, data=_ray().put(residues))
        generation.actors[generation.owner(ref.key)].load.remote([ref])

    def forget(self, collection_id: str, key_version: int) -> None:
        """A key version's blocks are no longer matched (retired or deleted)."""
        with self._lock:
            for place in [p for p in self._known if p[:2] == (collection_id, key_version)]:
                del self._known[place]
            generation = self._generation
        if generation is not None:
            generation.release(collection_id, key_version)
            for actor in generation.actors:
                actor.forget.remote(collection_id, key_version)

    def score(self, refs: Sequence[BlockRef], scalars: np.ndarray, q: int,
              cancelled: Callable[[], bool] | None = None) -> list[np.ndarray]:
        """Score ciphertexts of ``refs`` (in order): one call per owning shard, all in
        flight at once. Unavailable when a shard is down, restarting or too slow."""
        generation = self._generation
        if generation is None:
            raise Unavailable("the scoring shards are not placed")
        try:
            return self._score(generation, refs, scalars, q, cancelled)
        except _Missing as exc:  # a shard restarted empty: send it its blocks, once
            if not self.sends:
                raise
            wanted = {ref.key: ref for ref in refs}
            by_shard: dict[int, list[BlockRef]] = {}
            for key in exc.keys:
                by_shard.setdefault(generation.owner(key), []).append(wanted[key])
            self._sender.send(generation, by_shard, strict=True, cancelled=cancelled)
            return self._score(generation, refs, scalars, q, cancelled)

    def _score(self, generation: _Generation, refs: Sequence[BlockRef], scalars: np.ndarray,
               q: int, cancelled: Callable[[], bool] | None) -> list[np.ndarray]:
        by_shard: dict[int, list[int]] = {}
        for k, ref in enumerate(refs):
            by_shard.setdefault(generation.owner(ref.key), []).append(k)
        scalars = np.ascontiguousarray(scalars, np.int64)
        calls = {i: generation.actors[i].score.remote([refs[k] for k in ks], scalars, q)
                 for i, ks in by_shard.items()}
        owners = list(calls)
        observe = self.observe
        answers = self._get(list(calls.values()), cancelled,
                            None if observe is None else
                            lambda k, seconds: observe(owners[k], seconds))
        out: list[np.ndarray] = [np.empty(0)] * len(refs)
        for ks, cts in zip(by_shard.values(), answers, strict=True):
            for k, ct in zip(ks, cts, strict=True):
                out[k] = ct
        return out

    def _get(self, calls: list[Any], cancelled: Callable[[], bool] | None = None,
             on_ready: Callable[[int, float], None] | None = None) -> list[Any]:
        """Wait for every call (polling ``cancelled``); map Ray's faults to ours.
        ``on_ready(k, seconds)``: call ``k`` answered after ``seconds`` (metrics)."""
        if not calls:
            return []
        ray = _ray()
        started = time.monotonic()
        deadline = started + self.timeout
        index = {call: k for k, call in enumerate(calls)}
        pending = list(calls)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                for call in pending:
                    with contextlib.suppress(ray.exceptions.RayError, ValueError):
                        ray.cancel(call)  # an actor that is gone has nothing to cancel
                raise Unavailable("a scoring shard did not answer in time (down or "
                                  "restarting): retry")
            if cancelled is not None and cancelled():
                raise Cancelled("the caller cancelled or its deadline passed")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(left, 0.1))
            if on_ready is not None:
                for call in ready:
                    on_ready(index[call], time.monotonic() - started)
        out, missing = [], []
        for call in calls:
            try:
                out.append(ray.get(call))
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, ShardDataLoss):
                    log.error("integrity failure", kind="block_file_shard")
                    raise DataLoss("a block file changed on disk") from None
                if isinstance(exc.cause, ShardMissing):
                    missing.extend(exc.cause.keys)  # every shard's, to send them at once
                    continue
                raise Unavailable("a scoring shard failed: retry") from None
            except ray.exceptions.RayError:
                raise Unavailable("a scoring shard is down or restarting: retry") from None
        if missing:
            raise _Missing(missing)
        return out

    def status(self) -> list[dict[str, Any]]:
        """Each shard of the serving generation: node, pid, blocks held (for tests and
        operators); a shard that does not answer has ``node`` None."""
        generation = self._generation
        if generation is None:
            return []
        ray = _ray()
        out = []
        for name, actor in zip(generation.names, generation.actors, strict=True):
            try:
                node, pid, _ = ray.get(actor.where.remote(), timeout=self.timeout)
                held = ray.get(actor.held.remote(), timeout=self.timeout)
            except ray.exceptions.RayError:
                node, pid, held = None, None, []
            out.append({"name": name, "node": node, "pid": pid, "blocks": held})
        return out

    def owned(self) -> dict[tuple[str, int, int], str]:
        """Which shard owns each known block (by place)."""
        generation = self._generation
        with self._lock:
            refs = list(self._known.values())
        if generation is None:
            return {}
        return {ref.key[:3]: generation.names[generation.owner(ref.key)] for ref in refs}
