"""The worker's reactor: Twisted's epoll reactor whose UDP ports are ours.

Imported only in a worker, after fork. ``listenUDP``/``listenMulticast``
called by a protocol (for example to open a client socket it will
``connect()``) return the same port class the listeners use, not shared with
anyone, so connected UDP gets ``connectionRefused`` where stock Twisted on
epoll would close the port on the ICMP error.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import abstract, epollreactor, error
from twisted.internet.main import installReactor as _install_reactor

from .port import ShardPort, port_class

# Twisted is untyped here; calling through Any keeps --strict honest elsewhere.
_CannotListenError: Any = error.CannotListenError
_InvalidAddressError: Any = error.InvalidAddressError
_install: Any = _install_reactor
_is_ipv4: Any = abstract.isIPAddress
_is_ipv6: Any = abstract.isIPv6Address


def _address_family(interface: str) -> socket.AddressFamily:
    """The family stock ``udp.Port`` picks for ``interface``, raising what it raises.

    Stock refuses a hostname in its constructor, before any socket exists;
    binding it instead would resolve the name (a DNS query in the reactor
    thread) and fail, or succeed, differently.
    """
    if _is_ipv6(interface):
        return socket.AF_INET6
    if _is_ipv4(interface):
        return socket.AF_INET
    if interface:
        raise _InvalidAddressError(interface, "not an IPv4 or IPv6 address.")
    return socket.AF_INET


def _bound_socket(port: int, interface: str, reuse: bool) -> socket.socket:
    family = _address_family(interface)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse:
            # Twisted's listenMultiple semantics, asked for by the protocol.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
    except OSError as exc:
        sock.close()
        raise _CannotListenError(interface, port, exc) from None
    return sock


_EPollReactor: Any = epollreactor.EPollReactor


class ShardReactor(_EPollReactor):  # type: ignore[misc]
    """Stock epoll reactor whose ``listenUDP``/``listenMulticast`` give ``port_cls`` ports."""

    port_cls: type[ShardPort]

    def _listen(self, port: int, protocol: Any, interface: str, max_packet_size: int,
                reuse: bool) -> ShardPort:
        sock = _bound_socket(port, interface, reuse)
        try:
            p: Any = self.port_cls.adopt(sock, protocol, self, stats=None, shared=False,
                                         max_packet_size=max_packet_size)
        finally:
            sock.close()  # the port holds its own dup
        p.startListening()
        return p  # type: ignore[no-any-return]

    def listenUDP(self, port: int, protocol: Any, interface: str = "",
                  maxPacketSize: int = 8192) -> ShardPort:
        return self._listen(port, protocol, interface, maxPacketSize, reuse=False)

    def listenMulticast(self, port: int, protocol: Any, interface: str = "",
                        maxPacketSize: int = 8192, listenMultiple: bool = False) -> ShardPort:
        return self._listen(port, protocol, interface, maxPacketSize, reuse=listenMultiple)


def install(datapath: str) -> ShardReactor:
    """Install our reactor for ``datapath`` in this process (a worker, after fork)."""
    reactor: Any = ShardReactor()
    reactor.port_cls = port_class(datapath)
    _install(reactor)
    return reactor  # type: ignore[no-any-return]
