"""Structured JSON logs (structlog) with an allow-list of fields.

Only the fields in :data:`ALLOWED_FIELDS` ever reach the output; anything else a caller
binds (an embedding, a subject id, a score, an exception's repr) is dropped, so a mistake
in a log call cannot leak biometric or personal data. Exceptions are logged by type name.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

ALLOWED_FIELDS = frozenset({
    "event", "level", "timestamp", "logger_name",
    "method", "code", "duration_ms", "peer_local",
    "collection_id", "key_version", "dimension", "count", "template_count", "blocks",
    "kind", "listen", "data_dir", "tls", "error_type", "ref", "status", "version",
    "blocks_done", "blocks_total", "hsm_dir", "term",
})


def _allow_list(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    exc = event.pop("exc_info", None)
    if exc and "error_type" not in event:
        err = exc[1] if isinstance(exc, tuple) else exc
        if isinstance(err, BaseException):
            event["error_type"] = type(err).__name__
    return {k: v for k, v in event.items() if k in ALLOWED_FIELDS}


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send JSON lines to ``stream`` (stderr by default)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _allow_list,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> structlog.typing.FilteringBoundLogger:
    """The logger of module ``name`` (its events carry ``logger_name``)."""
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(logger_name=name)
    return logger
