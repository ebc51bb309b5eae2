"""One server per data directory: an exclusive lock on ``DIR/server.pid``.

Two servers on one directory would each load the same blocks and append to the same
audit chain: the second reported SERVING, then failed every call with a misleading
"audit log unavailable". The lock is ``flock``-based, so the kernel releases it however
the holder dies (SIGKILL included) and a stale file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vault.domain.errors import FailedPrecondition

LOCK_NAME = "server.pid"


class DataDirLock:
    """Held for the life of a server; :meth:`release` (or process exit) lets go."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> DataDirLock:
        """Take the lock, or raise FailedPrecondition naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FailedPrecondition(
                f"another vault server (pid {holder}) is using the data directory {self.path.parent}; "
                "stop it first, or give this one its own --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
