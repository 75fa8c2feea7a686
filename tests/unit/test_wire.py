from __future__ import annotations

import re
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
    wire.Log(level=30, name="twisted", text="line one\nTraceback ...", created=1.7e9),
    wire.Stop(timeout=2.5, drain=True),
    wire.Stop(timeout=1),
    wire.Activate(listener="disc", active=False),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: m.TAG)
def test_every_message_round_trips(msg: wire.Message) -> None:
    assert wire.Decoder().feed(wire.encode(msg)) == wire.Decoded([msg])


def test_byte_at_a_time_yields_each_message_exactly_when_complete() -> None:
    stream = b"".join(wire.encode(m) for m in ALL)
    d = wire.Decoder()
    out: list[wire.Message] = []
    for i in range(len(stream)):
        got = d.feed(stream[i : i + 1])
        assert got.error is None
        out += got.messages
    assert out == ALL
    assert d.pending == 0


def test_many_messages_in_one_chunk_and_split_header() -> None:
    a, b = wire.encode(ALL[0]), wire.encode(ALL[2])
    d = wire.Decoder()
    assert d.feed(a + b[:2]).messages == [ALL[0]]
    assert d.pending == 2
    assert d.feed(b[2:]).messages == [ALL[2]]


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
        (frame([1, "log", {"level": 20, "name": "n", "text": 5, "created": 1.0}]),
         "log.text: expected str, got int"),
        (frame([1, "ready", {"pid": 1, "listeners": [1]}]), "list of strings"),
        (
            frame([1, "metrics", {"slot": 1, "incarnation": 1, "seq": 1, "listeners": {1: 2}}]),
            "undecodable",
        ),
    ],
)
def test_corrupt_input_reports_a_wire_error_naming_the_problem(data: bytes, needle: str) -> None:
    d = wire.Decoder()
    got = d.feed(data)
    assert got.messages == []
    assert isinstance(got.error, WireError)
    assert needle in str(got.error)
    # The stream is broken for good: framing cannot be recovered.
    later = d.feed(wire.encode(ALL[2]))
    assert later.messages == []
    assert "already broken" in str(later.error)


@pytest.mark.parametrize("bad", [
    struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    frame([1, "hb", {"seq": "x"}]),
    struct.pack(">I", wire.MAX_FRAME + 1),
], ids=["garbage", "schema", "oversized"])
def test_good_messages_before_a_bad_frame_are_still_delivered(bad: bytes) -> None:
    # e.g. a worker's last metrics report followed by garbage: the report counts.
    good = [ALL[3], ALL[2]]
    got = wire.Decoder().feed(b"".join(wire.encode(m) for m in good) + bad)
    assert got.messages == good
    assert got.error is not None


def test_corrupt_stream_byte_at_a_time_delivers_the_good_prefix_then_fails_once() -> None:
    stream = wire.encode(ALL[0]) + struct.pack(">I", 4) + b"\xff\xff\xff\xff" + wire.encode(ALL[2])
    d = wire.Decoder()
    messages: list[wire.Message] = []
    errors = []
    for i in range(len(stream)):
        got = d.feed(stream[i : i + 1])
        messages += got.messages
        if got.error is not None:
            errors.append(str(got.error))
    assert messages == [ALL[0]]
    assert "undecodable" in errors[0]
    assert all("already broken" in e for e in errors[1:])


def test_deeply_nested_msgpack_names_the_error_type() -> None:
    payload = b"\x91" * 100_000 + b"\xc0"
    got = wire.Decoder().feed(struct.pack(">I", len(payload)) + payload)
    assert got.error is not None
    text = str(got.error)
    detail = text.split("undecodable msgpack frame:", 1)[1].strip()
    assert detail, text  # never an empty reason
    assert "Error" in detail


def test_log_text_is_bounded_and_says_how_much_was_cut() -> None:
    msg = wire.Log.bounded(40, "x" * 1000, "A" * 100_000, 1.0)
    assert len(msg.text) <= wire.LOG_TEXT_MAX
    assert len(msg.name) <= wire.LOG_NAME_MAX
    assert msg.text.startswith("A" * 1000)
    assert "characters cut ...]" in msg.text
    assert wire.Decoder().feed(wire.encode(msg)).messages == [msg]
    short = wire.Log.bounded(20, "n", "hello", 2.0)
    assert short == wire.Log(level=20, name="n", text="hello", created=2.0)


def test_an_over_long_log_from_a_peer_is_refused() -> None:
    data = frame([1, "log", {"level": 20, "name": "n", "text": "A" * (wire.LOG_TEXT_MAX + 1),
                             "created": 1.0}])
    got = wire.Decoder().feed(data)
    assert got.messages == []
    assert "log.text: longer than" in str(got.error)


def test_encoding_an_oversized_message_is_refused() -> None:
    with pytest.raises(ValueError, match="over"):
        wire.encode(wire.BootFailed(reason="x" * (wire.MAX_FRAME + 10)))


def test_bounded_text_keeps_head_and_tail_and_says_how_much_was_cut() -> None:
    text = "Traceback (most recent call last):\n" + "x" * 100_000 + "\nValueError: the end"
    out = wire.bounded_text(text, 1000)
    assert len(out) <= 1000
    assert out.startswith("Traceback (most recent call last):\n")
    assert out.endswith("\nValueError: the end")
    note = re.search(r" \[\.\.\. (\d+) characters cut \.\.\.\] ", out)
    assert note is not None
    assert len(out) - len(note.group(0)) + int(note.group(1)) == len(text)
    assert wire.bounded_text("short", 1000) == "short"


def test_text_that_is_not_valid_utf8_is_escaped_not_refused() -> None:
    name = b"/etc/caf\xe9.conf".decode("utf-8", "surrogateescape")
    msg = wire.Log.bounded(30, "app\udcff", f"cannot read {name}", 1.0)
    assert msg.text == "cannot read /etc/caf\\udce9.conf"
    assert msg.name == "app\\udcff"
    assert wire.Decoder().feed(wire.encode(msg)).messages == [msg]
    # Valid non-ASCII text is left alone.
    assert wire.bounded_text("café ☕", 100) == "café ☕"


@pytest.mark.parametrize("reason", [
    "bad config value: " + "x" * 2_000_000,
    "cannot read " + b"caf\xe9".decode("utf-8", "surrogateescape"),
    "RuntimeError: first line\nsecond line\r\nthird",
])
def test_boot_failure_reason_is_one_bounded_encodable_line(reason: str) -> None:
    msg = wire.BootFailed.bounded(reason)
    assert len(msg.reason) <= wire.BOOT_REASON_MAX
    assert len(msg.reason.splitlines()) == 1
    assert msg.reason[:12] == reason[:12]
    assert wire.Decoder().feed(wire.encode(msg)).messages == [msg]


def test_an_over_long_boot_reason_from_a_peer_is_refused() -> None:
    got = wire.Decoder().feed(frame([1, "bootfail", {"reason": "x" * (wire.BOOT_REASON_MAX + 1)}]))
    assert got.messages == []
    assert "bootfail.reason: longer than" in str(got.error)
