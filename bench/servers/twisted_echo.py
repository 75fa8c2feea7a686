"""Baseline: stock Twisted, one process, ``reactor.listenUDP`` (the how-to echo).

The epoll reactor is installed explicitly so the comparison with shardudp's
workers is reactor for reactor.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from bench.servers.common import announce_count, announce_ready, fail, parse_args


def main(argv: list[str] | None = None) -> int:
    args = parse_args("twisted_echo", argv)
    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError
    from twisted.internet.protocol import DatagramProtocol

    class Echo(DatagramProtocol):
        count = 0

        def datagramReceived(self, data: bytes, addr: Any) -> None:
            self.count += 1
            # IUDPTransport.write is typed as an interface method; see pidreply.
            transport: Any = self.transport
            transport.write(data, addr)

    class Sink(DatagramProtocol):
        count = 0

        def datagramReceived(self, data: bytes, addr: Any) -> None:
            self.count += 1

    proto = Echo() if args.echo else Sink()
    try:
        port = reactor.listenUDP(args.port, proto, interface=args.host)
    except CannotListenError as e:
        fail("twisted_echo", str(e))
    if args.rcvbuf:
        port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    announce_ready(port.getHost().port)
    # The reactor's own SIGTERM handler stops it; run() then returns here.
    reactor.run()  # type: ignore[misc]
    announce_count(proto.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
