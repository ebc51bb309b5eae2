"""Key custody: the token lives apart from the data, and each data directory is bound to it.

A copy of the data directory must be useless, so the SoftHSM token store and its PIN are
never inside it (:func:`check_layout`, at start). A data directory is bound to its token by
a check value only that token can compute (:func:`bind_token`), so pointing it at another
token is refused rather than half-working. And the token keeps, per data directory, the
sequence number of the latest signed audit checkpoint (:func:`guard_rollback`): a vault
started on an older copy of its directory refuses until an admin accepts the restore.

With the PostgreSQL store the database is shared and each node keeps its own audit log in
its own data directory: the binding and the store epoch are the database's (its random
id is in its meta table), the audit checkpoint counter is per node (``node_id`` in the
node's data directory), so a node that joins starts its own chain.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from vault.audit import AuditLog
from vault.domain.errors import Refused, WrongToken
from vault.keys.hsm import COUNTER_PREFIX, MAC
from vault.keys.integrity import encode
from vault.keys.roles import HsmRoles
from vault.store import Store

OLD_LAYOUT = "hsm"  # where the token used to live, inside the data directory
_STRAYS = ("tokens", "pin", "softhsm2.conf")  # an HSM directory's contents
_TOKENDIR = re.compile(r"^\s*directories\.tokendir\s*=\s*(.+?)\s*$", re.MULTILINE)


class RollbackDetected(Refused):
    """The data directory is older than the token says it should be."""


def default_hsm_dir(data_dir: Path) -> Path:
    """The embedded default's token store: a sibling of the data directory, ``<name>-hsm``."""
    data = data_dir.resolve()
    return data.parent / f"{data.name}-hsm"


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def softhsm_tokendir(conf: Path) -> Path | None:
    """The ``directories.tokendir`` a SoftHSM configuration file names, if readable."""
    try:
        found = _TOKENDIR.search(conf.read_text())
    except OSError:
        return None
    return Path(found.group(1)) if found else None


def check_layout(data_dir: Path, hsm_dir: Path | None) -> None:
    """Refuse a configuration where a copy of ``data_dir`` would carry the token or its PIN.

    ``hsm_dir`` is the embedded SoftHSM store (None with an external ``--hsm-module``).
    Symlinks are resolved: a link inside the data directory pointing out is fine, a link
    outside pointing in is not.
    """
    if (data_dir / OLD_LAYOUT).exists():
        raise Refused(f"the data directory {data_dir} still holds the SoftHSM token "
                      f"({OLD_LAYOUT}/): move it out with `vault hsm move --data-dir {data_dir} "
                      "--to DIR`, then start with --hsm-dir DIR")
    strays = [name for name in _STRAYS if (data_dir / name).exists()]
    if strays:  # e.g. hsm/provision.sh given the data directory: a token nobody refers to
        raise Refused(f"the data directory {data_dir} holds SoftHSM files ({', '.join(strays)}): "
                      "a copy of the data would carry them; move them to the HSM directory "
                      "(--hsm-dir) or delete them")
    places = {}
    if hsm_dir is not None:
        places["the HSM directory (--hsm-dir)"] = hsm_dir
        tokendir = softhsm_tokendir(hsm_dir / "softhsm2.conf")
        if tokendir is not None:
            places["the SoftHSM token store"] = tokendir
    conf = os.environ.get("SOFTHSM2_CONF")  # the embedded default sets its own
    if conf and hsm_dir is None:
        places["SOFTHSM2_CONF"] = Path(conf)
        tokendir = softhsm_tokendir(Path(conf))
        if tokendir is not None:
            places["the SoftHSM token store (SOFTHSM2_CONF)"] = tokendir
    pin_file = os.environ.get("VAULT_HSM_PIN_FILE")
    if pin_file:
        places["the PIN file (VAULT_HSM_PIN_FILE)"] = Path(pin_file)
    for what, path in places.items():
        if _inside(path, data_dir):
            raise Refused(f"{what} {path} is inside the data directory {data_dir}: a copy of the "
                          "data would carry the keys; keep the token and its PIN outside it "
                          "(--hsm-dir, VAULT_HSM_PIN_FILE)")


def _meta(store: Store, key: str) -> str | None:
    with store.transaction() as db:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else (row[0].decode() if isinstance(row[0], bytes) else str(row[0]))


def _set_meta(store: Store, key: str, value: str) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
                   "value=excluded.value", (key, value.encode()))


def vault_id(store: Store) -> str:
    """This data directory's random id (made at first start): names its rollback counter."""
    found = _meta(store, "vault_id")
    if found is None:
        found = secrets.token_hex(16)
        _set_meta(store, "vault_id", found)
    return found


def counter_label(vid: str) -> str:
    return COUNTER_PREFIX + vid


def node_id(data_dir: Path) -> str:
    """This node's random id, kept in its data directory (made at its first start)."""
    path = data_dir / "node_id"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(secrets.token_hex(16))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return path.read_text().strip()


def _labels(store: Store, audit: AuditLog) -> tuple[str, str]:
    """(audit checkpoint counter, store epoch counter) labels in the token. SQLite: one
    node per database, the labels of before. PostgreSQL: the audit counter is the node's."""
    label = counter_label(vault_id(store))
    if store.path is None:
        return f"{label}/node/{node_id(audit.path.parent)}", _store_label(label)
    return label, _store_label(label)


def _check_value(hsm: HsmRoles, vid: str) -> str:
    return hsm.hmac(MAC, encode("token-binding", vid)).hex()


def bind_token(store: Store, hsm: HsmRoles, new: bool) -> None:
    """Record (``new`` database) or compare the token's check value for this directory.

    The value is an HMAC inside the token over the directory's id, so neither a different
    token nor an edited id passes. A database from before bindings is bound on first start,
    unless the token already keeps rollback counters (it serves a bound vault: this
    directory's binding was removed, or it is not this token's).
    """
    vid = vault_id(store)
    expected = _meta(store, "token_binding")
    actual = _check_value(hsm, vid)
    if expected is None and not new and hsm.has_counters():
        raise WrongToken("wrong token: this data directory has no token binding and the token "
                         "belongs to another vault; start it with its own token (--hsm-dir)")
    if expected is None:
        _set_meta(store, "token_binding", actual)
    elif not secrets.compare_digest(expected, actual):
        raise WrongToken("wrong token: this data directory was bound to a different token; start "
                         "it with its own token (--hsm-dir / --hsm-module, --hsm-token)")


def guard_rollback(store: Store, hsm: HsmRoles, audit: AuditLog) -> None:
    """Refuse a directory older than the token's counter; then keep the counter in step.

    The counter moves only at signed checkpoints (every 64 audit entries and at close):
    no HSM call per request. The checkpoint row is written before the counter, so a crash
    between the two leaves the token behind the directory, never ahead of it.
    """
    label, store_label = _labels(store, audit)
    seen = hsm.counter(label)
    signed = audit.signed_seq
    if seen is not None and seen > signed:
        raise RollbackDetected(
            f"rollback detected: the token has seen audit checkpoint {seen}, this data "
            f"directory's last signed checkpoint is {signed} ({seen - signed} audit entries "
            f"back): it is an older copy. {_ACCEPT}")
    # The database alone restored (beside the current audit log) is as old: the token also
    # keeps the store's epoch, a MACed count of its write transactions.
    seen_epoch, epoch = hsm.counter(store_label), store.epoch()
    if seen_epoch is not None and seen_epoch > epoch:
        raise RollbackDetected(
            f"rollback detected: the token has seen store epoch {seen_epoch}, this data "
            f"directory's database is at epoch {epoch} ({seen_epoch - epoch} write "
            f"transactions back): vault.db is an older copy. {_ACCEPT}")
    hsm.set_counter(label, signed)
    hsm.set_counter(store_label, epoch)
    audit.on_checkpoint = _recorder(store, hsm, label, store_label)


_ACCEPT = ("If this restore is intended, run `vault restore --accept-rollback --data-dir DIR "
           "--hsm-dir HSM_DIR`")


def _store_label(label: str) -> str:
    return label + "/store"


def _recorder(store: Store, hsm: HsmRoles, label: str, store_label: str) -> Callable[[int], None]:
    """What a signed checkpoint records in the token: its seq and the store's epoch."""

    def record(seq: int) -> None:
        hsm.set_counter(label, seq)
        hsm.set_counter(store_label, store.epoch(verify=store.live_set is not None))

    return record


def accept_rollback(store: Store, hsm: HsmRoles, audit: AuditLog) -> tuple[int | None, int]:
    """Set the token's counter back to this directory's last checkpoint (an admin's
    decision) and record that in the audit log. Returns (token's value before, now)."""
    bind_token(store, hsm, new=False)
    label, store_label = _labels(store, audit)
    before = hsm.counter(label)
    hsm.set_counter(label, audit.signed_seq, backward=True)
    hsm.set_counter(store_label, store.epoch(verify=False), backward=True)
    audit.on_checkpoint = _recorder(store, hsm, label, store_label)
    audit.append("admin", secrets.token_hex(8), "cli", "AcceptRollback",
                 outcome=f"OK token counter {before} set back to {audit.signed_seq}")
    return before, audit.signed_seq
