"""The worker's UDP ports against real loopback sockets, next to stock Twisted.

Each test drives its own (never installed) epoll reactor in-process with
bounded iterations; the "master" is a plain SO_REUSEPORT socket the test keeps
open, as the real master does, and the port adopts a dup of it.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.udp import MulticastPort

from shardudp.port import HAVE_C_BATCHIO, ShardedSocketError, ShardPort, port_class
from shardudp.stats import SAMPLE_EVERY, ListenerStats

# With SHARDUDP_REQUIRE_C=1 (CI after building the extension) a missing C
# module fails these tests instead of skipping them.
_need_c = pytest.mark.skipif(
    not HAVE_C_BATCHIO and not os.environ.get("SHARDUDP_REQUIRE_C"),
    reason="shardudp._batchio is not built",
)
DATAPATHS = ["python", "python-loop", "twisted", pytest.param("c", marks=_need_c)]
# recvmmsg/sendmmsg batches: the C helper, or the same through ctypes.
BATCHED = ("c", "python")
FAMILIES = [
    pytest.param(socket.AF_INET, id="v4"),
    pytest.param(socket.AF_INET6, id="v6"),
]
LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
MAX_PAYLOAD = {socket.AF_INET: 65507, socket.AF_INET6: 65527}
DEADLINE_S = 5.0


class Recorder(DatagramProtocol):
    """Echoes (unless told not to) and records what it saw."""

    def __init__(self, echo: bool = True, fail_on: bytes | None = None) -> None:
        self.echo = echo
        self.fail_on = fail_on
        self.received: list[tuple[bytes, Any]] = []
        self.refused = 0
        self.started = 0
        self.stopped = 0
        self.write_errors: list[BaseException] = []
        self.reply: Callable[[bytes, Any], None] | None = None

    def startProtocol(self) -> None:
        self.started += 1

    def stopProtocol(self) -> None:
        self.stopped += 1

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        if self.fail_on is not None and datagram == self.fail_on:
            raise ValueError("bad datagram")
        if self.reply is not None:
            self.reply(datagram, addr)
        elif self.echo:
            self.transport.write(datagram, addr)

    def connectionRefused(self) -> None:
        self.refused += 1


class Harness:
    """One reactor, the master sockets it made and the ports it adopted."""

    def __init__(self) -> None:
        self.reactor = EPollReactor()
        self.masters: list[socket.socket] = []
        self.ports: list[Any] = []
        self.clients: list[socket.socket] = []

    def master(
        self, family: int = socket.AF_INET, rcvbuf: int = 0, host: str = ""
    ) -> socket.socket:
        s = socket.socket(family, socket.SOCK_DGRAM)
        self.masters.append(s)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        # Port 0: the kernel picks a free port, so there is no clash to retry.
        s.bind((host or LOOPBACK[family], 0))
        return s

    def serve(
        self,
        datapath: str,
        proto: DatagramProtocol,
        family: int = socket.AF_INET,
        stats: ListenerStats | None = None,
        shared: bool = True,
        rcvbuf: int = 0,
        host: str = "",
        max_packet_size: int = 65535,
    ) -> tuple[ShardPort, socket.socket]:
        m = self.master(family, rcvbuf, host)
        port = port_class(datapath).adopt(m, proto, self.reactor, stats=stats, shared=shared,
                                          max_packet_size=max_packet_size)
        port.startListening()
        self.ports.append(port)
        return port, m

    def serve_stock(
        self, proto: DatagramProtocol, family: int = socket.AF_INET, host: str = "",
        max_packet_size: int = 65535,
    ) -> tuple[Any, socket.socket]:
        """Stock Twisted, adopted the way reactor.adoptDatagramPort does it."""
        m = self.master(family, host=host)
        m.setblocking(False)
        stock: Any = MulticastPort
        port = stock._fromListeningDescriptor(
            self.reactor, m.fileno(), family, proto, maxPacketSize=max_packet_size
        )
        port.startListening()
        self.ports.append(port)
        return port, m

    def client(self, family: int = socket.AF_INET) -> socket.socket:
        c = socket.socket(family, socket.SOCK_DGRAM)
        self.clients.append(c)
        c.settimeout(DEADLINE_S)
        c.bind((LOOPBACK[family], 0))
        return c

    def spin(self, done: Callable[[], bool], what: str = "condition") -> None:
        """Run reactor iterations until done() or the deadline."""
        deadline = time.monotonic() + DEADLINE_S
        for _ in range(100_000):
            if done():
                return
            if time.monotonic() > deadline:
                break
            self.reactor.runUntilCurrent()
            self.reactor.doIteration(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        for p in self.ports:
            if getattr(p, "connected", False):
                p.stopListening()
        self.reactor.runUntilCurrent()
        for s in [*self.clients, *self.masters]:
            s.close()
        r: Any = self.reactor
        for sel in list(r.getReaders()):
            r.removeReader(sel)
        if r.waker is not None:
            r.waker.connectionLost(None)
        r._poller.close()


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    try:
        yield harness
    finally:
        harness.close()


def _echo_exchange(
    h: Harness, port_addr: Any, client: socket.socket, payloads: list[bytes], proto: Recorder
) -> list[bytes]:
    for p in payloads:
        client.sendto(p, port_addr[:2])
    h.spin(lambda: len(proto.received) >= len(payloads), "datagrams at the server")
    return [client.recvfrom(70000)[0] for _ in payloads]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_echo_matches_stock(h: Harness, datapath: str, family: int) -> None:
    payloads = [b"", b"x", b"hello" * 20, bytes(range(256)) * 8]
    results = []
    for kind in ("stock", datapath):
        proto = Recorder()
        if kind == "stock":
            _, m = h.serve_stock(proto, family)
        else:
            _, m = h.serve(datapath, proto, family)
        c = h.client(family)
        echoed = _echo_exchange(h, m.getsockname(), c, payloads, proto)
        me = c.getsockname()[:2]
        results.append((echoed, [(d, a == me, len(a)) for d, a in proto.received]))
    assert results[0] == results[1]
    assert results[1][0] == payloads
    assert all(ok and n == 2 for _, ok, n in results[1][1])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_largest_datagram_arrives_whole(h: Harness, datapath: str, family: int) -> None:
    proto = Recorder()
    _, m = h.serve(datapath, proto, family)
    c = h.client(family)
    big = os.urandom(MAX_PAYLOAD[family])
    assert _echo_exchange(h, m.getsockname(), c, [big, b"small"], proto) == [big, b"small"]
    assert proto.received[0][0] == big


@pytest.mark.parametrize("max_packet_size", [100, 2048, 2049, 65535])
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_datagram_sizes_and_truncation_match_stock(
    h: Harness, datapath: str, max_packet_size: int
) -> None:
    """What a protocol gets (whole, or cut at max_packet_size) is what stock gives."""
    sizes = [0, 1, 99, 100, 101, 2047, 2048, 2049, 4096, 65507]
    payloads = [os.urandom(n) for n in sizes]
    got: dict[str, list[bytes]] = {}
    for kind in ("stock", datapath):
        proto = Recorder(echo=False)
        if kind == "stock":
            _, m = h.serve_stock(proto, max_packet_size=max_packet_size)
        else:
            _, m = h.serve(datapath, proto, max_packet_size=max_packet_size)
        c = h.client()
        for p in payloads:
            c.sendto(p, m.getsockname())
        h.spin(lambda proto=proto: len(proto.received) == len(payloads), f"{kind} datagrams")
        got[kind] = [d for d, _ in proto.received]
    assert got[datapath] == got["stock"]
    assert got["stock"] == [p[:max_packet_size] for p in payloads]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_handler_exception_is_counted_and_port_keeps_serving(
    h: Harness, datapath: str
) -> None:
    from twisted.logger import globalLogPublisher

    failures: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        stats = ListenerStats()
        proto = Recorder(fail_on=b"bad")
        _, m = h.serve(datapath, proto, stats=stats)
        c = h.client()
        payloads = [b"bad", b"ok1", b"bad", b"ok2", b"bad"]
        for p in payloads:
            c.sendto(p, m.getsockname())
        h.spin(lambda: len(proto.received) == len(payloads), "all datagrams")
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [c.recvfrom(100)[0] for _ in range(2)] == [b"ok1", b"ok2"]
    assert stats.errors["value"] == 3
    assert stats.rx_datagrams == 5
    # As stock Twisted: every failure (within the burst) is a failure event
    # with its traceback, which log observers and error trackers see.
    assert len(failures) == 3
    assert all("bad datagram" in str(f["log_failure"].value) for f in failures)


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_timer_runs_while_socket_is_flooded(h: Harness, datapath: str) -> None:
    total = 3000
    proto = Recorder(echo=False)
    seen_at_timer: list[int] = []

    def first(datagram: bytes, addr: Any) -> None:
        if len(proto.received) == 1:
            h.reactor.callLater(0, lambda: seen_at_timer.append(len(proto.received)))

    proto.reply = first
    # 3000 tiny datagrams take about 2.5 MB of receive buffer on lo.
    _, m = h.serve(datapath, proto, rcvbuf=4 << 20)
    c = h.client()
    for i in range(total):
        c.sendto(b"%d" % i, m.getsockname())
    h.spin(lambda: len(proto.received) == total, "the whole flood")
    assert len(seen_at_timer) == 1
    assert 0 < seen_at_timer[0] < total
    assert [d for d, _ in proto.received] == [b"%d" % i for i in range(total)]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_connect_on_shared_socket_is_refused(h: Harness, datapath: str) -> None:
    proto = Recorder()
    port, m = h.serve(datapath, proto)
    peer = h.client()
    with pytest.raises(ShardedSocketError, match="SO_REUSEPORT") as info:
        port.connect(*peer.getsockname())
    assert isinstance(info.value, RuntimeError)
    with pytest.raises(OSError) as not_conn:
        m.getpeername()
    assert not_conn.value.errno == errno.ENOTCONN
    c = h.client()
    assert _echo_exchange(h, m.getsockname(), c, [b"still here"], proto) == [b"still here"]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_connected_mode_and_connection_refused(h: Harness, datapath: str) -> None:
    proto = Recorder(echo=False)
    port, m = h.serve(datapath, proto, shared=False)
    with pytest.raises(error.InvalidAddressError):
        port.connect("localhost", 9)
    peer = h.client()
    port.connect(*peer.getsockname())
    port.write(b"to peer")
    assert peer.recvfrom(100)[0] == b"to peer"
    peer.sendto(b"from peer", m.getsockname())
    h.spin(lambda: len(proto.received) == 1, "the peer's datagram")
    assert proto.received[0][0] == b"from peer"
    peer.close()
    # Nobody listens on the peer's port now: the ICMP error comes back and the
    # next read on the connected socket reports it.
    port.write(b"into the void")
    h.spin(lambda: proto.refused > 0, "connectionRefused")
    assert proto.refused >= 1


def _write_errors(port: Any, family: int, warm_addr: Any) -> list[tuple[type, str]]:
    other = socket.AF_INET if family == socket.AF_INET6 else socket.AF_INET6
    cases: list[tuple[bytes, Any]] = [
        (b"x", ("localhost", 9)),
        (b"x", (LOOPBACK[other], 9)),
        (b"x" * (MAX_PAYLOAD[family] + 1), warm_addr),
        (b"x", (LOOPBACK[family], 0)),  # EINVAL from the kernel
    ]
    out = []
    port.write(b"warm", warm_addr)
    for data, addr in cases:
        with pytest.raises(Exception) as info:
            port.write(data, addr)
        out.append((type(info.value), str(info.value)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_write_errors_match_stock(h: Harness, datapath: str, family: int) -> None:
    sink = h.client(family)
    warm = sink.getsockname()[:2]
    stock, _ = h.serve_stock(Recorder(), family)
    ours, _ = h.serve(datapath, Recorder(), family)
    expected = _write_errors(stock, family, warm)
    assert [t for t, _ in expected] == [
        error.InvalidAddressError,
        error.InvalidAddressError,
        error.MessageLengthError,
        OSError,
    ]
    assert _write_errors(ours, family, warm) == expected


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_write_errors_inside_handler_reach_handler(h: Harness, datapath: str) -> None:
    """A write made while a batch is delivered raises into that handler, like stock."""
    proto = Recorder()

    def reply(datagram: bytes, addr: Any) -> None:
        for bad in ((b"x", ("localhost", addr[1])), (b"x" * 65508, addr)):
            try:
                proto.transport.write(*bad)
            except Exception as exc:
                proto.write_errors.append(exc)
        proto.transport.write(datagram, addr)

    proto.reply = reply
    _, m = h.serve(datapath, proto)
    c = h.client()
    assert _echo_exchange(h, m.getsockname(), c, [b"a", b"b"], proto) == [b"a", b"b"]
    assert [type(e) for e in proto.write_errors] == [
        error.InvalidAddressError,
        error.MessageLengthError,
    ] * 2


def _listener_socket(h: Harness, group: str) -> socket.socket:
    """A multicast listener's socket the way the master makes it: bound to the
    group, a member on loopback, sending from loopback."""
    m = h.master(host=group)
    lo = socket.inet_aton("127.0.0.1")
    m.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, lo)
    m.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + lo)
    return m


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_listener_membership_belongs_to_the_master(h: Harness, datapath: str) -> None:
    group = "239.255.42.99"
    proto = Recorder(echo=False)
    m = _listener_socket(h, group)
    port = port_class(datapath).adopt(m, proto, h.reactor)
    port.startListening()
    h.ports.append(port)
    results: list[Any] = []
    # The seed's joinGroup(G) (no interface), the explicit one, and leaving:
    # all succeed without touching the master's membership.
    port.joinGroup(group).addBoth(results.append)
    port.joinGroup(group, "127.0.0.1").addBoth(results.append)
    port.leaveGroup(group).addBoth(results.append)
    port.leaveGroup(group, "127.0.0.1").addBoth(results.append)
    assert results == [None] * 4
    # Another group can never arrive on a socket bound to this one: a clear
    # failure instead of a join that silently delivers nothing.
    port.joinGroup("239.255.42.97").addBoth(results.append)
    assert results[4].check(error.MulticastJoinError)
    assert "add a --multicast listener for 239.255.42.97" in str(results[4].value)
    port.joinGroup(group, "127.0.0.2").addBoth(results.append)
    assert results[5].check(error.MulticastJoinError)
    sender = h.client()
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.sendto(b"to the group", (group, m.getsockname()[1]))
    h.spin(lambda: len(proto.received) == 1, "the multicast datagram")
    assert proto.received[0][0] == b"to the group"


def test_stock_join_group_fails_where_ours_succeeds(h: Harness) -> None:
    """Why a repeated join on a unicast socket counts as success: the socket
    outlives the worker that joined, and stock reports EADDRINUSE."""
    group = "239.255.42.98"
    stock, m = h.serve_stock(Recorder(), host=group)
    m.setsockopt(
        socket.IPPROTO_IP,
        socket.IP_ADD_MEMBERSHIP,
        socket.inet_aton(group) + socket.inet_aton("127.0.0.1"),
    )
    results: list[Any] = []
    stock.joinGroup(group, "127.0.0.1").addBoth(results.append)
    assert results[0].check(error.MulticastJoinError)
    assert errno.EADDRINUSE in results[0].value.args


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_multicast_options(h: Harness, datapath: str, family: int) -> None:
    port, _ = h.serve(datapath, Recorder(), family)
    port.setTTL(7)
    assert port.getTTL() == 7
    port.setLoopbackMode(0)
    assert port.getLoopbackMode() is False
    port.setLoopbackMode(1)
    assert port.getLoopbackMode() is True
    iface: Any = "127.0.0.1" if family == socket.AF_INET else socket.if_nametoindex("lo")
    done: list[Any] = []
    port.setOutgoingInterface(iface).addBoth(done.append)
    assert done == [1]
    assert port.getOutgoingInterface() == iface


class _Alarm(Exception):
    pass


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_blocking_flag_set_elsewhere_does_not_wedge_reads(h: Harness, datapath: str) -> None:
    proto = Recorder(echo=False)
    port, m = h.serve(datapath, proto)
    # Another holder of the shared file description (the master, or a dead
    # worker) switches it to blocking mode after we adopted it.
    m.setblocking(True)
    assert os.get_blocking(port.fileno())
    c = h.client()
    for p in (b"1", b"2", b"3"):
        c.sendto(p, m.getsockname())

    def alarm(signum: int, frame: Any) -> None:
        raise _Alarm

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        got = 0
        for _ in range(1000):
            got += port.drain(100)
            if got >= 3:
                break
        # The queue is empty now: a blocking read would sleep until the alarm.
        assert port.drain(100) == 0
    except _Alarm:
        pytest.fail("a read blocked on a socket someone else set to blocking mode")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert [d for d, _ in proto.received] == [b"1", b"2", b"3"]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_drain_reads_everything_queued_within_bound(h: Harness, datapath: str) -> None:
    total = 300
    proto = Recorder(echo=False)
    port, m = h.serve(datapath, proto, rcvbuf=1 << 20)
    port.stopReading()  # a standby listener: only drain() reads
    c = h.client()
    for i in range(total):
        c.sendto(b"%d" % i, m.getsockname())
    counts = []
    deadline = time.monotonic() + DEADLINE_S
    while len(proto.received) < total and time.monotonic() < deadline:
        counts.append(port.drain(64))
    assert sum(counts) == total
    assert max(counts) == 64
    assert all(0 <= n <= 64 for n in counts)
    assert port.drain(1000) == 0
    assert [d for d, _ in proto.received] == [b"%d" % i for i in range(total)]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_standby_listener_stops_and_resumes_reading(h: Harness, datapath: str) -> None:
    proto = Recorder()
    port, m = h.serve(datapath, proto)
    port.stopReading()
    c = h.client()
    c.sendto(b"queued", m.getsockname())
    for _ in range(5):
        h.reactor.runUntilCurrent()
        h.reactor.doIteration(0)
    assert proto.received == []
    port.startReading()
    h.spin(lambda: len(proto.received) == 1, "the queued datagram")
    assert c.recvfrom(100)[0] == b"queued"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_stats_count_traffic_and_sample_durations(h: Harness, datapath: str, family: int) -> None:
    stats = ListenerStats()
    proto = Recorder()
    _, m = h.serve(datapath, proto, family, stats=stats)
    c = h.client(family)
    n = 4 * SAMPLE_EVERY
    _echo_exchange(h, m.getsockname(), c, [b"0123456789"] * n, proto)
    assert (stats.rx_datagrams, stats.rx_bytes) == (n, 10 * n)
    assert (stats.tx_datagrams, stats.tx_bytes) == (n, 10 * n)
    assert stats.tx_errors == 0
    assert stats.duration_count == n // SAMPLE_EVERY
    assert sum(stats.duration_buckets) == n // SAMPLE_EVERY


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_stop_listening_stops_protocol_and_keeps_master_socket(h: Harness, datapath: str) -> None:
    proto = Recorder()
    port, m = h.serve(datapath, proto)
    assert proto.started == 1
    own_fd = port.fileno()
    assert own_fd != m.fileno()
    fired: list[Any] = []
    port.stopListening().addBoth(fired.append)
    h.spin(lambda: bool(fired), "stopListening's Deferred")
    assert fired == [None]
    assert proto.stopped == 1
    # The master's socket is untouched and still bound; the dup is closed.
    assert m.getsockname()[1] != 0
    c = h.client()
    c.sendto(b"for the next worker", m.getsockname())
    assert m.recvfrom(100)[0] == b"for the next worker"


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_adopted_socket_is_nonblocking(h: Harness, datapath: str) -> None:
    m = h.master()
    m.setblocking(True)
    port = port_class(datapath).adopt(m, Recorder(), h.reactor)
    h.ports.append(port)
    port.startListening()
    assert not os.get_blocking(m.fileno())  # one file description, one flag


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_each_client_gets_its_own_replies(h: Harness, datapath: str, family: int) -> None:
    proto = Recorder()
    _, m = h.serve(datapath, proto, family)
    clients = [h.client(family) for _ in range(8)]
    rounds = 5
    for r in range(rounds):
        for i, c in enumerate(clients):
            c.sendto(b"%d:%d" % (i, r), m.getsockname()[:2])
    h.spin(lambda: len(proto.received) == rounds * len(clients), "every client's datagrams")
    for i, c in enumerate(clients):
        assert [c.recvfrom(100)[0] for _ in range(rounds)] == [
            b"%d:%d" % (i, r) for r in range(rounds)
        ]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_many_writes_per_datagram_to_another_address_arrive_in_order(
    h: Harness, datapath: str
) -> None:
    """More replies than one send batch holds, to a destination that is not the sender."""
    proto = Recorder()
    sink = h.client()
    per_datagram = 150

    def fan_out(datagram: bytes, addr: Any) -> None:
        for i in range(per_datagram):
            proto.transport.write(datagram + b"/%d" % i, sink.getsockname())

    proto.reply = fan_out
    _, m = h.serve(datapath, proto, rcvbuf=1 << 20)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    c = h.client()
    for tag in (b"a", b"b"):
        c.sendto(tag, m.getsockname())
    h.spin(lambda: len(proto.received) == 2, "both datagrams")
    got = [sink.recvfrom(100)[0] for _ in range(2 * per_datagram)]
    assert got == [t + b"/%d" % i for t in (b"a", b"b") for i in range(per_datagram)]


@pytest.mark.parametrize("family", FAMILIES)
def test_python_batch_larger_than_its_send_arena_goes_out_whole_and_in_order(
    h: Harness, family: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The python path packs a batch's replies into one arena per sendmmsg; a
    batch that does not fit is sent in several, each datagram intact."""
    from shardudp import _pybatch

    if not _pybatch.AVAILABLE:
        pytest.skip(_pybatch.MISSING)
    monkeypatch.setattr(_pybatch, "_ARENA_MIN", 4096)
    monkeypatch.setattr(_pybatch, "_ARENA_PER_SLOT", 1)
    proto = Recorder()
    sink = h.client(family)
    sizes = [1500, 3000, 4096, 10, 2500, 1, 4000]  # 3000 + 4096 > the arena

    def fan_out(datagram: bytes, addr: Any) -> None:
        for i, size in enumerate(sizes):
            proto.transport.write(bytes([65 + i]) * size, sink.getsockname()[:2])
        proto.transport.write(b"done", addr)

    proto.reply = fan_out
    _, m = h.serve("python", proto, family)
    c = h.client(family)
    c.sendto(b"go", m.getsockname()[:2])
    h.spin(lambda: len(proto.received) == 1, "the datagram")
    assert c.recvfrom(100)[0] == b"done"
    got = [sink.recvfrom(70000)[0] for _ in sizes]
    assert got == [bytes([65 + i]) * size for i, size in enumerate(sizes)]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_address_caches_stay_bounded_and_answer_right_when_full(
    h: Harness, datapath: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More senders and destinations than the caches hold: every reply still
    goes to the right client, and no cache outgrows its bound."""
    from shardudp import _pybatch

    monkeypatch.setattr(_pybatch, "_RX_CACHE_SIZE", 2)
    monkeypatch.setattr(ShardPort, "addressCacheSize", 2)
    proto = Recorder(echo=False)
    sinks = [h.client() for _ in range(3)]

    def reply_and_copy(datagram: bytes, addr: Any) -> None:
        proto.transport.write(b"re:" + datagram, addr)
        for s in sinks:
            proto.transport.write(b"cc:" + datagram, s.getsockname())

    proto.reply = reply_and_copy
    port, m = h.serve(datapath, proto)
    clients = [h.client() for _ in range(5)]
    for rnd in range(2):
        for i, c in enumerate(clients):
            c.sendto(b"%d.%d" % (rnd, i), m.getsockname())
    h.spin(lambda: len(proto.received) == 10, "every datagram")
    for i, c in enumerate(clients):
        assert sorted(c.recvfrom(100)[0] for _ in range(2)) == [b"re:0.%d" % i, b"re:1.%d" % i]
    for s in sinks:
        got = {s.recvfrom(100)[0] for _ in range(10)}
        assert got == {b"cc:%d.%d" % (r, i) for r in range(2) for i in range(5)}
    caches: list[dict[Any, Any]] = [port._good_hosts]
    engine = getattr(port, "_engine", None)
    if isinstance(engine, _pybatch.Engine):
        caches += [engine._tx_cache, engine._rx_cache]
    assert all(len(c) <= 2 for c in caches), [len(c) for c in caches]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_writes_outside_a_read_and_odd_buffer_types(h: Harness, datapath: str) -> None:
    proto = Recorder(echo=False)
    port, _ = h.serve(datapath, proto)
    sink = h.client()
    dest = sink.getsockname()
    h.reactor.callLater(0, port.write, b"from a timer", dest)
    h.spin(lambda: not h.reactor.getDelayedCalls(), "the timer")
    port.write(bytearray(b"bytearray"), dest)
    port.write(memoryview(b"memoryview"), addr=dest)
    port.write(datagram=b"keywords", addr=dest)
    got = [sink.recvfrom(100)[0] for _ in range(4)]
    assert got == [b"from a timer", b"bytearray", b"memoryview", b"keywords"]
    with pytest.raises(TypeError):
        port.write("text is not bytes", dest)  # type: ignore[arg-type]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_connected_port_refuses_other_destinations(h: Harness, datapath: str) -> None:
    port, _ = h.serve(datapath, Recorder(), shared=False)
    peer = h.client()
    port.connect(*peer.getsockname())
    with pytest.raises(error.InvalidAddressError):
        port.write(b"x", ("127.0.0.1", 9))
    port.write(b"ok", peer.getsockname())
    assert peer.recvfrom(100)[0] == b"ok"


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_stop_listening_from_inside_the_handler(h: Harness, datapath: str) -> None:
    proto = Recorder()
    port, m = h.serve(datapath, proto)

    def stop_on_first(datagram: bytes, addr: Any) -> None:
        proto.transport.write(datagram, addr)
        if len(proto.received) == 1:
            port.stopListening()

    proto.reply = stop_on_first
    c = h.client()
    for p in (b"1", b"2", b"3"):
        c.sendto(p, m.getsockname())
    h.spin(lambda: proto.stopped == 1, "stopProtocol")
    # Whatever the batch held was still delivered and answered, like stock.
    n = len(proto.received)
    assert 1 <= n <= 3
    assert [c.recvfrom(100)[0] for _ in range(n)] == [b"1", b"2", b"3"][:n]
    assert not port.connected


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_port_closed_by_its_own_handler_mid_batch(h: Harness, datapath: str) -> None:
    proto = Recorder()
    port, m = h.serve(datapath, proto)

    def close_on_first(datagram: bytes, addr: Any) -> None:
        proto.transport.write(datagram, addr)
        if len(proto.received) == 1:
            port.connectionLost(None)

    proto.reply = close_on_first
    c = h.client()
    for p in (b"1", b"2", b"3"):
        c.sendto(p, m.getsockname())
    port.stopReading()
    h.spin(lambda: port.drain(10) == 0 and len(proto.received) > 0, "the first datagram")
    assert proto.stopped == 1
    assert not port.connected
    # The master's socket still holds what the closed port did not read.
    m.setblocking(False)
    left = []
    for _ in range(3):
        try:
            left.append(m.recv(100))
        except BlockingIOError:
            break
    seen = [d for d, _ in proto.received] + left
    # A batch path had the whole batch in memory already: what it had not yet
    # delivered is dropped with the port, never delivered after the close.
    if datapath in BATCHED:
        assert seen == [b"1", b"2", b"3"][: len(seen)]
    else:
        assert seen == [b"1", b"2", b"3"]
    assert proto.received[0][0] == b"1"


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_every_handler_failure_is_counted_even_when_sampled(h: Harness, datapath: str) -> None:
    stats = ListenerStats()
    proto = Recorder(fail_on=b"bad")
    _, m = h.serve(datapath, proto, stats=stats)
    c = h.client()
    n = 3 * SAMPLE_EVERY
    for _ in range(n):
        c.sendto(b"bad", m.getsockname())
    h.spin(lambda: len(proto.received) == n, "all datagrams")
    assert stats.errors["value"] == n
    assert stats.rx_datagrams == n
    assert stats.duration_count == 0  # a failed call is counted, not timed


def _replies_held_during_batch(h: Harness, datapath: str) -> tuple[list[bool], list[bytes]]:
    """Queue 8 datagrams, then read them; each handler replies, then looks at
    the client socket: has its own reply arrived yet? Returns (seen, replies)."""
    proto = Recorder(echo=False)
    c = h.client()
    c.setblocking(False)
    seen: list[bool] = []
    arrived: list[bytes] = []

    def reply_then_look(datagram: bytes, addr: Any) -> None:
        proto.transport.write(b"re:" + datagram, addr)
        for _ in range(100):
            try:
                arrived.append(c.recv(100))
            except BlockingIOError:
                break
        seen.append(b"re:" + datagram in arrived)

    proto.reply = reply_then_look
    port, m = h.serve(datapath, proto)
    port.stopReading()  # queue them all before the first read
    sent = [b"%d" % i for i in range(8)]
    for p in sent:
        c.sendto(p, m.getsockname())
    h.spin(lambda: port.drain(10) == 0 and len(proto.received) == 8, "the datagrams")
    c.settimeout(DEADLINE_S)
    arrived += [c.recv(100) for _ in range(8 - len(arrived))]
    return seen, arrived


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_writes_during_a_batch_are_sent_together_at_its_end(h: Harness, datapath: str) -> None:
    seen, replies = _replies_held_during_batch(h, datapath)
    assert replies == [b"re:%d" % i for i in range(8)]
    if datapath in BATCHED:
        # Queued, then one sendmmsg after the last handler of each batch.
        assert seen == [False] * 8
    else:
        # One sendto per write, as stock Twisted does.
        assert seen == [True] * 8


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_slow_handler_replies_are_not_held_for_a_whole_batch(h: Harness, datapath: str) -> None:
    """A handler taking milliseconds: the C path reads one datagram at a time,
    so each reply leaves before the next datagram is even read (and a worker
    killed mid-way has read only the datagram it was handling)."""
    proto = Recorder(echo=False)
    c = h.client()
    c.setblocking(False)
    arrived: list[bytes] = []

    def slow_reply(datagram: bytes, addr: Any) -> None:
        for _ in range(100):
            try:
                arrived.append(c.recv(100))
            except BlockingIOError:
                break
        time.sleep(0.003)  # the handler's own work, not synchronisation
        proto.transport.write(b"re:" + datagram, addr)

    proto.reply = slow_reply
    port, m = h.serve(datapath, proto)
    port.stopReading()
    for i in range(10):
        c.sendto(b"%d" % i, m.getsockname())
    h.spin(lambda: port.drain(20) == 0 and len(proto.received) == 10, "the datagrams")
    # By the time the last datagram was handled, the replies to all but the
    # last one or two had left (the first read's size is not yet adapted).
    assert len(arrived) >= 8, arrived


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_replies_written_before_the_handler_closes_its_port_go_out(
    h: Harness, datapath: str
) -> None:
    proto = Recorder(echo=False)

    def reply_then_close(datagram: bytes, addr: Any) -> None:
        proto.transport.write(b"re:" + datagram, addr)
        if len(proto.received) == 1:
            port.connectionLost(None)

    proto.reply = reply_then_close
    port, m = h.serve(datapath, proto)
    port.stopReading()
    c = h.client()
    for p in (b"1", b"2"):
        c.sendto(p, m.getsockname())
    h.spin(lambda: port.drain(10) == 0 and len(proto.received) > 0, "the first datagram")
    assert not port.connected
    assert c.recv(100) == b"re:1"


def _refusals(h: Harness, proto: Recorder, port: Any, peer: socket.socket) -> tuple[int, int]:
    """A connected port whose peer is gone; the handler writes 100 datagrams
    per datagram (more than one send batch). Returns (refused, writes)."""
    writes = 0

    def flood(datagram: bytes, addr: Any) -> None:
        nonlocal writes
        for i in range(100):
            proto.transport.write(b"%d" % i)
            writes += 1

    def refused_and_write() -> None:
        nonlocal writes
        proto.refused += 1
        if proto.refused <= 3:  # a write from inside connectionRefused
            proto.transport.write(b"after refusal")
            writes += 1

    proto.reply = flood
    proto.connectionRefused = refused_and_write  # type: ignore[method-assign]
    port.connect(*peer.getsockname())
    peer.sendto(b"go", (port.getHost().host, port.getHost().port))
    peer.close()  # every datagram to it now comes back as ICMP port unreachable
    h.spin(lambda: len(proto.received) == 1, "the peer's datagram")
    return proto.refused, writes


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_connection_refused_per_write_matches_stock(h: Harness, datapath: str) -> None:
    stock_proto = Recorder(echo=False)
    m = h.master()
    stock: Any = MulticastPort
    stock_port = stock._fromListeningDescriptor(
        h.reactor, m.fileno(), socket.AF_INET, stock_proto, maxPacketSize=65535
    )
    stock_port.startListening()
    h.ports.append(stock_port)
    want = _refusals(h, stock_proto, stock_port, h.client())

    stats = ListenerStats()
    proto = Recorder(echo=False)
    port, _ = h.serve(datapath, proto, stats=stats, shared=False)
    got = _refusals(h, proto, port, h.client())
    assert got[1] == want[1]
    # Each refused write is reported, as stock does (about every other one:
    # a refusal clears the socket error, so the next send goes out). The
    # last read may or may not meet one more ICMP error.
    assert want[0] > 10
    assert abs(got[0] - want[0]) <= 2, (got, want)
    # Every write is accounted for: sent, or failed and counted.
    assert stats.tx_datagrams + stats.tx_errors == got[1]


class _FailsToStop(Recorder):
    def stopProtocol(self) -> None:
        super().stopProtocol()
        raise RuntimeError("flush to the database failed")


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_stop_listening_completes_when_stop_protocol_raises(
    h: Harness, datapath: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="shardudp.port")
    proto = _FailsToStop()
    port, m = h.serve(datapath, proto)
    own_fd = port.fileno()
    fired: list[Any] = []
    port.stopListening().addBoth(fired.append)
    h.spin(lambda: bool(fired), "stopListening's Deferred")
    # The worker's shutdown waits on this Deferred: it fires, the port's
    # own socket is closed, and the error is logged once, with its traceback.
    assert fired == [None]
    assert proto.stopped == 1
    with pytest.raises(OSError) as closed:
        os.fstat(own_fd)
    assert closed.value.errno == errno.EBADF
    (record,) = [r for r in caplog.records if "flush to the database failed" in r.getMessage()]
    assert record.exc_info is not None
    c = h.client()
    c.sendto(b"for the next worker", m.getsockname())
    assert m.recvfrom(100)[0] == b"for the next worker"


_REFILL_DURING_FLUSH = r"""
import socket, subprocess, sys
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import DatagramProtocol
from shardudp import port as port_mod

DST = ("10.99.0.1", 9)  # routed via lo inside this namespace only
refills = []

class Port(getattr(port_mod, sys.argv[1])):
    def _async_send_failed(self, exc):
        # Any Python run while a flush reports errors (a log handler, say)
        # that writes a whole batch: the queue must not overflow.
        if not refills:
            refills.append(exc.errno)
            for _ in range(self.batchSize):
                self.write(b"refill", DST)

class P(DatagramProtocol):
    def datagramReceived(self, data, addr):
        if data == b"prime":
            self.transport.write(b"p", DST)  # the first write validates and caches DST
        else:
            subprocess.run(["ip", "route", "del", "10.99.0.0/16", "dev", "lo"], check=True)
            for _ in range(Port.batchSize + 1):  # the last one flushes a full queue
                self.transport.write(b"x", DST)

r = EPollReactor()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
port = Port.adopt(s, P(), r, shared=False)
port.startListening()
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for msg in (b"prime", b"go"):
    c.sendto(msg, s.getsockname())
    port.drain(1)
print("refilled after", refills)
"""


@pytest.mark.parametrize("cls", ["PythonShardPort", pytest.param("CShardPort", marks=_need_c)])
def test_writes_from_a_flush_error_callback_never_overflow_the_send_queue(cls: str) -> None:
    """A flush that meets send errors reports them through Python, which may
    write a whole batch more; the queue is checked again after every flush."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("needs root, iproute2 and unshare for a private network namespace")
    setup = "ip link set lo up && ip route add 10.99.0.0/16 dev lo && exec \"$0\" -c \"$1\""
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup + ' "$2"', sys.executable, _REFILL_DURING_FLUSH,
         cls],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"refilled after [{errno.ENETUNREACH}]" in proc.stdout, proc.stdout + proc.stderr


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
@pytest.mark.parametrize("datapath", DATAPATHS)
def test_stop_listening_completes_and_closes_everything_when_stop_protocol_exits(
    h: Harness, datapath: str, exc_type: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """stopProtocol may raise what ``except Exception`` misses (sys.exit() in
    the APP, a ^C): the port still closes, the C engine included, and
    stopListening's Deferred still fires."""
    caplog.set_level(logging.ERROR, logger="shardudp.port")

    class Exits(Recorder):
        def stopProtocol(self) -> None:
            super().stopProtocol()
            raise exc_type("leaving from stopProtocol")

    before = _open_fd_count()
    proto = Exits()
    port, _ = h.serve(datapath, proto)
    fired: list[Any] = []
    port.stopListening().addBoth(fired.append)
    h.spin(lambda: bool(fired), "stopListening's Deferred")
    assert fired == [None]
    assert proto.stopped == 1
    # Only the master's socket is left: no dup of the port or its engine.
    assert _open_fd_count() - before == 1
    (record,) = [r for r in caplog.records if "leaving from stopProtocol" in r.getMessage()]
    assert exc_type.__name__ in record.getMessage()


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_a_protocols_own_socket_bound_to_a_group_joins_it_for_real(
    h: Harness, datapath: str
) -> None:
    """reactor.listenMulticast(port, proto, interface=GROUP) in a worker: the
    socket is the protocol's, not the master's, so joinGroup really joins."""
    group = "239.255.77.1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    h.masters.append(s)
    s.bind((group, 0))
    proto = Recorder(echo=False)
    port = port_class(datapath).adopt(s, proto, h.reactor, shared=False)
    port.startListening()
    h.ports.append(port)
    joined: list[object] = []
    port.joinGroup(group, "127.0.0.1").addBoth(joined.append)
    h.spin(lambda: bool(joined), "joinGroup")
    assert joined == [None]
    sender = h.client()
    sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    sender.sendto(b"to the group", (group, s.getsockname()[1]))
    h.spin(lambda: len(proto.received) == 1, "the group's datagram")
    assert proto.received[0][0] == b"to the group"
