"""``vault import``: stream a .npz file of embeddings into a running vault.

The file holds ``embeddings`` (n, D) and ``subject_ids`` (n,), and optionally
``request_ids`` (n,); without them each item's request id is derived from the file's
digest and the item's position, so re-running the same import after an interruption
stores nothing twice. Progress (items sent): a bar on a terminal, a JSON log line per
tenth otherwise.
"""

from __future__ import annotations

import hashlib
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
              batch: int, shown: Progress, report: ImportReport
              ) -> Iterator[vault_pb2.ImportTemplatesRequest]:
    # Progress moves as items go out: gRPC's flow control keeps the sender close to the
    # server, which validates and transforms each message as it reads it. Storing (the
    # encryption) happens per chunk of up to 262,144 items, so results come in steps.
    for start in range(0, len(emb), batch):
        end = min(start + batch, len(emb))
        msg = vault_pb2.ImportTemplatesRequest(collection_id=collection_id)
        for i in range(start, end):
            msg.items.add(subject_id=subjects[i], embedding=emb[i], request_id=requests[i])
        yield msg
        shown.update(end, note=f"stored={report.stored + report.replayed} failed={report.failed}")
    log.info("all items sent; the vault encrypts and stores them", count=len(emb))


def run(collection_id: str, path: Path, batch: int, channel: grpc.Channel,
        progress: bool | None = None) -> ImportReport:
    """Import the file over ``channel``; returns what was stored (new and already stored)
    and what failed (by error message)."""
    emb, subjects, requests = load(path)
    report = ImportReport(total=len(emb))
    start = time.perf_counter()
    stub = vault_pb2_grpc.TemplateVaultStub(channel)
    with Progress(report.total, "sent", "tpl", bar=progress) as shown:
        for response in stub.ImportTemplates(
                _requests(collection_id, emb, subjects, requests, batch, shown, report)):
            for r in response.results:
                if r.code == 0 and r.replayed:
                    report.replayed += 1
                elif r.code == 0:
                    report.stored += 1
                else:
                    report.failed += 1
                    report.errors[r.message] = report.errors.get(r.message, 0) + 1
    report.seconds = time.perf_counter() - start
    return report
