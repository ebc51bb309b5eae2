"""``vault --config FILE.toml`` (or env ``VAULT_CONFIG``): option defaults from a TOML file.

``[serve]`` holds ``vault serve``'s options by their flag names (``rate-limit = 200``,
``data-dir = "/data"``; ``_`` may stand for ``-``) and ``hsm-pin-file`` (the PIN itself is
a secret: never in a config file); the data-directory commands (``audit``, ``backup``,
``restore``, ``hsm move``) take the ones they share with it. ``[client]`` holds the client
commands' ``target``, ``tls-ca``, ``tls-cert`` and ``tls-key``. Precedence: a flag, then
its environment variable, then the file, then the built-in default. An unknown section or
key, or a value of the wrong kind, is refused naming the file and the key; a value of the
right kind goes through the option's own check, so a bad one names the key as well.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Iterator
from typing import Any

from vault.preflight import CliError, FromEnv, readable_file, tag

CLIENT_KEYS = ("target", "tls-ca", "tls-cert", "tls-key")
# Not an option of serve, read from the environment where the token is opened.
PIN_FILE_KEY, PIN_FILE_VAR = "hsm-pin-file", "VAULT_HSM_PIN_FILE"
# A client's --target falls back on the server's VAULT_LISTEN: the file's target beats that.
_FALLBACK = {"target": "VAULT_LISTEN"}


def path_from(argv: list[str]) -> str | None:
    """The config file named by ``--config FILE`` anywhere in ``argv``, else VAULT_CONFIG."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.environ.get("VAULT_CONFIG") or None


def load(path: str) -> dict[str, dict[str, Any]]:
    """The file's sections, keys spelt as flags; CliError naming what is wrong."""
    where = source_name(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise CliError(f"{where}: no such file") from None
    except OSError as exc:
        raise CliError(f"{where}: cannot read it ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{where}: not valid TOML ({exc})") from None
    sections: dict[str, dict[str, Any]] = {}
    for name, table in data.items():
        if name not in ("serve", "client"):
            raise CliError(f"{where}: unknown {'section' if isinstance(table, dict) else 'key'}"
                           f" {name!r}: options go under [serve] or [client]")
        if not isinstance(table, dict):
            raise CliError(f"{where}: {name} must be a section ([{name}])")
        sections[name] = {key.replace("_", "-"): value for key, value in table.items()}
    return sections


def source_name(path: str) -> str:
    return f"--config {path}"


def apply(parser: argparse.ArgumentParser, sections: dict[str, dict[str, Any]],
          path: str) -> None:
    """Make the file's values the defaults of every (sub)command that has the option,
    unless its environment variable is set (the variable wins)."""
    parsers = dict(_walk(parser, ()))
    serve_options = _options(parsers[("serve",)])
    known = {"serve": {*serve_options, PIN_FILE_KEY}, "client": set(CLIENT_KEYS)}
    for name, table in sections.items():
        for key in table:
            if key not in known[name]:
                raise CliError(f"{source_name(path)}: unknown key {key!r} in [{name}] "
                               f"(known: {', '.join(sorted(known[name]))})")
    serve = dict(sections.get("serve", {}))
    pin_file = serve.pop(PIN_FILE_KEY, None)
    if pin_file is not None:
        if not isinstance(pin_file, str):
            raise CliError(f"{source_name(path)}: [serve] {PIN_FILE_KEY} must be a string")
        if PIN_FILE_VAR not in os.environ:  # the variable, when set, wins
            readable_file(tag(pin_file, f"{source_name(path)} [serve] {PIN_FILE_KEY}"), "")
            os.environ[PIN_FILE_VAR] = pin_file
    client = dict(sections.get("client", {}))
    for route, sub in parsers.items():
        options = _options(sub)
        if "target" in options:
            table, section = dict(client), "client"
            if route == ("health",) and "health-listen" in serve:
                table["target"], section = serve["health-listen"], "serve"
        else:
            table, section = serve, "serve"
        for key, value in table.items():
            action = options.get(key)
            if action is None or action.default is argparse.SUPPRESS:
                continue
            if isinstance(action.default, FromEnv) and action.default.env != _FALLBACK.get(key):
                continue  # the option's environment variable was set: it wins over the file
            if isinstance(action, argparse._StoreTrueAction):
                if not isinstance(value, bool):
                    raise CliError(f"{source_name(path)}: [{section}] {key} must be true "
                                   "or false")
                action.default = value
            else:
                action.default = _text(value, action, path, section, key)


def _text(value: Any, action: argparse.Action, path: str, section: str, key: str) -> FromEnv:
    """A TOML value as the string the option's type parses, tagged with its key."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise CliError(f"{source_name(path)}: [{section}] {key} must be "
                       f"{'a string' if action.type is None else 'a number or a string'}")
    if action.type is None and not isinstance(value, str):
        raise CliError(f"{source_name(path)}: [{section}] {key} must be a string")
    return tag(str(value), f"{source_name(path)} [{section}] {key}")


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's long options by name without dashes (help and config left out)."""
    found = {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag not in ("--help", "--config", "--version"):
                found[flag[2:]] = action
    return found


def _walk(parser: argparse.ArgumentParser, route: tuple[str, ...]
          ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser with its command words."""
    yield route, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*route, name))

