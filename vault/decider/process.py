"""The decider as a child process of the server (:mod:`vault.decider.child`), and the
client the serving process talks to it with.

:class:`ProcessDecider` implements :class:`vault.decider.Decider` by one frame each way
per call, on a connection per thread. The child gets the token configuration on its stdin
and keeps the pipe open: it exits when this process does, a SIGKILL included.

If the child dies, the call in flight and every call until it is back answer
UNAVAILABLE ("the decider process ... is being restarted"), never a non-match: a
supervisor thread starts a new child and loads it again from the store (the PII key's
wrapped blob and each loaded key version's sealed secret, read afresh: a master key
rotation may have rewrapped them meanwhile), then calls go through again.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vault import logs
from vault.decider import wire
from vault.decider.release import GroupScore, Moves, ScoreCiphertext
from vault.domain import errors
from vault.domain.errors import Unavailable, VaultError
from vault.domain.records import CollectionKeyRow, CollectionRow
from vault.he import HeParams
from vault.keys.hsm import HsmConfig

log = logs.get("vault.decider")

START_SECONDS = 120.0  # importing TenSEAL and faiss on a loaded machine is slow
RESTART_PAUSE = 0.5


class _Child:
    """One decider process and its socket."""

    def __init__(self, config: HsmConfig, workers: int | None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vault-decider-"))  # mode 0700
        self.path = self.dir / "decider.sock"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vault.decider.child", str(self.path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            # Its own session: a Ctrl-C or a signal to the server's process group reaches
            # the server alone, which then closes the child (it also ends when the server
            # dies: the stdin lifeline and its parent watch), not a restart mid-shutdown.
            start_new_session=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        line = json.dumps({"module": config.module, "token_label": config.token_label,
                           "pin": config.pin, "workers": workers}).encode() + b"\n"
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()  # the pipe stays open: the child's lifeline
        except OSError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], START_SECONDS)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            self.stop()
            raise Unavailable("the decider process did not start (see the server log)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ProcessDecider:
    """The client of the decider process (see the module docstring)."""

    def __init__(self, config: HsmConfig, workers: int | None = None) -> None:
        self._config = config
        self._workers = workers
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closing = False
        self._generation = 0
        self._ready = threading.Event()
        self._restarter = 0  # the supervisor's thread while it loads a new child
        self._pii: bytes | None = None
        self._loaded: dict[tuple[str, int], CollectionKeyRow] = {}
        self._wrapped_pii: Callable[[], bytes | None] = lambda: self._pii
        self._key_row: Callable[[str, int], CollectionKeyRow | None] = \
            lambda cid, v: self._loaded.get((cid, v))
        self._child = _Child(config, workers)
        self._ready.set()
        self._watch = threading.Thread(target=self._supervise, name="decider-supervisor",
                                       daemon=True)
        self._watch.start()

    @property
    def pid(self) -> int:
        """The current child's process id."""
        return self._child.proc.pid

    # -- transport -----------------------------------------------------------------------

    def _connection(self) -> socket.socket:
        conn: socket.socket | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.generation == self._generation:
            return conn
        if conn is not None:
            conn.close()
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(str(self._child.path))
        self._local.conn, self._local.generation = conn, self._generation
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        if not self._ready.is_set() and threading.get_ident() != self._restarter:
            raise Unavailable("the decider process is not running (it is being restarted): "
                              "retry")
        try:
            conn = self._connection()
            wire.send(conn, {"op": op, "args": list(args), "kwargs": kwargs})
            reply = wire.receive(conn)
        except (OSError, wire.Closed):
            self._drop()
            raise Unavailable("the decider process ended during the call (it is being "
                              "restarted): retry") from None
        if "error" in reply:
            kind = getattr(errors, str(reply["error"]), None)
            if isinstance(kind, type) and issubclass(kind, VaultError):
                raise kind(str(reply["message"]))
            raise RuntimeError(f"the decider failed ({reply['error']})")
        return reply["ok"]

    def _supervise(self) -> None:
        """Restart the child whenever it ends, until :meth:`close`."""
        while True:
            child = self._child
            code = child.proc.wait()
            if self._closing:
                return
            self._ready.clear()
            log.error("the decider process ended; restarting it", status=f"exit={code}")
            child.stop()
            while not self._closing:
                try:
                    self._restart()
                    break
                except (VaultError, OSError) as exc:
                    log.error("decider restart failed", error_type=type(exc).__name__)
                    time.sleep(RESTART_PAUSE)

    def _restart(self) -> None:
        self._child = _Child(self._config, self._workers)
        with self._lock:
            self._generation += 1
            loaded = list(self._loaded)
        self._restarter = threading.get_ident()
        try:
            self._pii = self._wrapped_pii() or self._pii
            if self._pii is not None:
                self._call("init_pii", self._pii)
            for cid, version in loaded:
                key = self._key_row(cid, version)
                if key is not None:
                    self._call("load", key)
        except VaultError:
            self._child.stop()
            raise
        finally:
            self._restarter = 0
        self._ready.set()
        log.info("decider process restarted", count=len(loaded))

    # -- the Decider protocol ------------------------------------------------------------

    def bind(self, wrapped_pii: Callable[[], bytes | None],
             key_row: Callable[[str, int], CollectionKeyRow | None]) -> None:
        """Where a restart re-reads the sealed keys: the store."""
        self._wrapped_pii, self._key_row = wrapped_pii, key_row

    def init_pii(self, wrapped: bytes | None) -> bytes | None:
        """See :meth:`vault.decider.Decider.init_pii`."""
        made: bytes | None = self._call("init_pii", wrapped)
        self._pii = made or wrapped
        return made

    def create_key(self, collection_id: str, key_version: int,
                   params: HeParams) -> tuple[bytes, bytes]:
        """See :meth:`vault.decider.Decider.create_key`."""
        public, sealed = self._call("create_key", collection_id, key_version, params)
        with self._lock:
            self._loaded[(collection_id, key_version)] = CollectionKeyRow(
                collection_id, key_version, params.to_json(), public, sealed)
        return public, sealed

    def load(self, key: CollectionKeyRow) -> None:
        """See :meth:`vault.decider.Decider.load`."""
        self._call("load", key)
        with self._lock:
            self._loaded[(key.collection_id, key.key_version)] = key

    def forget(self, collection_id: str, key_version: int) -> None:
        """See :meth:`vault.decider.Decider.forget`."""
        with self._lock:
            self._loaded.pop((collection_id, key_version), None)
        self._call("forget", collection_id, key_version)

    def decide(self, row: CollectionRow, parts: Sequence[ScoreCiphertext], top_k: int,
               release_scores: bool = False, threshold: float | None = None,
               decoy: bool = False) -> list[GroupScore]:
        """See :meth:`vault.decider.Decider.decide`."""
        out: list[GroupScore] = self._call("decide", row, list(parts), top_k, release_scores,
                                           threshold, decoy)
        return out

    def reencrypt(self, collection_id: str, key_version: int, masked: np.ndarray, ntt: bool,
                  moves: Moves, target_version: int,
                  lift_to: Sequence[int] = ()) -> np.ndarray:
        """See :meth:`vault.decider.Decider.reencrypt`."""
        out: np.ndarray = self._call("reencrypt", collection_id, key_version, masked, ntt,
                                     moves, target_version, list(lift_to))
        return out

    def transform(self, collection_id: str, key_version: int, dimension: int,
                  x: np.ndarray) -> np.ndarray:
        """See :meth:`vault.decider.Decider.transform`."""
        out: np.ndarray = self._call("transform", collection_id, key_version, dimension, x)
        return out

    def change(self, collection_id: str, from_version: int, to_version: int,
               dimension: int) -> np.ndarray:
        """See :meth:`vault.decider.Decider.change`."""
        out: np.ndarray = self._call("change", collection_id, from_version, to_version,
                                     dimension)
        return out

    def seal_subjects(self, collection_id: str,
                      items: Sequence[tuple[bytes, str]]) -> list[bytes]:
        """See :meth:`vault.decider.Decider.seal_subjects`."""
        out: list[bytes] = self._call("seal_subjects", collection_id, list(items))
        return out

    def open_subjects(self, collection_id: str,
                      items: Sequence[tuple[bytes, bytes]]) -> list[str]:
        """See :meth:`vault.decider.Decider.open_subjects`."""
        out: list[str] = self._call("open_subjects", collection_id, list(items))
        return out

    def close(self) -> None:
        """Stop the child (and its supervisor); remove its socket directory."""
        self._closing = True
        self._child.stop()
        self._watch.join(timeout=10)
        self._drop()

    def __repr__(self) -> str:
        return f"ProcessDecider(pid={os.getpid()} -> child)"
