"""Multicast ping/pong from Twisted's UDP how-to, in Python 3.

Server, one copy per worker or sharded by source (see --multicast-mode):

    shardudp run workers.multicast_ping:MulticastPingPong \
        --multicast 228.0.0.5:9999 --multicast-interface 127.0.0.1

Client (joins the group and pings it; pongs come back by unicast):

    PING_INTERFACE=127.0.0.1 shardudp run workers.multicast_ping:MulticastPingClient \
        --bind 127.0.0.1:0 --workers 1

Group, port and interface come from the environment (the how-to hard-codes
228.0.0.5:9999 and lets the kernel pick the interface).
"""

import os

from twisted.internet.protocol import DatagramProtocol

GROUP = os.environ.get("PING_GROUP", "228.0.0.5")
PORT = int(os.environ.get("PING_PORT", "9999"))
INTERFACE = os.environ.get("PING_INTERFACE", "")


class MulticastPingPong(DatagramProtocol):
    def startProtocol(self):
        """
        Called after protocol has started listening.
        """
        # Set the TTL>1 so multicast will cross router hops:
        self.transport.setTTL(5)
        # Join a specific multicast group:
        self.transport.joinGroup(GROUP, INTERFACE)

    def datagramReceived(self, datagram, address):
        print(f"Datagram {datagram!r} received from {address!r}", flush=True)
        if datagram == b"Client: Ping" or datagram == "Client: Ping":
            # Rather than replying to the group multicast address, we send the
            # reply directly (unicast) to the originating port:
            self.transport.write(b"Server: Pong", address)


class MulticastPingClient(DatagramProtocol):
    def startProtocol(self):
        if INTERFACE:
            self.transport.setOutgoingInterface(INTERFACE)
        # Join the multicast address, so we can receive replies:
        self.transport.joinGroup(GROUP, INTERFACE)
        # Send to GROUP:PORT - all listeners on the multicast address
        # (including us) will receive this message.
        self.transport.write(b"Client: Ping", (GROUP, PORT))

    def datagramReceived(self, datagram, address):
        print(f"Datagram {datagram!r} received from {address!r}", flush=True)
