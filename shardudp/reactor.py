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

from twisted.internet import epollreactor, error
from twisted.internet.main import installReactor as _install_reactor

from .port import ShardPort, port_class

# Twisted is untyped here; calling through Any keeps --strict honest elsewhere.
_CannotListenError: Any = error.CannotListenError
_install: Any = _install_reactor


def _bound_socket(port: int, interface: str, reuse: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
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
    reactor: Any = ShardReactor()
    reactor.port_cls = port_class(datapath)
    _install(reactor)
    return reactor  # type: ignore[no-any-return]
