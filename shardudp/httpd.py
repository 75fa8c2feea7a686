"""The master's HTTP/1.1 endpoint (/metrics, /healthz): bounded, threadless, in its selector.

Requests are parsed by h11, never by us. Clients are untrusted and the
master's loop is shared with the workers' pipes, so every resource a client
can make us spend has a bound, named below with its reason: connections,
header bytes, time to send a request, time idle between requests, unsent
output, and the work done per loop turn. Nothing here blocks or spawns a
thread; a route renders on the master's loop (cache it with ``max_age``).

File descriptors: the endpoint never holds more than ``FDS_USED`` (its
clients, the listener and one spare), so the master keeps enough for its
workers by counting ``FDS_USED`` in its reserve. Should the table fill
anyway, accept() failing with EMFILE backs off instead of spinning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import http
import logging
import math
import os
import re
import selectors
import socket
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from typing import Any, Final, NamedTuple
from urllib.parse import urlsplit

import h11

from .acceptgate import PER_CONNECTION, AcceptGate, Throttle
from .errors import StartupError

log = logging.getLogger("shardudp.http")

#: Connections served at once. Prometheus, a probe or two and an operator's
#: curl need a handful; the rest of the cap absorbs bursts. It is also what
#: bounds our file descriptors (see FDS_USED).
MAX_CLIENTS: Final = 32
#: Descriptors the endpoint may hold: its clients, the listener and the spare
#: kept to refuse connections with. The master adds this to its fd reserve.
FDS_USED: Final = MAX_CLIENTS + 2
#: Passed to h11 as max_incomplete_event_size: a request line and headers
#: larger than this get 431 (a scrape's are a few hundred bytes).
MAX_HEADER_BYTES: Final = 16 * 1024
#: A client must complete each request within this long of connecting, or of
#: sending its first byte after an idle keep-alive wait; trickling bytes does
#: not extend it.
REQUEST_TIMEOUT: Final = 5.0
#: How long a keep-alive connection may wait for its next request: longer
#: than Prometheus's default one-minute scrape interval, so a scraper keeps
#: its connection. Idle connections are the first evicted when full, so a
#: long wait costs nobody a slot.
KEEPALIVE_TIMEOUT: Final = 75.0
#: Once a response is queued the client must take all of it within this long:
#: a few hundred KiB of metrics over a slow link, not a reader that never reads.
RESPONSE_TIMEOUT: Final = 10.0
#: Output not yet taken by the client. One response larger than this is still
#: sent whole; a client that piles more responses behind an untaken one (it
#: pipelines and does not read) is dropped.
MAX_OUTBOX: Final = 1 << 20
#: Bytes read from one client per loop turn (one recv): it bounds h11's
#: buffer, and what one client can make the loop do between selects.
RECV_SIZE: Final = 64 * 1024
#: Requests answered per client per loop turn: a client pipelining thousands
#: must not delay the workers' pipes or the other clients.
REQUESTS_PER_TURN: Final = 8
#: Connections accepted per loop turn: a connection flood gets the loop's
#: attention in slices, never all of it.
ACCEPTS_PER_TURN: Final = 16
#: The listen backlog: a burst of scrapers and probes queues in the kernel
#: rather than being refused.
BACKLOG: Final = 128

_TEXT: Final = "text/plain; charset=utf-8"
#: What h11 accepts in a header value, checked before h11 sees a route's
#: content type: h11 raising mid-response would leave no way to answer 500.
_HEADER_VALUE: Final = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


class Response(NamedTuple):
    """What a route renders; sent with its Content-Length (HEAD: the headers only)."""

    status: int
    content_type: str
    body: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """A path's renderer, called on the master's loop for GET and HEAD.

    With ``max_age`` > 0 a rendered response is reused for that many seconds:
    a burst of scrapes (Prometheus replicas, a dashboard refresh) costs one
    render. A render that raises is not cached.
    """

    render: Callable[[], Response]
    max_age: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_age) and self.max_age >= 0):
            raise ValueError(f"max_age must be a finite number >= 0, got {self.max_age!r}")


class _Client:
    """One connection: its socket, its h11 state machine and its unsent output."""

    #: The selector callback, bound to this client.
    on_event: Callable[[int], None]

    def __init__(self, sock: socket.socket, peer: str, now: float, idle_seq: int) -> None:
        self.sock = sock
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.outbox = bytearray()
        #: When the current request (or the idle wait) runs out.
        self.deadline = now + REQUEST_TIMEOUT
        #: When the queued output must have been taken; None while there is none.
        self.send_deadline: float | None = None
        #: Bytes of an unanswered request have arrived: not evictable.
        self.in_request = False
        #: Between requests after an answer (not a fresh connection).
        self.kept_alive = False
        #: Orders idle clients for eviction: lowest has waited longest.
        self.idle_seq = idle_seq
        #: h11 wants more bytes; False while requests wait to be answered.
        self.want_read = True
        #: Answering stopped at REQUESTS_PER_TURN with requests still buffered.
        self.stalled = False
        #: Answer nothing more: close once the outbox is sent.
        self.closing = False
        self.events = selectors.EVENT_READ

    def effective_deadline(self) -> float:
        if self.send_deadline is None:
            return self.deadline
        return min(self.deadline, self.send_deadline)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _parse_host(host: str) -> tuple[str, socket.AddressFamily]:
    bare = host.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    if not bare:
        raise StartupError("metrics host is empty; use e.g. 127.0.0.1 or [::1]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        socket.inet_pton(family, bare)
    except OSError:
        raise StartupError(f"metrics host {host!r} is not an IPv4 or IPv6 address") from None
    return bare, family


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _has_body(req: h11.Request) -> bool:
    for name, value in req.headers:
        if name == b"transfer-encoding" or (name == b"content-length" and int(value) != 0):
            return True
    return False


def _checked(resp: object) -> Response:
    """A route's return value, or TypeError/ValueError saying what is wrong with it."""
    if not isinstance(resp, tuple) or len(resp) != 3:
        raise TypeError(f"a route returns Response(status, content_type, body), got {resp!r}")
    status, ctype, body = resp
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise ValueError(f"status must be an int 200-599, got {status!r}")
    if not isinstance(ctype, str) or not _HEADER_VALUE.fullmatch(ctype):
        raise ValueError(f"bad content type {ctype!r}")
    if not isinstance(body, bytes):
        raise TypeError(f"body must be bytes, got {type(body).__name__}")
    if status in (204, 304) and body:
        raise ValueError(f"a {status} response has no body")
    return Response(status, ctype, body)


def plain(status: int, text: str) -> Response:
    """A text/plain response of one line."""
    return Response(status, _TEXT, text.encode() + b"\n")


class HttpEndpoint:
    """Serves ``routes`` over HTTP/1.1 on one TCP socket, from the master's selector.

    Owns the listening socket, its clients, a spare descriptor and the cache
    of rendered responses. The master's loop dispatches selector events to it
    (``key.data(mask)``), calls ``expire()`` once per turn and bounds its
    select timeout by ``next_deadline()``; ``close()`` releases everything.
    Routes are called on that loop, one at a time.
    """

    def __init__(self, host: str, port: int,
                 routes: Mapping[str, Route | Callable[[], Response]],
                 selector: selectors.BaseSelector, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise StartupError(f"metrics port must be an integer 0-65535, got {port!r}")
        self._routes = {path: r if isinstance(r, Route) else Route(r)
                        for path, r in routes.items()}
        self._selector = selector
        self._clock = clock
        self._clients: dict[int, _Client] = {}
        self._cache: dict[str, tuple[float, Response]] = {}
        self._idle_seq = 0
        self._refusal_warning = Throttle(log, logging.WARNING)
        self._route_error = Throttle(log, logging.ERROR)
        self._client_error = Throttle(log, logging.ERROR)
        bare, family = _parse_host(host)
        self._listener = self._bind(bare, port, family)
        self.port: int = self._listener.getsockname()[1]
        self._spare: int | None = None
        self._reserve_spare()
        # The spare is taken again before accepting resumes: a full table may
        # have cost it (see _accept_failed).
        self._gate = AcceptGate("HTTP endpoint", self._listener, selector, self._on_accept, log,
                                prepare=self._reserve_spare)

    @staticmethod
    def _bind(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {_show(host, port)}: "
                               f"{exc.strerror or exc}") from None
        try:
            # A restarted master rebinds at once despite its old connections
            # in TIME_WAIT (it does not allow two live listeners).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise StartupError(f"cannot serve metrics on {_show(host, port)}: "
                               f"{exc.strerror or exc}") from None
        return sock

    # -- the master's hooks

    def next_deadline(self) -> float | None:
        """The earliest monotonic time ``expire()`` has something to do, or None."""
        times = [c.effective_deadline() for c in self._clients.values()]
        if self._gate.deadline is not None:
            times.append(self._gate.deadline)
        return min(times) if times else None

    def expire(self, now: float | None = None) -> None:
        """Drop clients past their deadline; re-arm the listener once its back-off is over."""
        if now is None:
            now = self._clock()
        for c in [c for c in self._clients.values() if c.effective_deadline() <= now]:
            log.debug("HTTP client %s timed out", c.peer)
            self._drop(c)
        self._gate.expire(now)

    def close(self) -> None:
        for c in list(self._clients.values()):
            self._drop(c)
        self._gate.close()
        self._listener.close()
        self._release_spare()

    # -- accepting

    def _on_accept(self, mask: int) -> None:
        now = self._clock()
        try:
            self._accept_some(now)
        except Exception as exc:
            # Our bug, not the client's: it must not unwind into the master loop.
            self._client_error.log(now, "HTTP accept failed: %s", _describe(exc),
                                   exc_info=log.isEnabledFor(logging.DEBUG))
            self._gate.pause(now)

    def _accept_some(self, now: float) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            full = len(self._clients) >= MAX_CLIENTS
            if full:
                # The spare's descriptor takes the new connection, so we never
                # hold more than FDS_USED, even for a moment.
                self._release_spare()
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                self._reserve_spare()
                return
            except OSError as exc:
                self._reserve_spare()
                if exc.errno in PER_CONNECTION:
                    continue
                self._accept_failed(exc, now)
                return
            self._gate.accepted()
            if full:
                victim = self._oldest_idle()
                if victim is None:
                    # Every slot is mid-request: finishing those beats starting this.
                    sock.close()
                    self._reserve_spare()
                    self._refusal_warning.log(now, "HTTP endpoint refused a connection: "
                                              "all %d slots are busy", MAX_CLIENTS)
                    continue
                # A crowd of idle sockets must never lock Prometheus out.
                log.debug("HTTP client %s evicted for a new connection", victim.peer)
                self._drop(victim)
                self._reserve_spare()
            self._adopt(sock, addr, now)

    def _accept_failed(self, exc: OSError, now: float) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # Answer one waiting client with a close, rather than leave it
            # hanging in the backlog until the table has room again.
            self._release_spare()
            with contextlib.suppress(OSError):
                self._listener.accept()[0].close()
            self._reserve_spare()
        self._gate.pause(now, exc)

    def _reserve_spare(self) -> None:
        if self._spare is None:
            # Failing is no disaster: the gate tries again before re-arming.
            with contextlib.suppress(OSError):
                self._spare = os.open(os.devnull, os.O_RDONLY)

    def _release_spare(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def _adopt(self, sock: socket.socket, addr: tuple[Any, ...], now: float) -> None:
        peer = _show(str(addr[0]), int(addr[1]))
        try:
            sock.setblocking(False)
            c = _Client(sock, peer, now, self._next_idle_seq())
            c.on_event = functools.partial(self._on_client, c)
            self._selector.register(sock, c.events, c.on_event)
        except BaseException:
            sock.close()
            raise
        self._clients[sock.fileno()] = c

    def _next_idle_seq(self) -> int:
        self._idle_seq += 1
        return self._idle_seq

    def _oldest_idle(self) -> _Client | None:
        idle = [c for c in self._clients.values()
                if not (c.in_request or c.outbox or c.closing)]
        return min(idle, key=lambda c: c.idle_seq, default=None)

    # -- serving one client

    def _alive(self, c: _Client) -> bool:
        return self._clients.get(c.sock.fileno()) is c

    def _on_client(self, c: _Client, mask: int) -> None:
        now = self._clock()
        try:
            if mask & selectors.EVENT_READ and c.want_read and not c.closing:
                self._read(c, now)
            if self._alive(c):
                self._serve(c, now)
            if self._alive(c):
                self._flush(c, now)
        except Exception as exc:
            # Whatever went wrong serving one client costs that client only.
            self._client_error.log(now, "HTTP client %s dropped: %s", c.peer, _describe(exc),
                                   exc_info=log.isEnabledFor(logging.DEBUG))
            self._drop(c)

    def _read(self, c: _Client, now: float) -> None:
        try:
            data = c.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(c)  # reset: nobody left to answer
            return
        if data and not c.in_request:
            c.in_request = True
            if c.kept_alive:
                # A fresh connection's REQUEST_TIMEOUT runs from connecting; a
                # kept-alive one's from its first byte, however long it waited.
                c.deadline = now + REQUEST_TIMEOUT
        c.h11.receive_data(data)  # b"" tells h11 the client is done sending

    def _serve(self, c: _Client, now: float) -> None:
        c.stalled = False
        if c.closing:
            return
        c.want_read = False
        answered = 0
        while answered < REQUESTS_PER_TURN:
            try:
                event = c.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(c, exc)
                return
            if event is h11.NEED_DATA:
                c.want_read = True
                return
            if isinstance(event, h11.Request):
                self._answer(c, event, now)
                if not self._alive(c) or c.closing:
                    return
            elif isinstance(event, h11.EndOfMessage):
                if c.h11.our_state is not h11.DONE or c.h11.their_state is not h11.DONE:
                    c.closing = True  # Connection: close, HTTP/1.0, or the client hung up
                    return
                c.h11.start_next_cycle()
                answered += 1
                self._next_cycle(c, now)
            elif isinstance(event, h11.Data):
                pass  # unreachable: a request with a body closes before it is read
            else:  # ConnectionClosed, or PAUSED in a state we never enter
                c.closing = True
                return
        c.stalled = True

    def _next_cycle(self, c: _Client, now: float) -> None:
        if c.h11.trailing_data[0]:
            # Pipelined: the next request was sent with (or before) this answer.
            c.in_request = True
            c.deadline = now + REQUEST_TIMEOUT
        else:
            c.in_request = False
            c.kept_alive = True
            c.idle_seq = self._next_idle_seq()
            c.deadline = now + KEEPALIVE_TIMEOUT

    def _answer(self, c: _Client, req: h11.Request, now: float) -> None:
        target = req.target.decode("latin-1")
        path = urlsplit(target).path
        route = self._routes.get(path)
        extra: list[tuple[bytes, bytes]] = []
        if route is None:
            resp = plain(404, f"not found; try {', '.join(self._routes) or 'nothing'}")
        elif req.method not in (b"GET", b"HEAD"):
            resp = plain(405, "method not allowed; use GET or HEAD")
            extra.append((b"allow", b"GET, HEAD"))
        else:
            resp = self._render(path, route, now)
        # A body a GET should not have is not read: answer and close instead.
        close = _has_body(req)
        if close:
            c.closing = True
        log.debug("HTTP %s %s %s -> %d", c.peer, req.method.decode("latin-1"), target,
                  resp.status)
        self._respond(c, resp, head=req.method == b"HEAD", extra=extra, close=close)

    def _render(self, path: str, route: Route, now: float) -> Response:
        cached = self._cache.get(path)
        if cached is not None and now < cached[0]:
            return cached[1]
        try:
            resp = _checked(route.render())
        except Exception as exc:
            # Our failure, not the client's: a broken route costs a 500, and
            # every other route and client goes on being served.
            self._route_error.log(now, "HTTP route %s failed: %s", path, _describe(exc),
                                  exc_info=log.isEnabledFor(logging.DEBUG))
            return plain(500, f"{path} failed; see the server's log")
        if route.max_age > 0:
            self._cache[path] = (now + route.max_age, resp)
        return resp

    def _reject(self, c: _Client, exc: h11.RemoteProtocolError) -> None:
        log.debug("HTTP client %s sent a bad request: %s", c.peer, exc)
        c.closing = True
        if c.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint
            self._respond(c, plain(status, http.HTTPStatus(status).phrase),
                          head=False, extra=[], close=True)

    def _respond(self, c: _Client, resp: Response, *, head: bool,
                 extra: list[tuple[bytes, bytes]], close: bool) -> None:
        status, ctype, body = resp
        headers = [(b"content-type", ctype.encode()), (b"date", formatdate(usegmt=True).encode())]
        if status not in (204, 304):
            headers.append((b"content-length", str(len(body)).encode()))
        headers += extra
        if close:
            headers.append((b"connection", b"close"))
        try:
            reason = http.HTTPStatus(status).phrase.encode()
        except ValueError:
            reason = b""
        out = c.h11.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if body and not head:
            out += c.h11.send(h11.Data(data=body)) or b""
        out += c.h11.send(h11.EndOfMessage()) or b""
        if c.outbox and len(c.outbox) + len(out) > MAX_OUTBOX:
            log.debug("HTTP client %s dropped: it does not take its responses", c.peer)
            self._drop(c)
            return
        c.outbox += out
        # Sent now, so a client that reads as it pipelines never looks like
        # one that does not.
        self._send(c)

    def _send(self, c: _Client) -> None:
        while c.outbox:
            try:
                n = c.sock.send(c.outbox)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(c)
                return
            del c.outbox[:n]

    def _flush(self, c: _Client, now: float) -> None:
        self._send(c)
        if not self._alive(c):
            return
        if not c.outbox:
            c.send_deadline = None
            if c.closing:
                self._drop(c)
                return
        elif c.send_deadline is None:
            c.send_deadline = now + RESPONSE_TIMEOUT
        # Write readiness also means "answer the next batch": it wakes the
        # next turn at once while the client takes its responses, and never
        # while it does not.
        events = selectors.EVENT_WRITE if c.outbox or c.stalled else 0
        if c.want_read and not c.closing:
            events |= selectors.EVENT_READ
        if not events:
            self._drop(c)  # nothing it could send or take would change anything
            return
        if events != c.events:
            self._selector.modify(c.sock, events, c.on_event)
            c.events = events

    def _drop(self, c: _Client) -> None:
        if not self._alive(c):
            return
        del self._clients[c.sock.fileno()]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(c.sock)
        c.sock.close()
