"""The control socket: msgpack request/response over a unix stream socket.

A request is one frame holding a map ``{"cmd": NAME, ...args}``; the reply is
one frame ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT}``.
Clients are untrusted: every request is validated, a frame that breaks the
framing closes the connection after an error reply, and a client that says
nothing is dropped after ``IDLE_TIMEOUT``. The server side never blocks the
master loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from . import wire
from .errors import StartupError, WireError

log = logging.getLogger("shardudp.control")

MAX_REQUEST: Final = 64 * 1024
MAX_CLIENTS: Final = 64
IDLE_TIMEOUT: Final = 5.0
#: Replies not taken by a client within this many bytes close it.
MAX_OUTBOX: Final = 1 << 20

COMMANDS: Final[dict[str, dict[str, type]]] = {
    "status": {},
    "scale": {"n": int},
    "reload": {},
    "stop": {},
    "reopen-logs": {},
}


class ControlError(WireError):
    """A control client sent something we will not act on."""


@dataclasses.dataclass(frozen=True)
class Request:
    cmd: str
    args: dict[str, Any]


def parse_untrusted_request(obj: object) -> Request:
    if not isinstance(obj, dict):
        raise ControlError("request must be a map like {'cmd': 'status'}")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ControlError("request has no 'cmd' string")
    spec = COMMANDS.get(cmd)
    if spec is None:
        raise ControlError(f"unknown command {cmd!r}; known: {', '.join(COMMANDS)}")
    extra = set(obj) - {"cmd"} - set(spec)
    if extra:
        raise ControlError(f"{cmd}: unexpected arguments {sorted(map(str, extra))}")
    args: dict[str, Any] = {}
    for name, typ in spec.items():
        value = obj.get(name)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ControlError(f"{cmd}: argument {name!r} must be {typ.__name__}")
        args[name] = value
    return Request(cmd, args)


def default_path() -> str:
    """Where the control socket lives unless told: the runtime dir."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # systemd's RuntimeDirectory=
    if runtime:
        return str(Path(runtime.split(":")[0]) / "control.sock")
    if os.geteuid() == 0:
        return "/run/shardudp/control.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return str(Path(xdg) / "shardudp" / "control.sock")
    return f"/tmp/shardudp-{os.geteuid()}/control.sock"


def resolve_path(setting: str) -> str | None:
    if setting == "none":
        return None
    return default_path() if setting == "auto" else setting


# -- server --------------------------------------------------------------------


class _Conn:
    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.frames = wire.FrameSplitter(MAX_REQUEST)
        self.outbox = bytearray()
        self.last_active = now
        self.closing = False


Handler = Callable[[Request], Any]


class ControlServer:
    """Accepts clients on a unix socket; integrated in the master's selector."""

    def __init__(self, path: str, handler: Handler, selector: selectors.BaseSelector,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.handler = handler
        self.selector = selector
        self.clock = clock
        self.conns: dict[int, _Conn] = {}
        self.listener = self._bind(path)
        selector.register(self.listener, selectors.EVENT_READ, self._on_accept)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        p = Path(path)
        try:
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"control socket directory {p.parent}: {exc.strerror}") from None
        if p.exists() or p.is_symlink():
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise StartupError(f"control socket path {path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                p.unlink()  # stale: its server died without cleaning up
            else:
                raise StartupError(f"control socket {path} is served by a running shardudp; "
                                   "stop it or give this one another --control path")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: only the server's user may control it
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot bind control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
        return sock

    def chown(self, uid: int, gid: int) -> None:
        os.chown(self.path, uid, gid)

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def fds(self) -> set[int]:
        return {self.listener.fileno(), *self.conns}

    def _on_accept(self, mask: int) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control accept failed: %s", exc)
                return
            if len(self.conns) >= MAX_CLIENTS:
                # Evict the longest-idle client rather than refuse the new one:
                # a crowd of silent clients must not lock the operator out.
                oldest = min(self.conns.values(), key=lambda c: c.last_active)
                self._drop(oldest.sock.fileno())
            sock.setblocking(False)
            conn = _Conn(sock, self.clock())
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ,
                                   lambda m, c=conn: self._on_conn(c, m))

    def _on_conn(self, conn: _Conn, mask: int) -> None:
        fd = conn.sock.fileno()
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if not mask & selectors.EVENT_READ or fd not in self.conns:
            return
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        conn.last_active = self.clock()
        try:
            payloads = conn.frames.feed(data)
        except WireError as exc:
            self._reply(conn, {"ok": False, "error": str(exc)})
            conn.closing = True
            self._flush(conn)
            return
        for payload in payloads:
            self._reply(conn, self._answer(payload))
        self._flush(conn)

    def _answer(self, payload: bytes) -> dict[str, Any]:
        try:
            req = parse_untrusted_request(wire.unpack_untrusted(payload))
        except WireError as exc:
            return {"ok": False, "error": str(exc)}
        try:
            return {"ok": True, "result": self.handler(req)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}

    def _reply(self, conn: _Conn, obj: dict[str, Any]) -> None:
        conn.outbox += wire.encode_obj(obj)
        if len(conn.outbox) > MAX_OUTBOX:
            self._drop(conn.sock.fileno())

    def _flush(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd not in self.conns:
            return
        while conn.outbox:
            try:
                n = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(fd)
                return
            del conn.outbox[:n]
        if conn.outbox:
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                 lambda m, c=conn: self._on_conn(c, m))
        elif conn.closing:
            self._drop(fd)
        else:
            self.selector.modify(conn.sock, selectors.EVENT_READ,
                                 lambda m, c=conn: self._on_conn(c, m))

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        if conn is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def expire(self) -> None:
        """Drop clients idle past IDLE_TIMEOUT (a silent client must not pin a slot)."""
        cutoff = self.clock() - IDLE_TIMEOUT
        for fd, conn in list(self.conns.items()):
            if conn.last_active < cutoff:
                self._drop(fd)


# -- client --------------------------------------------------------------------


def call(path: str, request: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request; return its result or raise ControlError / OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise OSError(exc.errno, f"no shardudp is listening on {path}") from None
            raise
        sock.sendall(wire.encode_obj(request))
        frames = wire.FrameSplitter()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            for payload in frames.feed(data):
                reply = wire.unpack_untrusted(payload)
                if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
                    raise ControlError("malformed reply from the server")
                if not reply["ok"]:
                    raise ControlError(str(reply.get("error")))
                return reply.get("result")
        raise ControlError("the server closed the connection without replying")
