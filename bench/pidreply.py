"""A shardudp app that answers every datagram with the pid of its worker.

    shardudp run bench.pidreply:PidReply --bind 127.0.0.1:PORT --workers 4

The evenness scenario sends one datagram from each of many source ports and
tallies the pids: which worker the kernel's reuseport hash gave each flow.
It needs nothing from shardudp beyond running the protocol.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.protocol import DatagramProtocol


class PidReply(DatagramProtocol):
    def __init__(self) -> None:
        self._pid = str(os.getpid()).encode()

    def startProtocol(self) -> None:
        # Instances may be built before the fork; the pid that matters is the
        # worker's, known once the protocol starts in it.
        self._pid = str(os.getpid()).encode()

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        # Twisted types IUDPTransport.write as an interface method (no self),
        # which mypy cannot call correctly; the call itself is the stock one.
        transport: Any = self.transport
        transport.write(self._pid, addr)
