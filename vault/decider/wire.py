"""The decider's framed protocol over a Unix socket: a JSON header, arrays as raw bytes.

A frame is ``<u32 header length><u32 buffer count>``, the header (UTF-8 JSON), one ``<u64>``
length per buffer, then the buffers. Arrays and byte strings travel as buffers (read into
place, never pickled); the header says what each is. Only the record types listed in
:data:`_TYPES` are rebuilt, and only plain numeric dtypes: a frame cannot construct
arbitrary objects on the other side.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
from typing import Any

import numpy as np

from vault.decider.release import GroupScore, Moves, ScoreCiphertext
from vault.domain.records import CollectionKeyRow, CollectionRow
from vault.he import HeParams

_PREFIX = struct.Struct("<II")
_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 16 << 20
_MAX_BUFFER = 8 << 30
_TYPES: dict[str, type] = {t.__name__: t for t in (Moves, GroupScore, CollectionRow,
                                                   CollectionKeyRow)}
_DTYPES = {"<u8", "<i8", "<i4", "<u4", "<f8", "<f4", "|u1", "|b1"}


class Closed(ConnectionError):
    """The other end closed the connection (or sent a malformed frame)."""


def _pack(obj: Any, bufs: list[memoryview]) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        bufs.append(arr.reshape(-1).view(np.uint8).data)
        return {"nd": len(bufs) - 1, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, (bytes, bytearray, memoryview)):
        bufs.append(memoryview(obj).cast("B"))
        return {"b": len(bufs) - 1}
    if isinstance(obj, (list, tuple)):
        return {"l": [_pack(x, bufs) for x in obj]}
    if isinstance(obj, HeParams):
        return {"he": obj.to_json()}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"m": {k: _pack(v, bufs) for k, v in obj.items()}}
    if isinstance(obj, ScoreCiphertext):  # the hot path's bulk: positions fit 32 bits,
        same = np.array_equal(obj.slots, obj.positions)  # and a block's slots are its positions
        return {"sc": {"data": _pack(_narrow(obj.data), bufs), "ntt": obj.ntt,
                       "positions": _pack(np.asarray(obj.positions, np.int32), bufs),
                       "groups": _pack(np.asarray(obj.groups, np.int32), bufs),
                       "slots": None if same else _pack(obj.slots, bufs),
                       "tier": int(obj.tier), "loc": int(obj.loc),
                       "low": _pack(_narrow(obj.low), bufs)}}  # the low digit's scores, or None
    name = type(obj).__name__
    if dataclasses.is_dataclass(obj) and _TYPES.get(name) is type(obj):
        return {"dc": name, "f": {f.name: _pack(getattr(obj, f.name), bufs)
                                  for f in dataclasses.fields(obj)}}
    raise TypeError(f"the decider's protocol does not carry {name}")


def _narrow(data: np.ndarray | None) -> np.ndarray | None:
    """Residues mod a score prime below 2^32 cross as uint32 (half the bytes)."""
    if data is not None and data.dtype == np.uint64 and data.size and int(data.max()) < 1 << 32:
        return data.astype(np.uint32)
    return data


def _widen(data: np.ndarray | None) -> np.ndarray | None:
    return data.astype(np.uint64) if data is not None and data.dtype == np.uint32 else data


def _unpack(obj: Any, bufs: list[memoryview]) -> Any:
    if not isinstance(obj, dict):
        return obj
    if "nd" in obj:
        if obj["dtype"] not in _DTYPES:
            raise Closed("refused dtype")
        return np.frombuffer(bufs[obj["nd"]], np.dtype(obj["dtype"])).reshape(obj["shape"])
    if "b" in obj:
        return bytes(bufs[obj["b"]])
    if "l" in obj:
        return [_unpack(x, bufs) for x in obj["l"]]
    if "he" in obj:
        return HeParams.from_json(obj["he"])
    if "sc" in obj:
        f = {k: _unpack(v, bufs) for k, v in obj["sc"].items()}
        f["positions"] = f["positions"].astype(np.int64)
        f["data"], f["low"] = _widen(f["data"]), _widen(f["low"])
        f["slots"] = f["positions"] if f["slots"] is None else f["slots"]
        return ScoreCiphertext(**f)
    if "dc" in obj and obj["dc"] in _TYPES:
        return _TYPES[obj["dc"]](**{k: _unpack(v, bufs) for k, v in obj["f"].items()})
    if "m" in obj:  # a plain mapping (a frame's top level)
        return {k: _unpack(v, bufs) for k, v in obj["m"].items()}
    raise Closed("malformed frame")


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Write one frame holding ``message`` (a mapping of str to carried values)."""
    bufs: list[memoryview] = []
    header = json.dumps({"m": {k: _pack(v, bufs) for k, v in message.items()}}).encode()
    pieces: list[bytes | memoryview] = [_PREFIX.pack(len(header), len(bufs)), header,
                                        b"".join(_LENGTH.pack(b.nbytes) for b in bufs)]
    for b in bufs:  # each buffer padded to 8 bytes, so arrays land aligned
        pieces += [b, bytes(-b.nbytes % 8)]
    small: list[bytes | memoryview] = []
    for piece in pieces:  # small pieces in one write, large ones without a copy
        if len(piece) < 1 << 16:
            small.append(piece)
            continue
        if small:
            sock.sendall(b"".join(small))
            small = []
        sock.sendall(piece)
    if small:
        sock.sendall(b"".join(small))


def _read(sock: socket.socket, n: int) -> bytearray:
    out = bytearray(n)
    view, got = memoryview(out), 0
    while got < n:
        k = sock.recv_into(view[got:], min(n - got, 1 << 24))
        if k == 0:
            raise Closed("connection closed")
        got += k
    return out


def receive(sock: socket.socket) -> dict[str, Any]:
    """Read one frame; :class:`Closed` at end of stream or on a malformed frame."""
    size, count = _PREFIX.unpack(_read(sock, _PREFIX.size))
    if size > _MAX_HEADER or count > 1 << 20:
        raise Closed("frame too large")
    header = json.loads(bytes(_read(sock, size)))
    lengths = struct.unpack(f"<{count}Q", _read(sock, 8 * count)) if count else ()
    padded = [n + (-n % 8) for n in lengths]
    if sum(padded) > _MAX_BUFFER:
        raise Closed("frame too large")
    payload = memoryview(_read(sock, sum(padded)))
    bufs, at = [], 0
    for n, step in zip(lengths, padded):
        bufs.append(payload[at:at + n])
        at += step
    try:
        out = _unpack(header, bufs)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise Closed("malformed frame") from exc
    if not isinstance(out, dict):
        raise Closed("malformed frame")
    return out
