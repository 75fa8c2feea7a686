"""Multicast ping/pong from Twisted's UDP how-to, in Python 3.

Server, one copy per worker or sharded by source (see --multicast-mode):

    shardudp run multicast_ping \
        --multicast 228.0.0.5:9999 --multicast-interface 127.0.0.1

(``multicast_ping`` is short for shardudp.workers.multicast_ping:MulticastPingPong.)
It serves the group of the listener it runs on, whatever that is: the master
holds that membership. Only outside a multicast listener (``reactor.listenMulticast``
in plain Twisted, or a unicast listener) does it join the group the how-to
hard-codes, 228.0.0.5, or $PING_GROUP.

Client (joins the group and pings it; pongs come back by unicast):

    PING_INTERFACE=127.0.0.1 shardudp run multicast_ping_client \
        --bind 127.0.0.1:0 --workers 1

Group, port and interface of the client come from the environment (the how-to
hard-codes 228.0.0.5:9999 and lets the kernel pick the interface).
"""

import ipaddress
import os

from twisted.internet.protocol import DatagramProtocol

GROUP = os.environ.get("PING_GROUP", "228.0.0.5")
PORT = int(os.environ.get("PING_PORT", "9999"))
INTERFACE = os.environ.get("PING_INTERFACE", "")


def served_group(transport):
    """The multicast group ``transport`` is bound to (a shardudp multicast listener's
    socket is bound to its group), else None."""
    host = transport.getHost().host
    try:
        return host if ipaddress.ip_address(host).is_multicast else None
    except ValueError:  # '' or a name: not a group
        return None


class MulticastPingPong(DatagramProtocol):
    def startProtocol(self):
        """
        Called after protocol has started listening.
        """
        # Set the TTL>1 so multicast will cross router hops:
        self.transport.setTTL(5)
        # Join a specific multicast group: the listener's own, if it serves one (the
        # master already joined it there, so this changes nothing; joining another
        # group on that socket would fail).
        group = served_group(self.transport)
        if group is not None:
            self.transport.joinGroup(group)
        else:
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
