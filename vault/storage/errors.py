"""Storage's own refinement of the domain errors."""

from __future__ import annotations

from vault.domain.errors import Unavailable


class CommitUnknown(Unavailable):
    """The connection was lost at COMMIT and the database did not say whether the
    transaction committed: what it wrote must be neither trusted nor undone."""
