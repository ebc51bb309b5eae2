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
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

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
        header = {"shape": list(residues[0].shape), "moduli": [int(q) for q in moduli],
                  "dtypes": [residue_dtype(q).str for q in moduli]}
        raw = MAGIC + json.dumps(header).encode()
        if len(raw) > _HEADER:
            raise ValueError("block header too large")
        digest = hashlib.sha256()
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                head = raw.ljust(_HEADER, b"\0")
                f.write(head)
                digest.update(head)
                for arr, q in zip(residues, moduli):
                    data = np.ascontiguousarray(arr, dtype=residue_dtype(q)).tobytes()
                    data += b"\0" * (_aligned(len(data)) - len(data))
                    f.write(data)
                    digest.update(data)
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
        digest = hashlib.sha256()
        with open(path, "rb") as f:
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
