"""The master key (HSM key-encryption key): rotation and rewrapping of everything it wraps."""

from __future__ import annotations

from vault import logs
from vault.core import Core
from vault.keys import envelope
from vault.keys.integrity import encode

log = logs.get("vault.ops.master_key")


def rotate_master_key(core: Core) -> tuple[int, int, list[int]]:
    """A new KEK version; everything wrapped is rewrapped under it; old versions that
    nothing refers to any more are destroyed in the token. No template is decrypted:
    only data keys pass through. Returns (version, rewrapped, destroyed versions)."""
    core.require_primary()  # a standby replica changes no gallery state
    with core.keys_lock:
        version = core.hsm.create_kek()
        log.info("master key version created", version=version)
        _, rewrapped, destroyed = _rewrap(core, )
    return version, rewrapped, destroyed


def rewrap_keys(core: Core) -> tuple[int, int, list[int]]:
    """Rewrap whatever is not under the current KEK version and destroy unreferenced old
    versions (finishes a master key rotation that was interrupted)."""
    core.require_primary()  # a standby replica changes no gallery state
    with core.keys_lock:
        return _rewrap(core, )


def _rewrap(core: Core) -> tuple[int, int, list[int]]:
    current = core.hsm.current_kek_version()
    changed = []
    for kind, key, blob in core.store.wrapped_blobs():
        aad = encode(kind, *key)
        if kind == "data-key" and core.hsm.wrapped_version(blob) != current:
            changed.append((kind, key, core.hsm.rewrap(blob, aad, current)))
        elif kind != "data-key" and envelope.sealed_kek_version(blob) != current:
            changed.append((kind, key, envelope.rewrap_sealed(core.hsm, blob, aad, current)))
    core.store.replace_wrapped_blobs(changed)
    # Everything this vault wraps is now under the current version (one token serves
    # one vault): the older versions protect nothing and go.
    destroyed = [v for v in core.hsm.versions("kek") if v != current]
    for version in destroyed:
        core.hsm.destroy_kek(version)
    log.info("keys rewrapped", version=current, count=len(changed), status=f"destroyed={destroyed}")
    return current, len(changed), destroyed


def master_key_versions(core: Core) -> tuple[list[int], int]:
    """KEK versions present in the token, and the current one."""
    return core.hsm.versions("kek"), core.hsm.current_kek_version()
