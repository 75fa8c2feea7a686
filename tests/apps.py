"""Protocols used by the integration tests (run inside shardudp workers)."""

from __future__ import annotations

import gc
import os
import time

from twisted.internet.protocol import DatagramProtocol


class WhoAmI(DatagramProtocol):
    """Echo prefixed with the worker's pid: tells which worker served a flow."""

    def datagramReceived(self, data, addr):
        self.transport.write(b"%d:" % os.getpid() + data, addr)


class Marker(DatagramProtocol):
    """Echo that records startProtocol/stopProtocol in $MARKER_FILE."""

    def _mark(self, what: str) -> None:
        with open(os.environ["MARKER_FILE"], "a") as f:
            f.write(f"{what} {os.getpid()}\n")

    def startProtocol(self):
        self._mark("start")

    def stopProtocol(self):
        self._mark("stop")

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class Misbehave(DatagramProtocol):
    """Echo, plus commands that break the worker in chosen ways."""

    def datagramReceived(self, data, addr):
        if data == b"raise":
            raise ValueError("asked to raise")
        if data == b"exit":
            os._exit(7)
        if data == b"wedge":
            time.sleep(3600)
        if data == b"block-and-exit":
            # O_NONBLOCK lives on the shared open file: the replacement
            # worker inherits this blocking mode unless it copes.
            self.transport.socket.setblocking(True)
            os._exit(7)
        if data == b"corrupt":
            from shardudp.worker import Worker

            for obj in gc.get_objects():
                if isinstance(obj, Worker):
                    os.write(obj.out.fd, b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
            return
        self.transport.write(data, addr)


def broken_factory():
    raise RuntimeError("the database is down")


class NotAProtocol:
    pass


class Probe(DatagramProtocol):
    """Answers commands about the transport: used to check API behaviour."""

    def datagramReceived(self, data, addr):
        from twisted.internet import reactor

        cmd, _, arg = data.partition(b" ")
        if cmd == b"connect":
            try:
                self.transport.connect("127.0.0.1", 9)
            except Exception as exc:  # the point: report what was raised
                self.transport.write(f"{type(exc).__name__}: {exc}".encode(), addr)
            else:
                self.transport.write(b"connected", addr)
        elif cmd == b"hostname":
            try:
                self.transport.write(b"x", ("localhost", addr[1]))
            except Exception as exc:
                self.transport.write(f"{type(exc).__name__}: {exc}".encode(), addr)
        elif cmd == b"resolve":
            d = reactor.resolve(arg.decode())
            d.addCallback(lambda ip: self.transport.write(b"resolved " + ip.encode(), addr))
        else:
            self.transport.write(b"%d:" % os.getpid() + data, addr)


class SlowStart(DatagramProtocol):
    """Echo whose startProtocol waits while $SLOW_START_FILE exists (bounded)."""

    def startProtocol(self):
        path = os.environ.get("SLOW_START_FILE", "")
        for _ in range(200):
            if not path or not os.path.exists(path):
                return
            time.sleep(0.05)  # the app is slow to start; this is its behaviour

    def datagramReceived(self, data, addr):
        self.transport.write(b"%d:" % os.getpid() + data, addr)


class Upper(DatagramProtocol):
    """A second, distinguishable APP: answers in upper case."""

    def datagramReceived(self, data, addr):
        self.transport.write(data.upper(), addr)
