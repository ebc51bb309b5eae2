"""Request decoding that never raises: undecodable bytes become INVALID_ARGUMENT."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError, Message


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's type.

    grpc-python answers INTERNAL ("Exception deserializing request!") when a deserializer
    raises, whatever it raises; so ours never raises and the handler refuses this instead,
    with INVALID_ARGUMENT: the fault is the client's bytes, not the server.
    """

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


def lenient(message: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return message.FromString(data)
        except DecodeError:  # garbage, truncated fields, bad UTF-8 in a string
            return Undecodable(message.DESCRIPTOR.full_name)
    return deserialize
