"""shardudp.port pieces that need no traffic: selector, input checks, log limiter."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import DatagramProtocol

from shardudp import datapaths
from shardudp.port import (
    HAVE_C_BATCHIO,
    CShardPort,
    PythonLoopShardPort,
    PythonShardPort,
    ShardedSocketError,
    ShardPort,
    TwistedShardPort,
    port_class,
)
from shardudp.stats import ListenerStats


def test_port_class_selects_each_datapath() -> None:
    assert port_class("python") is PythonShardPort
    assert port_class("python-loop") is PythonLoopShardPort
    assert port_class("twisted") is TwistedShardPort
    assert port_class("auto") is (CShardPort if HAVE_C_BATCHIO else PythonShardPort)
    for cls in (PythonShardPort, PythonLoopShardPort, TwistedShardPort, CShardPort):
        assert issubclass(cls, ShardPort)
    assert issubclass(ShardedSocketError, RuntimeError)


def test_port_class_c_names_why_it_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datapaths, "_C_MISSING", "no compiler at install time")
    with pytest.raises(RuntimeError, match="no compiler at install time"):
        port_class("c")
    assert port_class("auto") is PythonShardPort
    assert datapaths.resolve("auto") == "python"


def test_without_recvmmsg_auto_falls_back_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datapaths, "_C_MISSING", "no compiler at install time")
    monkeypatch.setattr(datapaths._pybatch, "MISSING", "the C library has no recvmmsg")
    with pytest.raises(RuntimeError, match=r"no recvmmsg.*python-loop"):
        port_class("python")
    assert port_class("auto") is PythonLoopShardPort
    assert set(datapaths.missing()) == {"c", "python"}


@pytest.mark.parametrize("bad", ["fast", "", "C", None, 3])
def test_port_class_rejects_unknown_names(bad: Any) -> None:
    with pytest.raises(ValueError, match="unknown datapath"):
        port_class(bad)


@pytest.fixture
def reactor() -> Iterator[Any]:
    r: Any = EPollReactor()
    yield r
    for sel in list(r.getReaders()):
        r.removeReader(sel)
    r.waker.connectionLost(None)
    r._poller.close()


def _bound_udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_adopt_rejects_bad_sockets(reactor: Any) -> None:
    proto = DatagramProtocol()
    with pytest.raises(TypeError, match=r"needs a socket\.socket"):
        PythonShardPort.adopt(5, proto, reactor)  # type: ignore[arg-type]
    unbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    closed = _bound_udp()
    closed.close()
    try:
        with pytest.raises(ValueError, match="needs a bound socket"):
            PythonShardPort.adopt(unbound, proto, reactor)
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            PythonShardPort.adopt(tcp, proto, reactor)
        with pytest.raises(ValueError, match="closed socket"):
            PythonShardPort.adopt(closed, proto, reactor)
    finally:
        unbound.close()
        tcp.close()


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"max_packet_size": 0}, ValueError, "1..65535"),
        ({"max_packet_size": 70000}, ValueError, "1..65535"),
        ({"max_packet_size": "big"}, TypeError, "must be an int"),
        ({"stats": {}}, TypeError, "ListenerStats"),
    ],
)
def test_adopt_rejects_bad_options(
    reactor: Any, kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    s = _bound_udp()
    try:
        with pytest.raises(exc, match=match):
            PythonShardPort.adopt(s, DatagramProtocol(), reactor, **kwargs)
    finally:
        s.close()


class _FailingSocket:
    """Stands in for the port's socket to produce send errors loopback never gives."""

    def __init__(self, err: int) -> None:
        self.err = err

    def sendto(self, data: bytes, flags: int, addr: Any) -> int:
        raise OSError(self.err, "injected")


@pytest.mark.parametrize("datapath", ["python", "python-loop", "twisted"])
@pytest.mark.parametrize(
    ("err", "raised"),
    [
        (errno.EAGAIN, None),
        (errno.ENOBUFS, None),
        (errno.ECONNREFUSED, None),
        (errno.EMSGSIZE, error.MessageLengthError),
        (errno.ENETUNREACH, OSError),
    ],
)
def test_send_errors_map_like_stock_but_drop_on_full_buffers(
    reactor: Any, datapath: str, err: int, raised: type[BaseException] | None
) -> None:
    s = _bound_udp()
    stats = ListenerStats()
    try:
        port: Any = port_class(datapath).adopt(s, DatagramProtocol(), reactor, stats=stats)
        port.startListening()
        real = port._sock
        port._sock = _FailingSocket(err)
        if raised is None:
            port.write(b"x", ("127.0.0.1", 9))
        else:
            with pytest.raises(raised):
                port.write(b"x", ("127.0.0.1", 9))
        assert stats.tx_errors == 1
        assert stats.tx_datagrams == 0
        port._sock = real
        port.stopListening()
        reactor.runUntilCurrent()
    finally:
        s.close()


def test_address_cache_is_bounded(reactor: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PythonShardPort, "addressCacheSize", 16)
    s = _bound_udp()
    try:
        port: Any = PythonShardPort.adopt(s, DatagramProtocol(), reactor)
        for i in range(100):
            port._check_host(f"127.0.{i // 256}.{i % 256}")  # validated only, never sent
            assert len(port._good_hosts) <= 16
        with pytest.raises(error.InvalidAddressError, match="not hostnames"):
            port._check_host("example.invalid")
        assert "example.invalid" not in port._good_hosts
    finally:
        s.close()
