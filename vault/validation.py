"""Validation of request fields: every check names the field, never its value."""

from __future__ import annotations

import math
import re
import unicodedata

from vault.domain.errors import InvalidArgument
from vault.protector import MAX_DIMENSION, MIN_DIMENSION

MAX_TOP_K = 10  # the decider releases no more (vault.decider.MAX_TOP_K)
MAX_SUBJECT_ID_BYTES = 256
MAX_REQUEST_ID_BYTES = 128
_COLLECTION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_collection_id(value: str) -> str:
    if not value:
        raise InvalidArgument("collection_id is empty")
    if not _COLLECTION_ID.fullmatch(value):  # match() with '$' would let 'id\n' through
        raise InvalidArgument(
            "collection_id must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def _check_text_id(value: str, name: str, limit: int, required: bool) -> str:
    if not value:
        if required:
            raise InvalidArgument(f"{name} is empty")
        return value
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise InvalidArgument(f"{name} is {size} bytes long, at most {limit} are allowed")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidArgument(f"{name} contains control characters or lone surrogates")
    return value


# Control (Cc), format (Cf: zero-width and bidi marks), surrogate (Cs), private-use (Co)
# and unassigned (Cn) characters, line and paragraph separators: invisible or unstable,
# they would make two ids that read the same name two subjects.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def check_subject_id(value: str) -> str:
    """The subject id in NFC form (so that NFC and NFD spellings are one subject);
    INVALID_ARGUMENT for control, format (zero-width, bidi), private-use or unassigned
    characters. Every path where a subject id enters uses the value this returns."""
    _check_text_id(value, "subject_id", MAX_SUBJECT_ID_BYTES, required=True)
    if any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in value):
        raise InvalidArgument("subject_id contains invisible characters (control, format such "
                              "as zero-width or bidi marks, private-use or unassigned)")
    normal = unicodedata.normalize("NFC", value)
    return _check_text_id(normal, "subject_id", MAX_SUBJECT_ID_BYTES, required=True)


def check_request_id(value: str) -> str:
    return _check_text_id(value, "request_id", MAX_REQUEST_ID_BYTES, required=False)


def check_threshold(value: float) -> float:
    if not math.isfinite(value) or not -1.0 <= value <= 1.0:
        raise InvalidArgument("threshold must be a number in [-1, 1]")
    return float(value) + 0.0  # -0.0 becomes 0.0: SQLite stores it so, and the row's MAC must hold


def check_top_k(value: int) -> int:
    if value == 0:
        return 1
    if not 1 <= value <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be between 1 and {MAX_TOP_K}")
    return value


def check_dimension(value: int) -> int:
    if not MIN_DIMENSION <= value <= MAX_DIMENSION:
        raise InvalidArgument(f"dimension must be between {MIN_DIMENSION} and {MAX_DIMENSION}")
    return value


MAX_PURPOSE = 128


def check_purpose(value: str) -> str:
    """A search purpose (case reference): empty, or 1..128 printable characters."""
    if len(value) > MAX_PURPOSE:
        raise InvalidArgument(f"purpose must be at most {MAX_PURPOSE} characters")
    if not value.isprintable():
        raise InvalidArgument("purpose must not contain control characters")
    return value
