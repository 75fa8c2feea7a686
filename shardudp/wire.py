"""The master <-> worker pipe protocol. Pure: no I/O, no clock.

A frame is a 4-byte big-endian length then a msgpack array
``[VERSION, tag, body]`` where ``body`` is a map. Every message type is a
frozen dataclass whose fields are the schema; decoding checks each field's
type, so a worker (or anything writing into the pipe) cannot hand the master
a value of the wrong shape.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from typing import Any, ClassVar, Final

import msgpack

from .errors import WireError

VERSION: Final = 1
#: Largest frame accepted. Metrics of a few listeners are ~1 KiB; a log-sized
#: message is the biggest legitimate thing, and anything past this is a bug
#: or garbage.
MAX_FRAME: Final = 1 << 20
_HEADER: Final = struct.Struct(">I")
#: Longest text a Log message carries; longer text is cut by ``Log.bounded``.
LOG_TEXT_MAX: Final = 16384
LOG_NAME_MAX: Final = 256
#: Longest boot failure reason: it ends up as one line on the operator's terminal.
BOOT_REASON_MAX: Final = 4096


def bounded_text(text: str, limit: int) -> str:
    """``text`` made encodable and at most ``limit`` characters long.

    Lone surrogates (``os.fsdecode`` of a non-UTF-8 file name) cannot be
    encoded as UTF-8: they become backslash escapes. A long text keeps its
    head and its tail, since a traceback ends with the exception itself, and
    says how much was cut.
    """
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= limit:
        return text
    keep = limit - 64  # room for the note
    cut = len(text) - keep
    return f"{text[:keep - keep // 2]} [... {cut} characters cut ...] {text[-(keep // 2):]}"


@dataclasses.dataclass(frozen=True)
class Message:
    """Base of every pipe message; a subclass's fields are its schema."""

    TAG: ClassVar[str] = ""
    #: Longest accepted value of a string field, by field name.
    MAX_LEN: ClassVar[dict[str, int]] = {}


@dataclasses.dataclass(frozen=True)
class Hello(Message):
    """First frame of a worker, sent right after fork."""

    TAG: ClassVar[str] = "hello"
    slot: int
    incarnation: int
    pid: int


@dataclasses.dataclass(frozen=True)
class Ready(Message):
    """Every listener is adopted and its protocol started."""

    TAG: ClassVar[str] = "ready"
    pid: int
    listeners: list[str]


@dataclasses.dataclass(frozen=True)
class Heartbeat(Message):
    """Sent from the reactor thread: a wedged reactor stops sending these."""

    TAG: ClassVar[str] = "hb"
    seq: int


@dataclasses.dataclass(frozen=True)
class MetricsReport(Message):
    """Cumulative counters of one incarnation, per listener name."""

    TAG: ClassVar[str] = "metrics"
    slot: int
    incarnation: int
    seq: int
    listeners: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BootFailed(Message):
    """The APP could not be loaded or built; restarting will not help."""

    TAG: ClassVar[str] = "bootfail"
    MAX_LEN: ClassVar[dict[str, int]] = {"reason": BOOT_REASON_MAX}
    reason: str

    @classmethod
    def bounded(cls, reason: str) -> BootFailed:
        """A BootFailed whose reason is one line that fits ``MAX_LEN``."""
        return cls(bounded_text(" ".join(reason.splitlines()), BOOT_REASON_MAX))


@dataclasses.dataclass(frozen=True)
class Log(Message):
    """One log record of a worker; the master re-emits it tagged with slot and pid.

    ``text`` is the formatted message including any traceback.
    """

    TAG: ClassVar[str] = "log"
    MAX_LEN: ClassVar[dict[str, int]] = {"name": LOG_NAME_MAX, "text": LOG_TEXT_MAX}
    level: int
    name: str
    text: str
    created: float

    @classmethod
    def bounded(cls, level: int, name: str, text: str, created: float) -> Log:
        """A Log whose strings are encodable and fit ``MAX_LEN`` (see ``bounded_text``)."""
        return cls(level, bounded_text(name, LOG_NAME_MAX), bounded_text(text, LOG_TEXT_MAX),
                   created)


@dataclasses.dataclass(frozen=True)
class Left(Message):
    """The APP closed the worker's port of ``listener`` (``call``: stopListening,
    loseConnection): nothing reads that listener's sockets in this slot any more."""

    TAG: ClassVar[str] = "left"
    MAX_LEN: ClassVar[dict[str, int]] = {"listener": LOG_NAME_MAX, "call": LOG_NAME_MAX}
    listener: str
    call: str


@dataclasses.dataclass(frozen=True)
class Stop(Message):
    """Master -> worker: stop gracefully within ``timeout`` seconds.

    With ``drain``, first read every datagram still queued in the sockets
    (the master has already taken them out of the reuseport group).
    """

    TAG: ClassVar[str] = "stop"
    timeout: float
    drain: bool = False


@dataclasses.dataclass(frozen=True)
class Refuse(Message):
    """Master -> worker: drop datagrams from ``sources`` (``host port`` each) of
    ``listener`` before the handler: they are in quarantine. Replaces the list."""

    TAG: ClassVar[str] = "refuse"
    listener: str
    sources: list[str]


@dataclasses.dataclass(frozen=True)
class Cover(Message):
    """Master -> worker: count the datagrams of ``listener`` whose flow bucket
    (``shardudp.steering``, with ``seed``) is in ``buckets``: flows steered to
    us from slots that are not read. An empty list stops counting."""

    TAG: ClassVar[str] = "cover"
    listener: str
    seed: int
    buckets: list[int]


@dataclasses.dataclass(frozen=True)
class Drain(Message):
    """Master -> worker: a new worker serves the slot now. Keep serving the sessions
    of ``listeners`` (report them, and which went idle), stop reading the others."""

    TAG: ClassVar[str] = "drain"
    listeners: list[str]


@dataclasses.dataclass(frozen=True)
class Watch(Message):
    """Master -> worker: ``buckets`` of ``listener`` (``shardudp.steering``, with
    ``seed``) move to another slot; report the active flows in them, then which
    go idle. An empty list stops watching."""

    TAG: ClassVar[str] = "watch"
    listener: str
    seed: int
    buckets: list[int]


@dataclasses.dataclass(frozen=True)
class Sessions(Message):
    """Worker -> master: flows of ``listener`` it serves that the master must keep
    with it (``active``, new since the last report) and flows gone idle
    (``ended``), each ``host port``."""

    TAG: ClassVar[str] = "sessions"
    listener: str
    active: list[str]
    ended: list[str]
    #: More messages of this report follow (a report is cut to fit frames).
    more: bool = False


@dataclasses.dataclass(frozen=True)
class Activate(Message):
    """Master -> worker: start (or stop) reading a standby listener."""

    TAG: ClassVar[str] = "activate"
    listener: str
    active: bool


#: Flows per Sessions message: at most ~70 bytes each (IPv6 with a zone), so
#: a message stays well inside MAX_FRAME.
SESSIONS_PER_MESSAGE: Final = 8192


def sessions_report(listener: str, active: list[str], ended: list[str]) -> list[Sessions]:
    """One report as messages that fit frames: the active flows first (so no
    part of it makes a holder look empty), all but the last marked ``more``."""
    entries = [(True, f) for f in active] + [(False, f) for f in ended]
    n = SESSIONS_PER_MESSAGE
    chunks = [entries[i:i + n] for i in range(0, len(entries), n)] or [[]]
    return [Sessions(listener=listener, active=[f for a, f in chunk if a],
                     ended=[f for a, f in chunk if not a], more=i < len(chunks) - 1)
            for i, chunk in enumerate(chunks)]


def flow_text(host: str, port: int) -> str:
    """A sender as Refuse and Sessions carry it."""
    return f"{host} {port}"


def parse_flow_untrusted(text: str, what: str) -> tuple[str, int]:
    """``flow_text`` back to (host, port); a WireError naming ``what`` if it is not one."""
    host, _, port = text.rpartition(" ")
    try:
        ipaddress.ip_address(host)
        if not (port.isdigit() and int(port) <= 0xFFFF):
            raise ValueError
        # As given: the receiving side compares it with what recvfrom named.
        return host, int(port)
    except ValueError:
        raise WireError(f"{what}: {text!r} is not 'host port'") from None


_TYPES: Final[dict[str, type[Message]]] = {
    cls.TAG: cls
    for cls in (Hello, Ready, Heartbeat, MetricsReport, BootFailed, Log, Left, Sessions, Stop,
                Refuse, Cover, Drain, Watch, Activate)
}
_PY_TYPES: Final[dict[str, tuple[type, ...]]] = {
    "int": (int,),
    "float": (float, int),
    "str": (str,),
    "bool": (bool,),
    "list[str]": (list,),
    "list[int]": (list,),
    "dict[str, Any]": (dict,),
}


def encode(msg: Message) -> bytes:
    """One frame holding ``msg``."""
    body = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    payload: bytes = msgpack.packb([VERSION, msg.TAG, body], use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"{msg.TAG} message is {len(payload)} bytes, over {MAX_FRAME}")
    return _HEADER.pack(len(payload)) + payload


def _check_field(cls: type[Message], name: str, type_name: str, value: object) -> None:
    tag = cls.TAG
    allowed = _PY_TYPES[type_name]
    # bool is an int subclass: a True where an int belongs is a schema error.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise WireError(f"{tag}.{name}: expected {type_name}, got {type(value).__name__}")
    if type_name == "list[str]" and not all(isinstance(v, str) for v in value):  # type: ignore[attr-defined]
        raise WireError(f"{tag}.{name}: expected a list of strings")
    if type_name == "list[int]" and not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):  # type: ignore[attr-defined]
        raise WireError(f"{tag}.{name}: expected a list of integers")
    if type_name == "dict[str, Any]" and not all(isinstance(k, str) for k in value):  # type: ignore[attr-defined]
        raise WireError(f"{tag}.{name}: expected string keys")
    limit = cls.MAX_LEN.get(name)
    if limit is not None and len(value) > limit:  # type: ignore[arg-type]
        raise WireError(f"{tag}.{name}: longer than {limit} characters")


def _parse_untrusted_payload(payload: bytes) -> Message:
    obj = unpack_untrusted(payload)
    if not (isinstance(obj, list) and len(obj) == 3):
        raise WireError("frame is not a [version, tag, body] array")
    version, tag, body = obj
    if version != VERSION:
        raise WireError(f"unsupported wire version {version!r} (this side speaks {VERSION})")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise WireError(f"unknown message type {tag!r}")
    if not isinstance(body, dict):
        raise WireError(f"{tag}: body is not a map")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(body) - set(fields)
    if unknown:
        raise WireError(f"{tag}: unknown fields {sorted(unknown)}")
    kwargs: dict[str, object] = {}
    for name, field in fields.items():
        if name not in body:
            if field.default is dataclasses.MISSING:
                raise WireError(f"{tag}: missing field {name!r}")
            continue
        _check_field(cls, name, str(field.type), body[name])
        kwargs[name] = body[name]
    return cls(**kwargs)


def encode_obj(obj: object, max_frame: int = MAX_FRAME) -> bytes:
    """One frame holding any msgpack-able ``obj`` (the control socket's payloads)."""
    payload: bytes = msgpack.packb(obj, use_bin_type=True)
    if len(payload) > max_frame:
        raise ValueError(f"payload is {len(payload)} bytes, over {max_frame}")
    return _HEADER.pack(len(payload)) + payload


def unpack_untrusted(payload: bytes) -> object:
    """Decode one msgpack payload from an untrusted peer; WireError if it is not msgpack."""

    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        # Some (StackError on deep nesting) carry no text: the type is the news.
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise WireError(f"undecodable msgpack frame: {detail}") from None


class FrameSplitter:
    """Cut a byte stream into length-prefixed payloads.

    After an error the stream is unusable (framing is lost): the caller must
    drop the peer.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self._broken: str | None = None

    def split(self, data: bytes) -> tuple[list[bytes], WireError | None]:
        """Every whole payload before the first problem, and that problem."""
        if self._broken is not None:
            return [], WireError(f"stream already broken: {self._broken}")
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        while len(buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf)
            if size > self._max:
                reason = f"frame of {size} bytes exceeds the {self._max}-byte limit"
                self.fail(reason)
                return out, WireError(reason)
            end = _HEADER.size + size
            if len(buf) < end:
                break
            out.append(bytes(buf[_HEADER.size : end]))
            del buf[:end]
        return out, None

    def feed(self, data: bytes) -> list[bytes]:
        """Like ``split``, but raise the problem (dropping the payloads before it)."""
        out, error = self.split(data)
        if error is not None:
            raise error
        return out

    def fail(self, reason: str) -> None:
        self._broken = reason
        self._buf.clear()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


@dataclasses.dataclass(frozen=True)
class Decoded:
    """What one ``Decoder.feed`` produced.

    ``messages`` are the good ones, in order, up to ``error`` (the first bad
    frame); after an error every later feed reports the stream as broken.
    """

    messages: list[Message]
    error: WireError | None = None


class Decoder:
    """Incremental decoder of worker/master messages: feed bytes, get messages."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._frames = FrameSplitter(max_frame)

    def feed(self, data: bytes) -> Decoded:
        payloads, error = self._frames.split(data)
        out = []
        for payload in payloads:
            try:
                out.append(_parse_untrusted_payload(payload))
            except WireError as exc:
                self._frames.fail(str(exc))
                return Decoded(out, exc)
        return Decoded(out, error)

    @property
    def pending(self) -> int:
        return self._frames.pending
