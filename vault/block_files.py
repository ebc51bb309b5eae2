"""Store role, part 2: encrypted blocks as files, memory-mapped for matching.

A block (D ciphertexts of N coefficients, see :mod:`vault.gallery.blocks`) is tens of
megabytes: too large to rewrite through SQLite's journal. Each block generation is one
file::

    DIR/blocks/<collection>/v<key version>/<block>-<generation>.blk

with a 4 KiB header (magic, then JSON: shape, primes, residue types) and, per prime, an
array (D, 2, N) of residues (uint64, or uint32 for primes below 2^32), each section
aligned to 4 KiB. A new generation is written to a temporary file, fsynced and renamed
before the database row that names it commits; the old file is removed after the commit
(zero-filled first when it held values that were erased). Files that no committed row
names (a crash between the two steps) are removed at start.

Reads always hash what they read, in the same pass, and the caller compares the digest
with the MAC-protected row: matching uses a private in-memory copy of the score prime's
residues (a file changed under a running server changes nothing it scores), and the
background jobs that need every prime read and check the whole file again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np

from vault.domain.errors import ResourceExhausted, Unavailable
from vault.he.poly import residue_dtype

MAGIC = b"VAULTBLK"
_HEADER = 4096
_ALIGN = 4096
_NAME = re.compile(r"^(?P<block>[0-9]+)-(?P<generation>[0-9]+)\.blk$")


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode(residues: Sequence[np.ndarray], moduli: Sequence[int]) -> Iterator[bytes]:
    """A block generation's bytes, header first: ``residues[l]`` is (D, 2, N) mod ``moduli[l]``."""
    header = {"shape": list(residues[0].shape), "moduli": [int(q) for q in moduli],
              "dtypes": [residue_dtype(q).str for q in moduli]}
    raw = MAGIC + json.dumps(header).encode()
    if len(raw) > _HEADER:
        raise ValueError("block header too large")
    yield raw.ljust(_HEADER, b"\0")
    for arr, q in zip(residues, moduli):
        data = np.ascontiguousarray(arr, dtype=residue_dtype(q)).tobytes()
        yield data + b"\0" * (_aligned(len(data)) - len(data))


def decode(f: BinaryIO, levels: int | None = None,
           as_stored: bool = False) -> tuple[list[np.ndarray], bytes]:
    """Parse a block generation's bytes: its first ``levels`` primes' residues (uint64, or
    ``as_stored`` in their stored type, uint32 for primes below 2^32) and the SHA-256 of
    everything read, computed in the same pass."""
    digest = hashlib.sha256()
    head = f.read(_HEADER)
    digest.update(head)
    if not head.startswith(MAGIC):
        raise ValueError("not a block file")
    header = json.loads(head[len(MAGIC):].rstrip(b"\0"))
    shape = tuple(header["shape"])
    out = []
    for level, dtype in enumerate(header["dtypes"]):
        dt = np.dtype(dtype)
        size = int(np.prod(shape)) * dt.itemsize
        raw = f.read(_aligned(size))
        if len(raw) != _aligned(size):
            raise ValueError("block file is truncated")
        digest.update(raw)
        if levels is None or level < levels:
            arr = np.frombuffer(raw, dt, int(np.prod(shape))).reshape(shape)
            out.append(arr if as_stored else arr.astype(np.uint64))  # read-only as stored
    if f.read(1):
        raise ValueError("block file has trailing data")
    return out, digest.digest()


class BlockStore(Protocol):
    """Where block generations live: files (:class:`BlockFiles`) or database rows
    (:class:`BlockBlobs`). A generation is named by ``path()`` (a file path, or the
    same relative name as a row key)."""

    def path(self, collection_id: str, key_version: int, block_no: int, generation: int) -> Path: ...
    def write(self, path: Path, residues: Sequence[np.ndarray], moduli: Sequence[int]) -> bytes: ...
    def read(self, path: Path, levels: int | None = None,
             as_stored: bool = False) -> tuple[list[np.ndarray], bytes]: ...
    def remove(self, path: Path, erase: bool = False) -> None: ...
    def sweep(self, keep: set[Path]) -> int: ...
    def erase_collection(self, collection_id: str) -> None: ...


class BlockFiles:
    """The block files of one data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, collection_id: str, key_version: int) -> Path:
        return self.root / collection_id / f"v{key_version}"

    def path(self, collection_id: str, key_version: int, block_no: int, generation: int) -> Path:
        return self.directory(collection_id, key_version) / f"{block_no}-{generation}.blk"

    def write(self, path: Path, residues: Sequence[np.ndarray], moduli: Sequence[int]) -> bytes:
        """Write one block generation durably; returns the SHA-256 of the file.

        ``residues[l]`` is (D, 2, N) residues mod ``moduli[l]``.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                for chunk in encode(residues, moduli):
                    f.write(chunk)
                    digest.update(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)  # nothing half-written stays, nor takes space
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceExhausted("storage is full: the data directory has no space left; "
                                        "nothing was written") from exc
            raise Unavailable(f"storage unavailable ({errno.errorcode.get(exc.errno or 0, 'I/O error')}); "
                              "nothing was written") from exc
        return digest.digest()

    @staticmethod
    def read(path: Path, levels: int | None = None,
             as_stored: bool = False) -> tuple[list[np.ndarray], bytes]:
        """Read a block file into memory: its first ``levels`` primes' (D, 2, N) residues
        (all by default, as uint64; ``as_stored``: in their stored type, uint32 for primes
        below 2^32) and the SHA-256 of the whole file."""
        with open(path, "rb") as f:
            return decode(f, levels, as_stored)

    @staticmethod
    def remove(path: Path, erase: bool = False) -> None:
        """Remove a block file; with ``erase``, overwrite it with zeros first (best effort:
        a copy-on-write or flash file system may keep the old bytes elsewhere)."""
        try:
            if erase:
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    zeros = b"\0" * (1 << 22)
                    for start in range(0, size, len(zeros)):
                        f.write(zeros[:min(len(zeros), size - start)])
                    f.flush()
                    os.fsync(f.fileno())
            path.unlink()
        except FileNotFoundError:
            pass

    def erase_collection(self, collection_id: str) -> None:
        """Zero-fill and remove every block file of a collection (crypto-shredding)."""
        root = self.root / collection_id
        if not root.exists():
            return
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.remove(path, erase=True)
        shutil.rmtree(root, ignore_errors=True)

    def sweep(self, keep: set[Path]) -> int:
        """Remove block files and temporaries that no committed row names (after a crash)."""
        removed = 0
        if not self.root.exists():
            return 0
        for path in self.root.rglob("*"):
            if path.is_file() and (path.suffix == ".tmp" or
                                   (_NAME.match(path.name) and path not in keep)):
                self.remove(path, erase=True)
                removed += 1
        return removed


class BlockBlobs:
    """Block generations as rows of the PostgreSQL table ``block_data`` (same bytes as a
    file, same digest), so that any node rebuilds its state from the database.

    A generation is written (committed on its own) before the row that names it commits,
    as a file is; a blob no committed row names is swept at start once it is an hour old
    (younger, it may be another replica's write in flight). A removed blob's bytes stay
    in dead row versions until VACUUM (maintenance runs it after an erasure) reuses them:
    PostgreSQL does not zero freed space (docs/SECURITY.md).
    """

    def __init__(self, store: Any) -> None:
        self._store = store
        self._engine = store.engine
        self._lock = store._lock

    def path(self, collection_id: str, key_version: int, block_no: int, generation: int) -> Path:
        return Path(collection_id, f"v{key_version}", f"{block_no}-{generation}.blk")

    def write(self, path: Path, residues: Sequence[np.ndarray], moduli: Sequence[int]) -> bytes:
        """Store one block generation (committed when this returns); its SHA-256."""
        data = b"".join(encode(residues, moduli))
        with self._lock:
            self._engine.execute(  # %b: the bytes go in binary, not hex-escaped
                "INSERT INTO block_data(name, data) VALUES (?, %b) ON CONFLICT (name) DO UPDATE "
                "SET data=excluded.data, written=now()", (str(path), data))
        return hashlib.sha256(data).digest()

    def read(self, path: Path, levels: int | None = None,
             as_stored: bool = False) -> tuple[list[np.ndarray], bytes]:
        """A block generation's residues and digest (FileNotFoundError if there is none)."""
        rows = self._store._query("SELECT data FROM block_data WHERE name=?", (str(path),))
        if not rows:
            raise FileNotFoundError(f"no block data {path}")
        return decode(io.BytesIO(rows[0][0]), levels, as_stored)

    def remove(self, path: Path, erase: bool = False) -> None:
        """Delete a generation's row (``erase``: its space is freed at the next VACUUM)."""
        with self._lock:
            self._engine.execute("DELETE FROM block_data WHERE name=?", (str(path),))

    def erase_collection(self, collection_id: str) -> None:
        """Delete every block generation of a collection."""
        with self._lock:
            self._engine.execute("DELETE FROM block_data WHERE starts_with(name, ?)",
                                 (collection_id + "/",))

    def sweep(self, keep: set[Path]) -> int:
        """Delete blobs that no committed row names and that are over an hour old."""
        names = [n for (n,) in self._store._query(
            "SELECT name FROM block_data WHERE written < now() - interval '1 hour'")]
        removed = 0
        for name in names:
            if Path(name) not in keep:
                self.remove(Path(name))
                removed += 1
        return removed
