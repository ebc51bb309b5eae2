"""Encryption workers die with the server, however it dies."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from vault.testing import ServerProcess


def _children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command (which may hold spaces) start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_sigkill_of_the_server_alone_leaves_no_worker(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", args=["--workers", "2"]).start()
    try:
        pid = server.proc.pid
        # The pool starts its workers at start-up (warm); spawn adds a resource tracker.
        assert _wait(lambda: len(_children(pid)) >= 2, 60), "workers never started"
        workers = _children(pid)
        os.kill(pid, signal.SIGKILL)  # the server only, not its process group
        server.proc.wait()
        server.proc = None
        assert _wait(lambda: not any(_alive(w) for w in workers), 30), \
            f"{sum(_alive(w) for w in workers)} worker(s) outlived the server"
    finally:
        server.stop()
