"""The bounded HTTP endpoint: real sockets on loopback, driven by a small loop in the test.

The endpoint and its clients share this thread: ``Loop.until`` runs selector
turns (dispatching ``key.data(mask)`` and calling ``expire()``, as the
master does) until a condition holds or a wall-clock bound runs out, and the
clients' non-blocking sockets are polled inside the condition. Timeouts run
on a fake clock; nothing synchronises by sleeping.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import h11
import pytest

from shardudp import acceptgate, httpd
from shardudp.errors import StartupError
from shardudp.httpd import HttpEndpoint, Response, Route

TEXT = "text/plain; charset=utf-8"
WALL_LIMIT = 3.0  # seconds any one wait may take before the test fails


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loop:
    """The master's loop in miniature, around one endpoint."""

    def __init__(self, routes: dict[str, Route | Callable[[], Response]],
                 clock: Callable[[], float] = time.monotonic, host: str = "127.0.0.1") -> None:
        self.selector = selectors.DefaultSelector()
        self.ep = HttpEndpoint(host, 0, routes, self.selector, clock=clock)
        self.host = host
        self.turns = 0
        self.clients: list[Client] = []

    def turn(self, timeout: float = 0.005) -> None:
        for key, mask in self.selector.select(timeout):
            key.data(mask)
        self.ep.expire()
        self.turns += 1

    def until(self, cond: Callable[[], bool], within: float = WALL_LIMIT) -> None:
        deadline = time.monotonic() + within
        while not cond():
            assert time.monotonic() < deadline, "condition not met in time"
            self.turn()

    def registered(self) -> int:
        """Sockets the endpoint has in the selector: its listener and clients."""
        return len(self.selector.get_map())

    def client(self, connect: bool = True, rcvbuf: int | None = None) -> Client:
        c = Client(self, connect, rcvbuf)
        self.clients.append(c)
        return c

    def close(self) -> None:
        self.ep.close()
        assert not self.selector.get_map()  # close() unregistered everything
        self.selector.close()
        for c in self.clients:
            c.close()


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Client:
    """A non-blocking client socket; replies are parsed by an h11 client."""

    def __init__(self, loop: Loop, connect: bool = True, rcvbuf: int | None = None) -> None:
        self.loop = loop
        family = socket.AF_INET6 if ":" in loop.host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.eof = False
        if connect:
            self.connect()

    def connect(self) -> None:
        err = self.sock.connect_ex((self.loop.host, self.loop.ep.port))
        assert err in (0, errno.EINPROGRESS), os.strerror(err)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def get(self, path: str, method: str = "GET", extra: str = "") -> None:
        self.send(f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())

    def pump(self) -> None:
        while not self.eof:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except ConnectionResetError:
                data = b""
            if not data:
                self.eof = True
            self.buf += data

    def closed(self) -> bool:
        self.pump()
        return self.eof and not self.buf

    def _parse(self, method: str) -> Reply | None:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(bytes(self.buf))
        if self.eof:
            conn.receive_data(b"")
        status, headers, body = 0, {}, bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                return None  # the connection was closed mid-response
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.buf = bytearray(conn.trailing_data[0])
                return Reply(status, headers, bytes(body))

    def reply(self, method: str = "GET") -> Reply:
        got: list[Reply] = []

        def done() -> bool:
            self.pump()
            r = self._parse(method)
            if r is not None:
                got.append(r)
            assert r is not None or not self.eof, f"closed without a reply: {bytes(self.buf)!r}"
            return r is not None

        self.loop.until(done)
        return got[0]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def make_loop() -> Iterator[Callable[..., Loop]]:
    loops: list[Loop] = []

    def make(routes: dict[str, Route | Callable[[], Response]] | None = None,
             clock: Callable[[], float] = time.monotonic, host: str = "127.0.0.1") -> Loop:
        loop = Loop(routes if routes is not None else ROUTES, clock, host)
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def _metrics() -> Response:
    return Response(200, "text/plain; version=0.0.4", b"up 1\n")


ROUTES: dict[str, Route | Callable[[], Response]] = {
    "/metrics": _metrics,
    "/healthz": lambda: Response(200, TEXT, b"ok\n"),
}


# -- requests and answers ------------------------------------------------------


def test_get_head_and_query_strings(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.get("/metrics")
    r = c.reply()
    assert (r.status, r.body) == (200, b"up 1\n")
    assert r.headers[b"content-type"] == b"text/plain; version=0.0.4"
    assert r.headers[b"content-length"] == b"5"
    assert b"date" in r.headers
    c.get("/metrics", method="HEAD")
    r = c.reply("HEAD")
    # The real length, no body: the next reply on this connection parses cleanly.
    assert (r.status, r.headers[b"content-length"], r.body) == (200, b"5", b"")
    c.get("/healthz?verbose=1&x")  # routed by path alone
    assert c.reply().body == b"ok\n"


def test_unknown_path_404_other_method_405(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.get("/nope")
    r = c.reply()
    assert r.status == 404
    assert b"/metrics" in r.body
    c.get("/metrics", method="POST", extra="Content-Length: 0\r\n")
    r = c.reply()
    assert r.status == 405
    assert r.headers[b"allow"] == b"GET, HEAD"
    c.get("/metrics", method="DELETE")
    assert c.reply().status == 405
    c.get("/metrics")  # still served on the same connection
    assert c.reply().status == 200


def test_garbage_gets_400_and_the_connection_closes(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.send(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
    r = c.reply()
    assert r.status == 400
    assert r.headers[b"connection"] == b"close"
    loop.until(c.closed)
    assert loop.registered() == 1  # the listener only


def test_oversized_headers_get_431(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (20 * 1024))
    assert c.reply().status == 431
    loop.until(c.closed)


def test_keep_alive_serves_two_requests_on_one_connection(
        make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    for _ in range(2):
        c.get("/metrics")
        assert c.reply().status == 200
    assert loop.registered() == 2  # listener + this one connection, still open
    assert not c.closed()


def test_connection_close_is_honoured(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.get("/healthz", extra="Connection: close\r\n")
    r = c.reply()
    assert (r.status, r.headers[b"connection"]) == (200, b"close")
    loop.until(c.closed)
    assert loop.registered() == 1


def test_a_get_with_a_body_is_answered_then_closed(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.get("/healthz", extra="Content-Length: 100000\r\n")  # a body it will not read
    r = c.reply()
    assert (r.status, r.headers[b"connection"]) == (200, b"close")
    loop.until(c.closed)


def test_http_1_0_gets_its_answer_and_a_close(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    c.send(b"GET /metrics HTTP/1.0\r\n\r\n")
    assert c.reply().status == 200
    loop.until(c.closed)


def test_pipelined_requests_are_answered_in_order(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    c = loop.client()
    n = httpd.REQUESTS_PER_TURN * 3 + 1  # more than one turn's worth
    paths = ["/metrics", "/healthz", "/nope"] * n
    c.send(b"".join(f"GET {p} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for p in paths))
    statuses = [c.reply().status for _ in paths]
    assert statuses == [200, 200, 404] * n


def test_route_that_raises_gets_500_is_logged_and_serving_goes_on(
        make_loop: Callable[..., Loop], caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Response:
        raise RuntimeError("collector exploded")

    loop = make_loop({"/metrics": broken, "/healthz": ROUTES["/healthz"]})
    c = loop.client()
    with caplog.at_level(logging.ERROR, logger="shardudp.http"):
        c.get("/metrics")
        assert c.reply().status == 500
    assert any(r.name == "shardudp.http" and "collector exploded" in r.getMessage()
               for r in caplog.records)
    c.get("/healthz")
    assert c.reply().status == 200


def test_route_returning_nonsense_gets_500(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop({"/x": lambda: Response(200, "text/plain\r\nX-Evil: 1", b"")})
    c = loop.client()
    c.get("/x")
    assert c.reply().status == 500


def test_max_age_reuses_one_render(make_loop: Callable[..., Loop]) -> None:
    clock = FakeClock()
    renders: list[float] = []

    def render() -> Response:
        renders.append(clock.now)
        return Response(200, TEXT, f"render {len(renders)}\n".encode())

    loop = make_loop({"/metrics": Route(render, max_age=2.0), "/live": render}, clock=clock)
    c = loop.client()
    bodies = []
    for _ in range(3):
        c.get("/metrics")
        bodies.append(c.reply().body)
        clock.now += 0.5
    assert bodies == [b"render 1\n"] * 3
    clock.now += 1.0  # 2.5 s after the render: stale
    c.get("/metrics")
    assert c.reply().body == b"render 2\n"
    c.get("/live")  # no max_age: rendered every time
    c.get("/live")
    assert [c.reply().body, c.reply().body] == [b"render 3\n", b"render 4\n"]
    with pytest.raises(ValueError):
        Route(render, max_age=-1)


def test_a_response_bigger_than_the_outbox_cap_is_still_sent(
        make_loop: Callable[..., Loop]) -> None:
    big = bytes(range(256)) * (httpd.MAX_OUTBOX * 3 // 2 // 256)
    loop = make_loop({"/big": lambda: Response(200, TEXT, big)})
    c = loop.client()
    c.get("/big")
    assert c.reply().body == big


def test_ipv6_loopback(make_loop: Callable[..., Loop]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        loop = make_loop(host="::1")
    except StartupError as exc:
        pytest.skip(f"::1 unavailable: {exc}")
    c = loop.client()
    c.get("/metrics")
    assert c.reply().status == 200


def test_bind_errors_are_startup_errors_naming_the_address() -> None:
    with selectors.DefaultSelector() as sel:
        first = HttpEndpoint("127.0.0.1", 0, ROUTES, sel)
        try:
            with pytest.raises(StartupError, match=rf"127\.0\.0\.1:{first.port}: "):
                HttpEndpoint("127.0.0.1", first.port, ROUTES, sel)
        finally:
            first.close()
        assert not sel.get_map()
        with pytest.raises(StartupError, match="not an IPv4 or IPv6 address"):
            HttpEndpoint("localhost", 0, ROUTES, sel)
        with pytest.raises(StartupError, match="0-65535"):
            HttpEndpoint("127.0.0.1", 70000, ROUTES, sel)


# -- bounds --------------------------------------------------------------------


def test_idle_crowd_cannot_lock_out_a_scraper(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    crowd: list[Client] = []
    for i in range(200):
        crowd.append(loop.client())
        if i % 8 == 7:  # let the endpoint accept as we go: the backlog never overflows
            loop.turn(0)
    evicted = 200 - httpd.MAX_CLIENTS
    loop.until(lambda: sum(c.closed() for c in crowd) == evicted)
    assert loop.registered() <= httpd.MAX_CLIENTS + 1
    # The longest idle went first.
    assert [c.closed() for c in crowd] == [True] * evicted + [False] * httpd.MAX_CLIENTS
    scraper = loop.client()
    scraper.get("/metrics")
    assert scraper.reply().status == 200
    assert loop.registered() <= httpd.MAX_CLIENTS + 1


def test_when_every_slot_is_mid_request_a_new_connection_is_closed(
        make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    busy = [loop.client() for _ in range(httpd.MAX_CLIENTS)]
    for c in busy:
        c.send(b"GET /metrics HTTP/1.1\r\n")  # half a request
    loop.until(lambda: loop.registered() == httpd.MAX_CLIENTS + 1)
    loop.turn(0)  # every half request read
    late = loop.client()
    loop.until(late.closed)
    for c in busy:  # those in progress are finished, not evicted
        c.send(b"Host: t\r\n\r\n")
        assert c.reply().status == 200


def test_request_timeout_is_not_extended_by_trickling(make_loop: Callable[..., Loop]) -> None:
    clock = FakeClock()
    loop = make_loop(clock=clock)
    start = clock.now
    slow, silent = loop.client(), loop.client()
    loop.until(lambda: loop.registered() == 3)
    assert loop.ep.next_deadline() == start + httpd.REQUEST_TIMEOUT
    for chunk in (b"GET /met", b"rics HT", b"TP/1.1\r\n"):
        slow.send(chunk)
        clock.now += 1.6
        loop.turn(0.01)
    assert not slow.closed() and not silent.closed()
    clock.now = start + httpd.REQUEST_TIMEOUT
    loop.turn(0)
    assert loop.registered() == 1
    loop.until(lambda: slow.closed() and silent.closed())


def test_keep_alive_idle_limit(make_loop: Callable[..., Loop]) -> None:
    clock = FakeClock()
    loop = make_loop(clock=clock)
    c = loop.client()
    c.get("/healthz")
    assert c.reply().status == 200
    answered = clock.now
    assert loop.ep.next_deadline() == answered + httpd.KEEPALIVE_TIMEOUT
    clock.now = answered + httpd.KEEPALIVE_TIMEOUT - 0.1
    loop.turn(0)
    assert not c.closed()
    # The next request's own timeout starts with its first byte, however
    # late in the idle wait that comes.
    c.send(b"GET /hea")
    loop.until(lambda: loop.ep.next_deadline() == clock.now + httpd.REQUEST_TIMEOUT)
    c.send(b"lthz HTTP/1.1\r\nHost: t\r\n\r\n")
    assert c.reply().status == 200
    clock.now += httpd.KEEPALIVE_TIMEOUT
    loop.until(c.closed)
    assert loop.ep.next_deadline() is None


def test_client_that_never_reads_is_dropped_when_its_outbox_passes_the_cap(
        make_loop: Callable[..., Loop], caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()  # frozen: the drop comes from the cap, not a timeout
    body = b"x" * (httpd.MAX_OUTBOX * 6 // 10)
    loop = make_loop({"/big": lambda: Response(200, TEXT, body)}, clock=clock)
    c = loop.client(rcvbuf=4096)
    loop.until(lambda: loop.registered() == 2)  # accepted
    caplog.set_level(logging.DEBUG, logger="shardudp.http")
    c.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" * 64)  # and never read
    loop.until(lambda: loop.registered() == 1)
    assert clock.now == 1000.0
    reasons = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(reasons) == 1 and "does not take its responses" in reasons[0], reasons


def test_client_that_never_reads_one_response_is_dropped_at_the_response_timeout(
        make_loop: Callable[..., Loop]) -> None:
    clock = FakeClock()
    body = b"x" * (8 << 20)  # more than the kernel's buffers take
    loop = make_loop({"/big": lambda: Response(200, TEXT, body)}, clock=clock)
    c = loop.client(rcvbuf=4096)
    c.get("/big")
    loop.until(lambda: loop.ep.next_deadline() == clock.now + httpd.RESPONSE_TIMEOUT)
    clock.now += httpd.RESPONSE_TIMEOUT - 0.1
    loop.turn(0)
    assert loop.registered() == 2
    clock.now += 0.1
    loop.turn(0)
    assert loop.registered() == 1


def test_close_releases_everything() -> None:
    sel = selectors.DefaultSelector()
    ep = HttpEndpoint("127.0.0.1", 0, ROUTES, sel)
    with socket.create_connection(("127.0.0.1", ep.port)) as s:
        deadline = time.monotonic() + WALL_LIMIT
        while len(sel.get_map()) < 2 and time.monotonic() < deadline:
            for key, mask in sel.select(0.01):
                key.data(mask)
        assert len(sel.get_map()) == 2
        ep.close()
        ep.close()  # idempotent
        assert not sel.get_map()
        s.settimeout(WALL_LIMIT)
        assert s.recv(10) == b""
    sel.close()


# -- out of file descriptors ---------------------------------------------------


@contextlib.contextmanager
def fd_table_full() -> Iterator[Callable[[], None]]:
    """Lower the soft RLIMIT_NOFILE just above what is open, fill it; yields a 'free' call."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers: list[int] = []

    def free() -> None:
        while fillers:
            os.close(fillers.pop())

    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
    try:
        while True:
            try:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield free
    finally:
        free()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_emfile_on_accept_backs_off_instead_of_spinning(
        make_loop: Callable[..., Loop], caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    loop = make_loop(clock=clock)
    listener_fd = next(iter(loop.selector.get_map()))
    first, second, third, fourth = (loop.client(connect=False) for _ in range(4))
    caplog.set_level(logging.WARNING, logger="shardudp.http")
    with fd_table_full() as free:
        first.connect()
        loop.until(lambda: listener_fd not in loop.selector.get_map())
        # The spare descriptor let us answer the waiting client with a close.
        loop.until(first.closed)
        t0 = clock.now
        assert loop.ep.next_deadline() == t0 + acceptgate.BACKOFF_MIN

        # A client waiting in the backlog does not wake the loop: no spin.
        second.connect()
        turns, start = loop.turns, time.monotonic()
        while time.monotonic() - start < 0.2:
            loop.turn(0.05)
        assert loop.turns - turns <= 6
        assert not second.closed()

        # Re-armed after the back-off; still full: backed off again, doubled.
        clock.now = t0 + acceptgate.BACKOFF_MIN
        loop.turn(0)
        assert listener_fd in loop.selector.get_map()
        loop.until(lambda: listener_fd not in loop.selector.get_map())
        assert loop.ep.next_deadline() == clock.now + 2 * acceptgate.BACKOFF_MIN

        free()
        third.connect()
        clock.now += 2 * acceptgate.BACKOFF_MIN
        third.get("/metrics")
        assert third.reply().status == 200

    warnings = [r for r in caplog.records if r.name == "shardudp.http"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "Too many open files" in warnings[0].getMessage()

    # A successful accept reset the back-off to its minimum.
    with fd_table_full():
        fourth.connect()
        loop.until(lambda: listener_fd not in loop.selector.get_map())
        assert loop.ep.next_deadline() == clock.now + acceptgate.BACKOFF_MIN


class FlakySelector(selectors.DefaultSelector):
    """A selector whose register() fails while ``fail`` is set, as epoll_ctl out of memory."""

    fail = False

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if self.fail:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        return super().register(fileobj, events, data)


def test_a_listener_that_cannot_be_watched_again_backs_off_again(
        caplog: pytest.LogCaptureFixture) -> None:
    sel = FlakySelector()
    logger = logging.getLogger("shardudp.test_gate")
    caplog.set_level(logging.WARNING, logger=logger.name)
    with contextlib.closing(sel), socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        fd = listener.fileno()
        gate = acceptgate.AcceptGate("test listener", listener, sel, lambda mask: None, logger)
        assert fd in sel.get_map() and gate.deadline is None

        gate.pause(100.0, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        assert fd not in sel.get_map()
        assert gate.deadline == 100.0 + acceptgate.BACKOFF_MIN

        sel.fail = True
        gate.expire(100.0)  # its pause is not over: nothing to do
        now = 100.0 + acceptgate.BACKOFF_MIN
        gate.expire(now)  # must not raise into the master's loop
        assert fd not in sel.get_map()
        assert gate.deadline == now + 2 * acceptgate.BACKOFF_MIN

        gate.expire(200.0)  # a minute on: said again, with how many were held back
        assert gate.deadline == 200.0 + 4 * acceptgate.BACKOFF_MIN

        sel.fail = False
        gate.expire(201.0)
        assert fd in sel.get_map() and gate.deadline is None
        gate.accepted()
        gate.pause(202.0)
        assert gate.deadline == 202.0 + acceptgate.BACKOFF_MIN  # accepting reset the back-off

        gate.close()
        gate.close()  # idempotent
        assert not sel.get_map() and gate.deadline is None
    assert [r.getMessage() for r in caplog.records if r.name == logger.name] == [
        "test listener cannot accept connections: Too many open files; "
        "pausing accepts for 0.05s",
        "test listener cannot watch its socket: Cannot allocate memory "
        "(1 more like this in the last 60s)"]
