"""The rollback counter: a private data object in the real SoftHSM token that only moves
forward, and survives a crash between writing the new value and destroying the old."""

from __future__ import annotations

import secrets

import pkcs11
from pkcs11 import Attribute, ObjectClass

from vault.keys.hsm import COUNTER_PREFIX, Hsm


def test_counter_moves_only_forward_unless_told(hsm: Hsm) -> None:
    name = COUNTER_PREFIX + secrets.token_hex(8)
    assert hsm.counter(name) is None
    assert hsm.set_counter(name, 64) == 64
    assert hsm.set_counter(name, 10) == 64  # an older directory cannot wind it back
    assert hsm.counter(name) == 64
    assert hsm.set_counter(name, 128) == 128
    assert hsm.set_counter(name, 70, backward=True) == 70  # `vault restore --accept-rollback`
    assert hsm.counter(name) == 70
    assert hsm.has_counters()


def test_counter_is_a_private_token_object(hsm: Hsm) -> None:
    name = COUNTER_PREFIX + secrets.token_hex(8)
    hsm.set_counter(name, 5)
    hsm.set_counter(name, 6)

    def objects(session: pkcs11.Session) -> list:
        return list(session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: name}))

    found = hsm._call(objects)  # the old value was destroyed once the new one existed
    assert len(found) == 1
    assert found[0][Attribute.TOKEN] and found[0][Attribute.PRIVATE]

    def crash_leftover(session: pkcs11.Session) -> None:  # a second object, as after a crash
        session.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.TOKEN: True,
                               Attribute.PRIVATE: True, Attribute.LABEL: name,
                               Attribute.VALUE: (3).to_bytes(8, "big")})

    hsm._call(crash_leftover)
    assert hsm.counter(name) == 6  # readers take the larger
    assert hsm.set_counter(name, 9) == 9 and len(hsm._call(objects)) == 1
