"""Fresh encryptions in worker processes: TenSEAL holds the GIL, so encrypting the D
ciphertexts of a block (imports, checkpoints, compaction) in the server's own process
would stall every request for as long. Workers get public contexts only."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from vault import logs
from vault.gallery.blocks import encrypt_plaintexts
from vault.he import HeParams, PublicContext

log = logs.get("vault.workers")

_contexts: dict[bytes, PublicContext] = {}  # in each worker: public contexts by key


def _encrypt(key: bytes, public_context: bytes, params_json: str,
             plaintexts: np.ndarray) -> np.ndarray:
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = _contexts[key] = PublicContext(public_context, HeParams.from_json(params_json))
    return encrypt_plaintexts(ctx, plaintexts)


# How often a worker checks that the server that started it is still alive.
_PARENT_CHECK_SECONDS = 1.0


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: exit as soon as the server process is gone.

    A server killed with SIGKILL runs no shutdown code, and its workers, blocked on the
    task queue, would live on (about 240 MB each). PR_SET_PDEATHSIG is no answer: it fires
    when the *thread* that started the worker ends, and pools start workers from whichever
    thread first needs them. Re-parenting is what the kernel does when the parent dies, so
    a daemon thread watches for it.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_SECONDS)
        os._exit(0)  # nothing of the worker's is worth flushing: it holds public data only

    if os.getppid() != parent:
        os._exit(0)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _ready() -> int:
    """Run in a worker to start it: importing this module loaded TenSEAL."""
    return os.getpid()


class EncryptionPool:
    """Encrypts batches of plaintexts under a public key, across worker processes."""

    # Below this many ciphertexts a process hop costs more than it saves.
    MIN_PARALLEL = 16

    def __init__(self, workers: int | None = None) -> None:
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: never fork a process that holds gRPC, PKCS#11 and SEAL state
                self._pool = ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_exit_with_parent, initargs=(os.getpid(),))
            return self._pool

    def warm(self) -> None:
        """Start the worker processes now, in the background (a server does this at start,
        so the first import or checkpoint does not wait for them and memory is stable)."""
        if self.workers > 1:
            pool = self._executor()
            for _ in range(self.workers):
                pool.submit(_ready)

    def encrypt(self, ctx: PublicContext, public_context: bytes,
                plaintexts: np.ndarray) -> np.ndarray:
        """Fresh encryptions (k, 2, levels, N), coefficient form, of plaintexts (k, levels, N)."""
        if self.workers <= 1 or len(plaintexts) < self.MIN_PARALLEL:
            return encrypt_plaintexts(ctx, plaintexts)
        key = hashlib.sha256(public_context).digest()
        params = ctx.params.to_json()
        try:
            pool = self._executor()
            futures = [pool.submit(_encrypt, key, public_context, params, part)
                       for part in np.array_split(plaintexts, self.workers) if len(part)]
            return np.concatenate([f.result() for f in futures])
        except BrokenProcessPool:
            log.error("encryption worker died; encrypting in process", error_type="BrokenProcessPool")
            with self._lock:
                self._pool = None
            return encrypt_plaintexts(ctx, plaintexts)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
