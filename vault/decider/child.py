"""The decider process: ``python -m vault.decider.child SOCKET``, started by the server.

It reads its token configuration (module, token label, PIN) as one JSON line on stdin,
never from its command line or environment, opens its own PKCS#11 session, and answers
:mod:`vault.decider.wire` frames on ``SOCKET`` (mode 0600, in a directory of mode 0700
that its parent made). Only its parent process may talk to it: every connection's peer
is checked with SO_PEERCRED. It exits when its parent does: stdin reaches end of file
when the parent dies, however it dies (a SIGKILL included), and the parent id is also
watched, as the encryption workers do.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vault import logs
from vault.decider import wire
from vault.decider.keeper import Keeper
from vault.domain.errors import VaultError
from vault.gallery.workers import EncryptionPool
from vault.keys.hsm import Hsm, HsmConfig

log = logs.get("vault.decider")

# What a frame may call: the Decider protocol, nothing else of the keeper.
OPS = frozenset({"init_pii", "create_key", "load", "forget", "decide", "reencrypt",
                 "transform", "change", "seal_subjects", "open_subjects", "ping"})
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def _peer_pid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, _uid, _gid = _PEERCRED.unpack(raw)
    return int(pid)


def dispatch(keeper: Keeper, request: dict[str, Any]) -> dict[str, Any]:
    """One request's reply: ``{"ok": value}`` or ``{"error": class, "message": text}``."""
    op = request.get("op")
    if op not in OPS:
        return {"error": "InvalidArgument", "message": "unknown decider operation"}
    if op == "ping":
        return {"ok": os.getpid()}
    args, kwargs = request.get("args", []), request.get("kwargs", {})
    try:
        return {"ok": getattr(keeper, str(op))(*args, **kwargs)}
    except VaultError as exc:  # safe messages by convention (vault.domain.errors)
        return {"error": type(exc).__name__, "message": exc.message}
    except Exception as exc:  # noqa: BLE001 - the caller gets the kind, never the details
        log.error("decider operation failed", method=str(op), error_type=type(exc).__name__)
        return {"error": type(exc).__name__, "message": "the decider failed"}


def serve(path: Path, keeper: Keeper, parent: int) -> socketserver.ThreadingUnixStreamServer:
    """Bind ``path`` (0600) and answer frames from ``parent`` only, in the background."""

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            if _peer_pid(sock) != parent:
                log.warning("decider refused a connection from another process")
                return
            while True:
                try:
                    request = wire.receive(sock)
                except (wire.Closed, OSError):
                    return
                try:
                    wire.send(sock, dispatch(keeper, request))
                except TypeError:
                    wire.send(sock, {"error": "Internal", "message": "unsendable reply"})
                except OSError:
                    return

    old = os.umask(0o177)
    try:
        server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="decider-serve", daemon=True).start()
    return server


def _exit_with_parent(parent: int, path: Path) -> None:
    """Exit at once when the parent is gone (stdin at EOF, or re-parented)."""

    def gone() -> None:
        try:  # the socket and its private directory (made by the parent, empty otherwise)
            path.unlink()
            path.parent.rmdir()
        except OSError:
            pass
        os._exit(0)

    def stdin_watch() -> None:
        while sys.stdin.buffer.read(4096):
            pass
        gone()

    def ppid_watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        gone()

    threading.Thread(target=stdin_watch, name="stdin-watch", daemon=True).start()
    threading.Thread(target=ppid_watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    """Entry point (see the module docstring)."""
    logs.configure()
    path = Path(argv[0])
    parent = os.getppid()
    config = json.loads(sys.stdin.buffer.readline())
    hsm = Hsm(HsmConfig(config["module"], config["token_label"], config["pin"]))
    del config["pin"]
    workers = config.get("workers")
    pool = EncryptionPool(None if workers is None else int(workers))
    keeper = Keeper(hsm, encrypt=pool.encrypt, allow_override=False)
    _exit_with_parent(parent, path)
    serve(path, keeper, parent)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    threading.Event().wait()  # the watchers end the process
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
