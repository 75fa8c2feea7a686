"""Protocols for the multicast and drop tests (run inside shardudp workers)."""

from __future__ import annotations

import os
import time

from twisted.internet.protocol import DatagramProtocol


class Member(DatagramProtocol):
    """Answers ``PID:payload``; commands act on the transport and answer what happened.

    ``options`` -> ``PID:ttl=T loop=L``; ``setttl N`` (and loopback on); ``join G [IFACE]`` and
    ``leave G [IFACE]`` -> ``PID:join ok`` or ``PID:join failed: ...``.
    With $MEMBER_JOIN ("GROUP IFACE"), joins that group when it starts. With
    $MEMBER_CLOBBER_IF (an address), sets it as the outgoing interface every
    2 ms, as an APP sharing a single-mode socket may do at any time.
    """

    def startProtocol(self):
        join = os.environ.get("MEMBER_JOIN")
        if join:
            self.transport.joinGroup(*join.split())
        clobber = os.environ.get("MEMBER_CLOBBER_IF")
        if clobber:
            from twisted.internet import task

            self.clobber = task.LoopingCall(self.transport.setOutgoingInterface, clobber)
            self.clobber.start(0.002)

    def datagramReceived(self, data, addr):
        cmd, *args = data.decode(errors="replace").split()
        pid = os.getpid()
        if cmd == "options":
            t = self.transport
            self.transport.write(f"{pid}:ttl={t.getTTL()} loop={int(t.getLoopbackMode())}"
                                 .encode(), addr)
        elif cmd == "setttl":
            self.transport.setTTL(int(args[0]))
            self.transport.setLoopbackMode(1)
            self.transport.write(f"{pid}:set".encode(), addr)
        elif cmd in ("join", "leave"):
            call = self.transport.joinGroup if cmd == "join" else self.transport.leaveGroup
            d = call(*args)
            d.addCallbacks(
                lambda _: self.transport.write(f"{pid}:{cmd} ok".encode(), addr),
                lambda f: self.transport.write(
                    f"{pid}:{cmd} failed: {f.getErrorMessage()}".encode(), addr))
        else:
            self.transport.write(b"%d:" % pid + data, addr)


class Slow(DatagramProtocol):
    """Answers ``PID:payload`` after $SLOW_MS milliseconds of work per datagram."""

    def datagramReceived(self, data, addr):
        time.sleep(float(os.environ.get("SLOW_MS", "20")) / 1000)  # the handler's work
        self.transport.write(b"%d:" % os.getpid() + data, addr)
