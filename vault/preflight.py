"""Checks the command line makes before it acts, so that a fault of the environment is one
line naming what is wrong and what to do, not a traceback: option and environment values,
addresses, files, directories and ports.

Exit codes of ``vault`` (also in ``vault --help``): 0 done; 1 the operation failed (an
RPC's error, a failed check, items not stored); 2 bad usage or configuration, nothing
was done; 3 the vault cannot be reached or is not serving.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3

EXIT_CODES = ("exit codes: 0 done; 1 the operation failed (an RPC's error, a failed check, "
              "items not stored); 2 bad usage or configuration, nothing done; 3 the vault "
              "cannot be reached or is not serving")


class CliError(Exception):
    """A failure the command explains in one line, with its exit code."""

    def __init__(self, message: str, code: int = USAGE) -> None:
        super().__init__(message)
        self.message, self.code = message, code


class FromEnv(str):
    """An option's default read from an environment variable (``env`` is its name) or a
    config file (``env`` names the file and key): a bad value names where it came from."""

    env: str


def tag(value: str, where: str) -> FromEnv:
    """``value`` tagged with where it was read (a variable, a config file's key)."""
    tagged = FromEnv(value)
    tagged.env = where
    return tagged


def env(name: str, default: str | None) -> str | None:
    """The value of ``name`` (tagged with its name), else ``default``."""
    value = os.environ.get(name)
    return default if value is None else tag(value, name)


def source(text: object, option: str) -> str:
    """Where ``text`` came from, for a message: its variable or config key, else ``option``."""
    return text.env if isinstance(text, FromEnv) else option


def _source(text: str) -> str:
    return f"{text.env}={text!r}" if isinstance(text, FromEnv) else repr(text)


def boolean(value: object, option: str) -> bool:
    """A switch given as a flag (True), a variable ("1"/"0", "true"/"false") or a config
    boolean; anything else is refused naming where it came from."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise CliError(f"{_source(value) if isinstance(value, FromEnv) else option}: "
                   "give 1 or 0 (true or false)")


def number(kind: type[int | float], minimum: float | None = 0) -> Callable[[str], float]:
    """An argparse type: ``kind`` at least ``minimum``; the error names an env variable."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_source(text)} is not {what}") from None
        if math.isnan(value) or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{_source(text)} must be {what} >= {minimum}")
        return value

    parse.__name__ = kind.__name__
    return parse


def host_port(text: str) -> str:
    """An argparse type for HOST:PORT: a missing or bad port is refused (no silent 443)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or host.endswith(":") and not host.startswith("["):
        raise argparse.ArgumentTypeError(
            f"{_source(text)} has no port: give HOST:PORT, for example 127.0.0.1:50051")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{_source(text)}: the port must be a number 0-65535")
    return str(text)


def readable_file(path: str | None, option: str) -> Path | None:
    """``path`` as a Path after checking it can be read; the error names the option."""
    if not path:
        return None
    p, where = Path(path), source(path, option)
    if not p.is_file():
        raise CliError(f"{where} {path}: no such file")
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise CliError(f"{where} {path}: cannot read it ({exc.strerror})") from None
    return p


def writable_dir(path: Path, option: str) -> None:
    """Create ``path`` if missing and prove this process can write in it (a root-owned
    volume, a read-only mount, a file in the way): else one line saying what to do."""
    uid = os.getuid()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError:
        raise CliError(f"{option} {path} is a file, not a directory: choose another") from None
    except OSError as exc:
        raise CliError(f"{option} {path}: cannot create it ({exc.strerror}); create it for "
                       f"uid {uid} or choose another") from None
    if not path.is_dir():
        raise CliError(f"{option} {path} is not a directory: choose another")
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        owner = path.stat().st_uid
        if exc.errno == errno.EROFS:
            raise CliError(f"{option} {path} is on a read-only file system: mount it "
                           "read-write or choose another") from None
        raise CliError(f"{option} {path} is not writable by this process (uid {uid}; the "
                       f"directory belongs to uid {owner}): chown {uid} {path}, or run as "
                       "its owner") from None


def bindable(listen: str, option: str) -> None:
    """Bind HOST:PORT once and let go, to name the reason a server could not listen."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise CliError(f"{option} {listen}: cannot resolve the host {host!r}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        # As gRPC binds: a port left in TIME_WAIT by a stopped server is free, a listener not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CliError(f"{option} {listen}: the address is in use (another vault or "
                               "program listens there): stop it or choose another port") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise CliError(f"{option} {listen}: no interface of this machine has that "
                               "address") from None
            if exc.errno == errno.EACCES:
                raise CliError(f"{option} {listen}: ports below 1024 need privileges; choose "
                               "a higher port") from None
            raise CliError(f"{option} {listen}: cannot listen ({exc.strerror})") from None


def environment() -> None:
    """The variables read outside the option parser, checked before anything starts: each
    bad value is one line naming the variable (VAULT_HSM_PIN_FILE: after the layout check,
    which refuses a PIN file inside the data directory first)."""
    readable_file(env("VAULT_BUDGET_CLOCK_FILE", None), "VAULT_BUDGET_CLOCK_FILE")
    interval = env("VAULT_AUDIT_REFUSED_INTERVAL", None)
    if interval is not None:
        try:
            number(float)(interval)
        except argparse.ArgumentTypeError as exc:
            raise CliError(str(exc)) from None
