"""A sink: counts datagrams and does nothing else.

    shardudp run sink --bind 127.0.0.1:9999

(``sink`` is short for shardudp.workers.sink:Sink.)

The bench uses it for the sink scenarios, where the cost of receiving alone
is measured; ``received`` is per worker (one protocol instance per worker).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import DatagramProtocol


class Sink(DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received += 1
