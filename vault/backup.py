"""``vault backup --to DIR``: a consistent snapshot of a data directory, taken while the
server runs, that holds no key.

``vault.db`` and ``audit.db`` are copied with SQLite's online backup API (a transaction-
consistent copy, WAL included, without stopping the writers). A block file is tens of MB
and lives outside SQLite: the snapshot copies the generation each block row of the
snapshotted ``vault.db`` names and checks it against the row's SHA-256. The server
replaces a block by writing a new generation and then removing (and, after an erasure,
zero-filling) the old one, so a file can change or go during the copy: then the database
is snapshotted again and only what differs is copied, until one snapshot's files are all
there and all match. ``vault.db`` is copied before ``audit.db``: the audit log may hold
entries for a few writes the snapshot does not, never the reverse.

Nothing of the HSM directory is read: the token, its PIN and the SoftHSM configuration
live apart (:mod:`vault.custody`), so the backup holds ciphertexts, MACs and wrapped keys
only. Restore: stop the server, put the snapshot's files in place of the data directory's,
run ``vault restore --accept-rollback`` (the token's rollback counter has moved past the
snapshot's audit checkpoint), and start the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from vault.block_files import BlockFiles
from vault.preflight import FAILED, CliError

DATABASES = ("vault.db", "audit.db")
MANIFEST = "BACKUP.json"
ATTEMPTS = 20


@dataclass
class BackupReport:
    blocks: int
    block_bytes: int
    rounds: int
    seconds: float


def _snapshot(source: Path, target: Path) -> None:
    """Copy one SQLite database with the online backup API (a consistent copy)."""
    tmp = target.with_suffix(".partial")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(tmp)
    try:
        # In one step: a WAL read transaction that writers do not wait for (in steps, any
        # write by the server between two of them would restart the copy).
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
    finally:
        dst.close()
        src.close()
    os.replace(tmp, target)


def _copy_checked(source: Path, target: Path, digest: bytes) -> bool:
    """Copy ``source`` to ``target`` if its SHA-256 is ``digest``; False if it is gone or
    changed meanwhile (a newer generation replaced it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    h = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                h.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        return False
    if h.digest() != digest:
        tmp.unlink()
        return False
    os.replace(tmp, target)
    return True


def _has_digest(path: Path, digest: bytes) -> bool:
    if not path.is_file():
        return False
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.digest() == digest


def _block_rows(db: Path) -> list[tuple[str, int, int, int, bytes]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute("SELECT collection_id, key_version, block_no, generation, digest "
                           "FROM blocks").fetchall()
    finally:
        con.close()


def backup(data_dir: Path, to: Path) -> BackupReport:
    """Snapshot ``data_dir`` into the empty or new directory ``to``."""
    start = time.perf_counter()
    if not (data_dir / "vault.db").is_file():
        raise CliError(f"--data-dir {data_dir}: no vault.db in it; give a vault's data directory")
    if to.exists() and any(to.iterdir()):
        raise CliError(f"--to {to} is not empty: give a new directory for each backup")
    if to.resolve().is_relative_to(data_dir.resolve()):
        raise CliError(f"--to {to} is inside the data directory: choose a place outside it")
    to.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = BlockFiles(to / "blocks")
    source = BlockFiles(data_dir / "blocks")
    mismatched: set[tuple[Path, bytes]] = set()
    for rounds in range(1, ATTEMPTS + 1):
        _snapshot(data_dir / "vault.db", to / "vault.db")
        rows = _block_rows(to / "vault.db")
        failed = set()
        for cid, version, block_no, generation, digest in rows:
            target = files.path(cid, version, block_no, generation)
            src = source.path(cid, version, block_no, generation)
            if not _has_digest(target, digest) and not _copy_checked(src, target, digest):
                failed.add((src, digest))  # replaced meanwhile: a newer snapshot names the new one
        damaged = {p for p, d in failed & mismatched if p.exists()}
        if damaged:  # the same row twice, its file there, its bytes not the row's
            shutil.rmtree(to)
            raise CliError(f"block file {min(damaged)} does not match its database row "
                           "(damaged or replaced behind the vault's back): nothing was kept; "
                           "the server reports it as DATA_LOSS", FAILED)
        mismatched = failed
        if not failed:
            break
    else:
        shutil.rmtree(to)
        raise CliError(f"the block files kept changing during {ATTEMPTS} snapshots; nothing "
                       "was kept: retry when the vault is less busy", FAILED)
    keep = {files.path(c, v, b, g) for c, v, b, g, _ in rows}
    total = 0
    for path in sorted((to / "blocks").rglob("*")) if (to / "blocks").exists() else []:
        if path.is_file() and path not in keep:
            path.unlink()  # an earlier round's generation that the last snapshot does not name
        elif path.is_file():
            total += path.stat().st_size
    if (data_dir / "audit.db").is_file():
        _snapshot(data_dir / "audit.db", to / "audit.db")
    report = BackupReport(len(rows), total, rounds, time.perf_counter() - start)
    (to / MANIFEST).write_text(json.dumps({
        "format": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "databases": [d for d in DATABASES if (to / d).exists()], "blocks": report.blocks,
        "block_bytes": report.block_bytes,
        "restore": "stop the server; replace the data directory's files with these (this "
                   "file aside); vault restore --accept-rollback; start the server"}, indent=2))
    return report
