"""The PKCS#11 client against a real SoftHSM token."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vault.domain.errors import DataLoss, HsmUnavailable
from vault.keys import envelope
from vault.keys.hsm import INDEX, KEK, MAC, TRANSFORM, Hsm, HsmConfig, label


@pytest.mark.parametrize("name", [KEK, MAC, INDEX, TRANSFORM])
def test_keys_live_in_the_token_and_cannot_leave(hsm: Hsm, name: str) -> None:
    attrs = hsm.key_attributes(label(name, 1))
    assert attrs == {"extractable": False, "sensitive": True, "token": True}


def test_ensure_keys_is_idempotent(hsm: Hsm) -> None:
    assert hsm.ensure_keys() == []
    assert hsm.versions(KEK) == [1]


def test_wrap_round_trip_and_binding(hsm: Hsm) -> None:
    blob = hsm.wrap(b"k" * 32, b"purpose-a")
    assert b"k" * 32 not in blob
    assert hsm.wrapped_version(blob) == 1
    assert hsm.unwrap(blob, b"purpose-a") == b"k" * 32
    with pytest.raises(DataLoss):
        hsm.unwrap(blob, b"purpose-b")  # moved to another purpose
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(DataLoss):
        hsm.unwrap(bytes(flipped), b"purpose-a")


def test_two_wraps_of_the_same_key_differ(hsm: Hsm) -> None:
    assert hsm.wrap(b"k" * 32, b"x") != hsm.wrap(b"k" * 32, b"x")


def test_hmac_is_deterministic_and_keyed(hsm: Hsm) -> None:
    assert hsm.hmac(MAC, b"data") == hsm.hmac(MAC, b"data")
    assert hsm.hmac(MAC, b"data") != hsm.hmac(INDEX, b"data")
    assert len(hsm.hmac(MAC, b"data")) == 32


def test_envelope_seal_open(hsm: Hsm) -> None:
    secret = b"ckks secret context" * 1000
    sealed = envelope.seal(hsm, secret, b"aad")
    assert secret[:32] not in sealed
    assert envelope.open_sealed(hsm, sealed, b"aad") == secret
    with pytest.raises(DataLoss):
        envelope.open_sealed(hsm, sealed, b"other")
    tampered = bytearray(sealed)
    tampered[len(tampered) // 2] ^= 0x40
    with pytest.raises(DataLoss):
        envelope.open_sealed(hsm, bytes(tampered), b"aad")


def test_wrong_pin_is_unavailable_and_says_so(hsm_config: HsmConfig) -> None:
    # PKCS#11 login state is per process: try the wrong PIN from a fresh one.
    code = (
        "from vault.keys.hsm import Hsm, HsmConfig\n"
        "from vault.domain.errors import HsmUnavailable\n"
        f"h = Hsm(HsmConfig({hsm_config.module!r}, {hsm_config.token_label!r}, 'wrong-pin'))\n"
        "try:\n    h.ping()\nexcept HsmUnavailable as e:\n    print(e.message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                         env=os.environ, timeout=60)
    assert out.stdout.strip() == "HSM unavailable: the token rejected the PIN"


def test_missing_module_is_unavailable(hsm_config: HsmConfig) -> None:
    with pytest.raises(HsmUnavailable, match="module"):
        Hsm(HsmConfig("/nonexistent/libpkcs11.so", "x", "1")).ping()


def test_unknown_token_is_unavailable(hsm_config: HsmConfig) -> None:
    with pytest.raises(HsmUnavailable, match="token"):
        Hsm(HsmConfig(hsm_config.module, "no-such-token", hsm_config.pin)).ping()


def test_config_repr_hides_the_pin(hsm_config: HsmConfig) -> None:
    assert hsm_config.pin not in repr(hsm_config)


def test_a_session_closed_under_a_client_is_reopened_once(hsm: Hsm, hsm_config: HsmConfig) -> None:
    """Two clients in one process share the PKCS#11 library: when one reopens its session
    (it re-initialises the library to re-read the token store), the other's session handle
    becomes invalid. Its next call runs on a fresh session instead of failing."""
    a, b = Hsm(hsm_config), Hsm(hsm_config)
    try:
        first = a.hmac(MAC, b"x")
        b.ping()
        b.close()
        b.ping()  # reopens: the library is re-initialised, a's session handle is gone
        assert a.hmac(MAC, b"x") == first
    finally:
        a.close()
        b.close()
