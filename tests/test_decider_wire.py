"""The decider's framed protocol: what crosses the socket, and what is refused."""

from __future__ import annotations

import json
import socket
import struct

import numpy as np
import pytest

from vault import he
from vault.decider import Moves, ScoreCiphertext, wire
from vault.domain.records import CollectionRow


def _roundtrip(message: dict) -> dict:
    a, b = socket.socketpair()
    with a, b:
        wire.send(a, message)
        return wire.receive(b)


def test_arrays_records_and_score_ciphertexts_cross_intact() -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 2**63, (2, 1, 4096), dtype=np.uint64)
    slots = np.array([0, 5, 4095])
    block = ScoreCiphertext(data, False, slots.astype(np.int64), np.array([1, 2, 3], np.int32),
                            slots, 1, 7)
    page = ScoreCiphertext(data, True, slots.astype(np.int64) * 128,
                           np.array([4, 5, 6], np.int32), slots, 2, 9)
    moves = Moves(3, np.arange(4), np.arange(4) * 2, np.zeros(4, np.int64), np.arange(4))
    row = CollectionRow("c", 128, -0.0, 2, 1, b"\x00mac", None, "")
    got = _roundtrip({"parts": [block, page], "moves": moves, "row": row, "n": 3,
                      "x": np.linspace(0, 1, 5), "params": he.DEFAULT_PARAMS, "none": None,
                      "pairs": [(b"h", "id")]})
    for sent, back in zip((block, page), got["parts"], strict=True):
        assert np.array_equal(back.data, sent.data) and back.data.dtype == np.uint64
        assert np.array_equal(back.positions, sent.positions) and back.positions.dtype == np.int64
        assert np.array_equal(back.slots, sent.slots) and np.array_equal(back.groups, sent.groups)
        assert (back.ntt, back.tier, back.loc) == (sent.ntt, sent.tier, sent.loc)
    assert got["row"] == row and str(got["row"].threshold) == "-0.0"
    assert np.array_equal(got["moves"].src_pos, moves.src_pos) and got["moves"].targets == 3
    assert got["params"] == he.DEFAULT_PARAMS and got["none"] is None
    assert got["pairs"] == [[b"h", "id"]] and np.allclose(got["x"], np.linspace(0, 1, 5))
    assert got["x"].ctypes.data % 8 == 0  # read in place, aligned


class _Sink:
    """Counts what a frame's sender writes."""

    bytes = 0

    def sendall(self, piece: bytes | memoryview) -> None:
        self.bytes += len(piece) if isinstance(piece, bytes) else piece.nbytes


def test_score_residues_below_2_32_cross_in_half_the_bytes() -> None:
    """The 32-bit score prime's residues cross as uint32 and come back as the uint64
    values sent; residues of a wider prime cross as they are."""
    rng = np.random.default_rng(4)
    narrow = rng.integers(0, 2**32, (2, 1, 4096), dtype=np.uint64)
    narrow[1, 0, 7] = 2**32 - 1
    wide = narrow.copy()
    wide[0, 0, 3] = 2**32
    slots = np.arange(3, dtype=np.int64)
    sizes = []
    for data in (narrow, wide):
        part = ScoreCiphertext(data, False, slots, np.zeros(3, np.int32), slots, 1, 0, low=data)
        sink = _Sink()
        wire.send(sink, {"p": part})  # type: ignore[arg-type]
        sizes.append(sink.bytes)
        back = _roundtrip({"p": part})["p"]
        for got in (back.data, back.low):
            assert got.dtype == np.uint64 and np.array_equal(got, data)
    assert sizes[0] < sizes[1] - 2 * 4 * 8192 + 1024  # two arrays of 8,192 residues, 4 bytes less each


def test_a_frame_cannot_build_objects_or_unknown_types() -> None:
    with pytest.raises(TypeError, match="does not carry"):
        wire.send(socket.socketpair()[0], {"x": object()})
    for header in ({"m": {"x": {"nd": 0, "dtype": "|O", "shape": [1]}}},
                   {"m": {"x": {"dc": "Popen", "f": {}}}}):
        raw = json.dumps(header).encode()
        a, b = socket.socketpair()
        with a, b:
            a.sendall(struct.pack("<II", len(raw), 1) + raw + struct.pack("<Q", 8) + bytes(8))
            with pytest.raises(wire.Closed):
                wire.receive(b)
