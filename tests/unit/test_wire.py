from __future__ import annotations

import struct

import msgpack
import pytest

from shardudp import wire
from shardudp.errors import WireError

ALL = [
    wire.Hello(slot=3, incarnation=9, pid=1234),
    wire.Ready(pid=1234, listeners=["a", "b"]),
    wire.Heartbeat(seq=77),
    wire.MetricsReport(
        slot=1, incarnation=2, seq=3, listeners={"udp": {"rx_datagrams": 5, "errors": {"value": 1}}}
    ),
    wire.BootFailed(reason="cannot import 'x'"),
    wire.Stop(timeout=2.5, drain=True),
    wire.Stop(timeout=1),
    wire.Activate(listener="disc", active=False),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: m.TAG)
def test_every_message_round_trips(msg: wire.Message) -> None:
    assert wire.Decoder().feed(wire.encode(msg)) == [msg]


def test_byte_at_a_time_yields_each_message_exactly_when_complete() -> None:
    stream = b"".join(wire.encode(m) for m in ALL)
    d = wire.Decoder()
    out: list[wire.Message] = []
    for i in range(len(stream)):
        out += d.feed(stream[i : i + 1])
    assert out == ALL
    assert d.pending == 0


def test_many_messages_in_one_chunk_and_split_header() -> None:
    a, b = wire.encode(ALL[0]), wire.encode(ALL[2])
    d = wire.Decoder()
    assert d.feed(a + b[:2]) == [ALL[0]]
    assert d.pending == 2
    assert d.feed(b[2:]) == [ALL[2]]


def frame(obj: object) -> bytes:
    payload = msgpack.packb(obj)
    return struct.pack(">I", len(payload)) + payload


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (struct.pack(">I", wire.MAX_FRAME + 1), "exceeds"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "undecodable"),
        (frame({"not": "a list"}), "not a [version, tag, body]"),
        (frame([2, "hb", {"seq": 1}]), "unsupported wire version 2"),
        (frame([1, "nope", {}]), "unknown message type 'nope'"),
        (frame([1, 5, {}]), "unknown message type 5"),
        (frame([1, "hb", []]), "body is not a map"),
        (frame([1, "hb", {}]), "missing field 'seq'"),
        (frame([1, "hb", {"seq": "1"}]), "hb.seq: expected int, got str"),
        (frame([1, "hb", {"seq": True}]), "hb.seq: expected int, got bool"),
        (frame([1, "hb", {"seq": 1, "x": 2}]), "unknown fields ['x']"),
        (frame([1, "ready", {"pid": 1, "listeners": [1]}]), "list of strings"),
        (
            frame([1, "metrics", {"slot": 1, "incarnation": 1, "seq": 1, "listeners": {1: 2}}]),
            "undecodable",
        ),
    ],
)
def test_corrupt_input_raises_wire_error_naming_the_problem(data: bytes, needle: str) -> None:
    d = wire.Decoder()
    with pytest.raises(WireError, match=None) as info:
        d.feed(data)
    assert needle in str(info.value)
    # The stream is broken for good: framing cannot be recovered.
    with pytest.raises(WireError, match="already broken"):
        d.feed(wire.encode(ALL[2]))


def test_garbage_byte_at_a_time_fails_cleanly() -> None:
    d = wire.Decoder()
    with pytest.raises(WireError):
        for b in b"\x00\x00\x00\x04\xff\xff\xff\xff":
            d.feed(bytes([b]))


def test_encoding_an_oversized_message_is_refused() -> None:
    with pytest.raises(ValueError, match="over"):
        wire.encode(wire.BootFailed(reason="x" * (wire.MAX_FRAME + 10)))
