"""Embedded default: a SoftHSM token provisioned in its own directory, apart from the data.

SoftHSM reads its configuration from ``SOFTHSM2_CONF`` once per process (at
``C_Initialize``), so this module writes the configuration, points the variable at it and
initialises the token with ``softhsm2-util`` on first start. The user PIN comes from
``VAULT_HSM_PIN``, else the file ``VAULT_HSM_PIN_FILE`` names (a Docker secret), else a
0600 file ``pin`` generated once next to the token. Whoever holds the token directory and
the PIN holds the keys: the server refuses to keep either inside its data directory
(:mod:`vault.custody`); a real HSM (``--hsm-module``) is the production answer.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

from vault.domain.errors import HsmUnavailable
from vault.keys.hsm import HsmConfig

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
DEFAULT_TOKEN_LABEL = "vault"

CONF_TEMPLATE = """\
# SoftHSM configuration written by the vault for the embedded default.
directories.tokendir = {tokendir}
objectstore.backend = file
log.level = ERROR
slots.removable = false
slots.mechanisms = ALL
library.reset_on_fork = true
"""


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def configure(hsm_dir: Path, create: bool = True) -> Path:
    """Write ``softhsm2.conf`` for a token store under ``hsm_dir`` and select it."""
    tokendir = hsm_dir / "tokens"
    if create:
        tokendir.mkdir(parents=True, exist_ok=True, mode=0o700)
    elif not tokendir.is_dir():
        raise HsmUnavailable("HSM unavailable: the SoftHSM token directory is missing")
    conf = hsm_dir / "softhsm2.conf"
    text = CONF_TEMPLATE.format(tokendir=tokendir.resolve())
    # Rewritten when it names another place: the directory was moved (`vault hsm move`).
    if not conf.exists() or conf.read_text() != text:
        _write_private(conf, text)
    os.environ["SOFTHSM2_CONF"] = str(conf.resolve())
    return conf


def read_pin(hsm_dir: Path | None, create: bool = True) -> str:
    """The user PIN: ``VAULT_HSM_PIN``, else the file ``VAULT_HSM_PIN_FILE``, else (the
    embedded default, ``hsm_dir`` given) ``hsm_dir/pin``, generated 0600 when ``create``."""
    pin = os.environ.get("VAULT_HSM_PIN")
    if pin:
        return pin
    secret = os.environ.get("VAULT_HSM_PIN_FILE")
    if secret:
        try:
            return Path(secret).read_text().strip()
        except OSError as exc:
            raise HsmUnavailable(f"HSM unavailable: cannot read VAULT_HSM_PIN_FILE "
                                 f"({type(exc).__name__})") from exc
    if hsm_dir is None:
        raise HsmUnavailable("HSM unavailable: set VAULT_HSM_PIN or VAULT_HSM_PIN_FILE")
    pin_file = hsm_dir / "pin"
    if not pin_file.exists():
        if not create:
            raise HsmUnavailable("HSM unavailable: the SoftHSM PIN file is missing")
        _write_private(pin_file, secrets.token_hex(16))
    return pin_file.read_text().strip()


def _token_exists(token_label: str) -> bool:
    out = subprocess.run(
        ["softhsm2-util", "--show-slots"], capture_output=True, text=True, check=False
    ).stdout
    return any(line.split(":", 1)[-1].strip() == token_label
               for line in out.splitlines() if line.strip().startswith("Label:"))


def provision(hsm_dir: Path, token_label: str = DEFAULT_TOKEN_LABEL,
              module: str = DEFAULT_MODULE, create: bool = True) -> HsmConfig:
    """Make sure a SoftHSM token exists under ``hsm_dir``; return how to reach it.

    Idempotent: a second call finds the token and the PIN file and changes nothing. With
    ``create=False`` (a database already exists) a missing token or PIN file is an error
    rather than a reason to make a new, empty token that could read nothing.
    """
    if shutil.which("softhsm2-util") is None or not os.path.exists(module):
        raise HsmUnavailable(
            "SoftHSM is not installed (apt-get install softhsm2), or pass --hsm-module"
        )
    if create:
        hsm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    configure(hsm_dir, create)
    pin = read_pin(hsm_dir, create)
    if not _token_exists(token_label):
        if not create:
            raise HsmUnavailable("HSM unavailable: token not found; not creating a new one "
                                 "for an existing database")
        so_pin = secrets.token_hex(16)  # not kept: token administration is re-provisioning
        result = subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", token_label,
             "--pin", pin, "--so-pin", so_pin],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            raise HsmUnavailable("could not initialise the SoftHSM token")
    return HsmConfig(module=module, token_label=token_label, pin=pin)
