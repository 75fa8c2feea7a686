"""The control socket: msgpack request/response over a unix stream socket.

A request is one frame holding a map ``{"cmd": NAME, ...args}``; the reply is
one frame ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": TEXT}``.
Clients are untrusted: every request is validated, a frame that breaks the
framing closes the connection after an error reply, a client that does not
complete a request within ``REQUEST_TIMEOUT`` is dropped, and a handler that
fails gets an error reply, never the master's life. The server side never
blocks the master loop, nor lets one client monopolise it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
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
from .acceptgate import PER_CONNECTION, AcceptGate
from .errors import StartupError, WireError

log = logging.getLogger("shardudp.control")

MAX_REQUEST: Final = 64 * 1024
#: Clients served at once: a burst of this many (a fleet's health checks, a
#: deploy script polling) is answered, each; past it the client closest to
#: its deadline makes room. Counted in the master's fd budget.
MAX_CLIENTS: Final = 128
#: Connections the kernel queues until we accept them: a burst arrives faster
#: than one loop turn accepts (a backlog of 16 refused 13 of 100 clients).
LISTEN_BACKLOG: Final = 512
#: A client must complete each request within this long of connecting or of
#: its previous answer; trickling bytes does not extend it.
REQUEST_TIMEOUT: Final = 5.0
#: Requests answered per client per loop turn: one client pipelining thousands
#: must not delay the workers' pipes or the other clients.
MAX_FRAMES_PER_TURN: Final = 16
#: Replies not taken by a client within this many bytes close it.
MAX_OUTBOX: Final = 1 << 20
#: sun_path holds 108 bytes, the terminating NUL included.
MAX_PATH: Final = 107

COMMANDS: Final[dict[str, dict[str, type]]] = {
    "status": {},
    "scale": {"n": int},
    "reload": {},
    "stop": {},
    "reopen-logs": {},
}


class ControlError(WireError):
    """A control client sent something we will not act on."""


class NotListening(OSError):
    """Nothing accepts connections on the control socket's path."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated control request: a command from ``COMMANDS`` and its arguments."""

    cmd: str
    args: dict[str, Any]


def parse_untrusted_request(obj: object) -> Request:
    """Validate a decoded control frame against ``COMMANDS``; ControlError names the problem."""

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


def _runtime_directory() -> Path | None:
    """systemd's RuntimeDirectory= (it creates and owns that directory)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    return Path(runtime.split(":")[0]) if runtime else None


def _own_dir() -> Path:
    """The directory shardudp names itself for its socket: it must be private."""
    if os.geteuid() == 0:
        return Path("/run/shardudp")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "shardudp"
    return Path(f"/tmp/shardudp-{os.geteuid()}")


def default_path() -> str:
    """Where the control socket lives unless told: the runtime dir."""
    return str((_runtime_directory() or _own_dir()) / "control.sock")


def resolve_path(setting: str) -> str | None:
    """The control socket path a ``control`` setting means (None for ``none``)."""

    if setting == "none":
        return None
    return default_path() if setting == "auto" else setting


def path_problem(path: str) -> str | None:
    """Why a control socket could never be made at ``path``, found without creating anything."""
    size = len(os.fsencode(path))
    if size > MAX_PATH:
        return (f"{path} is {size} bytes long; a unix socket path takes at most {MAX_PATH}: "
                "choose a shorter one")
    directory = Path(path).parent
    if not directory.is_dir() and not directory.parent.is_dir():
        return f"directory {directory.parent} does not exist"
    return None


def _prepare_dir(directory: Path) -> None:
    """Create the socket's directory 0700; refuse our own directory if others can reach it.

    Only the last level is created: a mistyped path must not grow a tree of
    directories (as root, anywhere). In /tmp anyone may create
    ``shardudp-<uid>`` first, and whoever owns the directory can swap the
    socket for their own and receive our operator's commands. A directory the
    operator named (or systemd made) is theirs to secure.
    """
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        raise StartupError(f"control socket directory {directory}: its parent "
                           f"{directory.parent} does not exist; create it, or pass "
                           "--control PATH") from None
    except OSError as exc:
        raise StartupError(f"control socket directory {directory}: {exc.strerror}") from None
    else:
        os.chmod(directory, 0o700)  # whatever the umask
        return
    if directory != _own_dir() or directory == _runtime_directory():
        return
    st = os.lstat(directory)
    hint = "remove it, or pass --control PATH"
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"control socket directory {directory} is not a directory; {hint}")
    if st.st_uid != os.geteuid():
        raise StartupError(f"control socket directory {directory} belongs to uid {st.st_uid}, "
                           f"not to us (uid {os.geteuid()}); {hint}")
    if st.st_mode & 0o077:
        raise StartupError(f"control socket directory {directory} is open to other users "
                           f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 700 it, or pass "
                           "--control PATH")


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _error(text: str) -> bytes:
    return wire.encode_obj({"ok": False, "error": text})


# -- server --------------------------------------------------------------------


class _Conn:
    #: The selector callback, bound to this connection.
    on_event: Callable[[int], None]

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.frames = wire.FrameSplitter(MAX_REQUEST)
        #: Requests received but not answered yet (a framing error last, if any).
        self.pending: collections.deque[bytes | WireError] = collections.deque()
        self.outbox = bytearray()
        self.deadline = deadline
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
        self._gate = AcceptGate("control socket", self.listener, selector, self._on_accept, log)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        p = Path(path)
        _prepare_dir(p.parent)
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
                                   "to run another server, give it its own --control PATH "
                                   "(or --control none)")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Created 0600 and owned by the master's uid, also under --user: the
        # APP runs as that user and must not be able to scale or stop us.
        old = os.umask(0o177)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            # A path too long for sun_path is an OSError without strerror.
            raise StartupError(f"cannot bind control socket {path}: "
                               f"{exc.strerror or exc}") from None
        finally:
            os.umask(old)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self._gate.close()
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _on_accept(self, mask: int) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in PER_CONNECTION:
                    continue
                self._gate.pause(self.clock(), exc)
                return
            self._gate.accepted()
            if len(self.conns) >= MAX_CLIENTS:
                # Evict the client closest to its deadline rather than refuse
                # the new one: a crowd of silent clients must not lock the
                # operator out.
                self._drop(min(self.conns.values(), key=lambda c: c.deadline))
            sock.setblocking(False)
            conn = _Conn(sock, self.clock() + REQUEST_TIMEOUT)
            conn.on_event = functools.partial(self._on_conn, conn)
            try:
                self.selector.register(sock, selectors.EVENT_READ, conn.on_event)
            except OSError as exc:
                # epoll out of memory or watches: as for accept(), wait and retry.
                sock.close()
                self._gate.pause(self.clock(), exc)
                return
            self.conns[sock.fileno()] = conn

    def _alive(self, conn: _Conn) -> bool:
        return self.conns.get(conn.sock.fileno()) is conn

    def _on_conn(self, conn: _Conn, mask: int) -> None:
        # Write readiness also means "answer the next batch": see _flush.
        if mask & selectors.EVENT_READ and not conn.pending and not conn.closing:
            self._read(conn)
        self._serve(conn)
        self._flush(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client is done sending: finish what it asked for
            conn.closing = True
            return
        # Requests before an oversized frame are still answered, then the error.
        payloads, error = conn.frames.split(data)
        conn.pending.extend(payloads)
        if error is not None:
            conn.pending.append(error)
            conn.closing = True

    def _serve(self, conn: _Conn) -> None:
        """Answer at most MAX_FRAMES_PER_TURN requests, so one client cannot hog the loop."""
        for _ in range(MAX_FRAMES_PER_TURN):
            if not conn.pending or not self._alive(conn):
                return  # nothing left, or dropped for a full outbox: stop computing
            item = conn.pending.popleft()
            self._reply(conn, _error(str(item)) if isinstance(item, WireError)
                        else self._answer(item))
            conn.deadline = self.clock() + REQUEST_TIMEOUT

    def _answer(self, payload: bytes) -> bytes:
        try:
            req = parse_untrusted_request(wire.unpack_untrusted(payload))
        except WireError as exc:
            return _error(str(exc))
        try:
            return wire.encode_obj({"ok": True, "result": self.handler(req)})
        except ControlError as exc:
            return _error(str(exc))
        except Exception as exc:
            # Our failure, not the client's: it must not unwind into the master
            # loop, which would take every worker down with it.
            problem = _describe(exc)
            log.error("control command %s failed: %s", req.cmd, problem,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return _error(f"{req.cmd} failed: {problem}")

    def _reply(self, conn: _Conn, frame: bytes) -> None:
        conn.outbox += frame
        if len(conn.outbox) > MAX_OUTBOX:
            self._drop(conn)

    def _flush(self, conn: _Conn) -> None:
        if not self._alive(conn):
            return
        while conn.outbox:
            try:
                n = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            del conn.outbox[:n]
        if conn.closing and not conn.outbox and not conn.pending:
            self._drop(conn)
            return
        # With requests pending, wait for writability rather than for more
        # input: it wakes the next loop turn at once while the client takes
        # its replies, and never while it does not.
        events = selectors.EVENT_WRITE if conn.outbox or conn.pending else 0
        if not conn.pending and not conn.closing:
            events |= selectors.EVENT_READ
        self.selector.modify(conn.sock, events, conn.on_event)

    def _drop(self, conn: _Conn) -> None:
        if not self._alive(conn):
            return
        del self.conns[conn.sock.fileno()]
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def deadline(self) -> float | None:
        """When ``expire`` has something to do: a client's deadline or the end of a pause."""
        times = [c.deadline for c in self.conns.values()]
        if self._gate.deadline is not None:
            times.append(self._gate.deadline)
        return min(times) if times else None

    def expire(self) -> None:
        """Drop clients past their deadline: a silent or trickling client must not pin a slot.
        Listen again once an accept pause is over."""
        now = self.clock()
        for conn in [c for c in self.conns.values() if c.deadline < now]:
            self._drop(conn)
        self._gate.expire(now)


# -- client --------------------------------------------------------------------


def call(path: str, request: dict[str, Any], timeout: float = 10.0) -> Any:
    """Send one request; return its result or raise ControlError / OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise NotListening(exc.errno, f"no shardudp is listening on {path}") from None
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
