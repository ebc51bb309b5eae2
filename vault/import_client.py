"""``vault import``: stream a .npz file of embeddings into a running vault.

The file holds ``embeddings`` (n, D) and ``subject_ids`` (n,), and optionally
``request_ids`` (n,); without them each item's request id is derived from the file's
digest and the item's position, so re-running the same import after an interruption
stores nothing twice, and says so ("0 new, N already stored"). Progress (items sent, then
items answered, per chunk): bars on a terminal, a JSON log line per tenth otherwise.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from vault import logs
from vault.progress import Progress
from vault.v1 import vault_pb2, vault_pb2_grpc

log = logs.get("vault.import")

HEARTBEAT = 10.0  # seconds between "still encrypting" notes once everything is sent


@dataclass
class ImportReport:
    total: int
    stored: int = 0  # new templates
    replayed: int = 0  # items whose request id had stored them before (a re-run)
    failed: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # message -> count

    @property
    def rate(self) -> float:
        return self.stored / self.seconds if self.seconds else 0.0


def load(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, subject ids, request ids) from a .npz file."""
    with np.load(path, allow_pickle=False) as data:
        if "embeddings" not in data or "subject_ids" not in data:
            raise ValueError("the file must hold arrays 'embeddings' and 'subject_ids'")
        emb = np.asarray(data["embeddings"], dtype=np.float32)
        subjects = np.asarray(data["subject_ids"]).astype(str)
        if "request_ids" in data:
            requests = np.asarray(data["request_ids"]).astype(str)
        else:
            tag = hashlib.sha256(emb.tobytes() + "\0".join(subjects).encode()).hexdigest()[:16]
            requests = np.array([f"import-{tag}-{i}" for i in range(len(emb))])
    if emb.ndim != 2 or len(subjects) != len(emb) or len(requests) != len(emb):
        raise ValueError("embeddings must be (n, D) with one subject id and request id per row")
    return emb, subjects, requests


def _requests(collection_id: str, emb: np.ndarray, subjects: np.ndarray, requests: np.ndarray,
              batch: int, sent: Progress, all_sent: threading.Event
              ) -> Iterator[vault_pb2.ImportTemplatesRequest]:
    # "sent" moves as items go out: gRPC's flow control keeps the sender close to the
    # server, which validates and transforms each message as it reads it.
    for start in range(0, len(emb), batch):
        end = min(start + batch, len(emb))
        msg = vault_pb2.ImportTemplatesRequest(collection_id=collection_id)
        for i in range(start, end):
            msg.items.add(subject_id=subjects[i], embedding=emb[i], request_id=requests[i])
        yield msg
        sent.update(end)
    all_sent.set()
    log.info("all items sent; the vault encrypts and stores them", count=len(emb))


def _note(report: ImportReport) -> str:
    return f"new={report.stored} already={report.replayed} failed={report.failed}"


def run(collection_id: str, path: Path, batch: int, channel: grpc.Channel,
        progress: bool | None = None, heartbeat: float = HEARTBEAT) -> ImportReport:
    """Import the file over ``channel``; returns what was stored (new and already stored)
    and what failed (by error message).

    Two progress lines: ``sent`` (items the vault has read and checked) and ``answered``
    (items with a result: errors and items stored before at once, new items as each chunk
    of up to 262,144 is encrypted and written, so it moves per chunk). While the vault
    encrypts a chunk after everything was sent, ``answered`` says so every ``heartbeat``
    seconds rather than sitting still."""
    emb, subjects, requests = load(path)
    report = ImportReport(total=len(emb))
    start = time.perf_counter()
    stub = vault_pb2_grpc.TemplateVaultStub(channel)
    all_sent, finished = threading.Event(), threading.Event()
    with Progress(report.total, "sent", "tpl", bar=progress) as sent, \
            Progress(report.total, "answered", "tpl", bar=progress, position=1) as answered:

        def waiting() -> None:
            all_sent.wait()
            while not finished.wait(heartbeat):
                pending = report.total - answered.done
                answered.still(f"{_note(report)}; the vault is encrypting and storing "
                               f"{pending} items ({time.perf_counter() - start:.0f} s)")

        beat = threading.Thread(target=waiting, daemon=True)
        beat.start()
        try:
            for response in stub.ImportTemplates(
                    _requests(collection_id, emb, subjects, requests, batch, sent, all_sent)):
                for r in response.results:
                    if r.code == 0 and r.replayed:
                        report.replayed += 1
                    elif r.code == 0:
                        report.stored += 1
                    else:
                        report.failed += 1
                        report.errors[r.message] = report.errors.get(r.message, 0) + 1
                answered.update(report.stored + report.replayed + report.failed,
                                note=_note(report))
        finally:
            finished.set()
            all_sent.set()
            beat.join()
    report.seconds = time.perf_counter() - start
    return report
