"""shardudp.reactor: what listenUDP/listenMulticast refuse before binding anything."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import error
from twisted.internet.protocol import DatagramProtocol

from shardudp import reactor as reactor_mod
from shardudp.port import PythonLoopShardPort


@pytest.fixture
def reactor() -> Iterator[Any]:
    r: Any = reactor_mod.ShardReactor()
    r.port_cls = PythonLoopShardPort
    yield r
    for reader in list(r._internalReaders):
        r.removeReader(reader)
        reader.connectionLost(None)
    r._poller.close()


@pytest.mark.parametrize("call", ["listenUDP", "listenMulticast"])
@pytest.mark.parametrize("interface", ["example.com", "localhost", "1.2.3"])
def test_a_hostname_interface_is_refused_as_stock_refuses_it_before_binding(
    reactor: Any, call: str, interface: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[object] = []
    real = socket.socket

    def recording(*args: Any, **kwargs: Any) -> socket.socket:
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(socket, "socket", recording)
    with pytest.raises(error.InvalidAddressError) as info:
        getattr(reactor, call)(0, DatagramProtocol(), interface=interface)
    assert info.value.args == (interface, "not an IPv4 or IPv6 address.")
    # Even with the port argument wrong (Twisted's own test swaps them), the
    # interface is what is reported, as stock's Port constructor does.
    with pytest.raises(error.InvalidAddressError):
        getattr(reactor, call)(DatagramProtocol(), 0, interface=interface)
    assert made == []


@pytest.mark.parametrize(("interface", "family"), [
    ("", socket.AF_INET), ("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6),
])
def test_address_literals_pick_the_family_stock_picks(
    reactor: Any, interface: str, family: socket.AddressFamily
) -> None:
    port = reactor.listenUDP(0, DatagramProtocol(), interface=interface)
    try:
        assert isinstance(port, PythonLoopShardPort)
        assert port.socket.family == family
    finally:
        port.connectionLost(None)
