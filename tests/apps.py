"""Protocols used by the integration tests (run inside shardudp workers)."""

from __future__ import annotations

import gc
import logging
import os
import struct
import time

from twisted.internet.protocol import DatagramProtocol

log = logging.getLogger("apps")


def _my_pipe_fd() -> int:
    """The worker's pipe to the master (found the way a buggy APP might)."""
    from shardudp.worker import Worker

    return next(obj.out.fd for obj in gc.get_objects() if isinstance(obj, Worker))


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
        if data == b"wedge-chatty":  # a thread keeps logging: still no heartbeat
            import threading

            def chatter():
                for i in range(100_000):
                    log.info("thread still here %d", i)
                    time.sleep(0.01)

            threading.Thread(target=chatter, daemon=True).start()
            data = b"wedge"
        if data == b"wedge":
            log.warning("wedging")
            time.sleep(3600)
        if data == b"block-and-exit":
            # O_NONBLOCK lives on the shared open file: the replacement
            # worker inherits this blocking mode unless it copes.
            self.transport.socket.setblocking(True)
            os._exit(7)
        if data == b"corrupt":
            os.write(_my_pipe_fd(), b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
            return
        if data == b"close-pipe":  # the next write to the master fails (EBADF)
            os.close(_my_pipe_fd())
            return
        if data == b"null-pipe":  # the master sees EOF; our writes still "succeed"
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, _my_pipe_fd())
            os.close(null)
            return
        if data == b"oversize":
            from shardudp import wire

            os.write(_my_pipe_fd(), struct.pack(">I", wire.MAX_FRAME + 1))
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


class Chatty(DatagramProtocol):
    """Echo that logs numbered lines in bursts for as long as it runs."""

    def startProtocol(self):
        from twisted.internet import task

        self.n = 0
        self.loop = task.LoopingCall(self.chat)
        self.loop.start(0.01)

    def chat(self):
        for _ in range(25):
            self.n += 1
            log.info("chat %d", self.n)

    def stopProtocol(self):
        self.loop.stop()

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class Slow(DatagramProtocol):
    """Echo taking 2 ms per datagram, so a burst stays queued for a while."""

    def datagramReceived(self, data, addr):
        time.sleep(0.002)  # the app's own work
        self.transport.write(data, addr)


class StuckStop(DatagramProtocol):
    """Echo whose stopProtocol never returns in time."""

    def stopProtocol(self):
        time.sleep(60)

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class CrashAfterReady(DatagramProtocol):
    """Exits (code 5) right after READY while $CRASH_FILE counts fewer than $CRASHES boots."""

    def startProtocol(self):
        from twisted.internet import reactor

        path = os.environ["CRASH_FILE"]
        with open(path, "a+") as f:
            f.write("boot\n")
            f.seek(0)
            boots = len(f.read().split())
        if boots <= int(os.environ["CRASHES"]):
            reactor.callLater(0, os._exit, 5)

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class Printer(DatagramProtocol):
    """print()s a burst of numbered lines when it starts (the seed's apps print)."""

    LINES = 300

    def startProtocol(self):
        pid = os.getpid()
        for i in range(self.LINES):
            print(f"printer {pid} {i:04d} " + "x" * 60)
        print(f"printer {pid} done")


class ExitInStartProtocol(DatagramProtocol):
    """Exits with status 7 while booting (an APP calling os._exit in startProtocol)."""

    def startProtocol(self):
        os._exit(7)


class RaiseInStartProtocol(DatagramProtocol):
    """Raises in startProtocol: the boot failure line must say where."""

    def startProtocol(self):
        raise RuntimeError("boom in startProtocol")


class HugeBootError(DatagramProtocol):
    """Raises in startProtocol with a 2 MB message (a dumped config, say)."""

    def startProtocol(self):
        raise RuntimeError("bad config value: " + "x" * 2_000_000 + " (the end)")


class SurrogateBootError(DatagramProtocol):
    """Raises in startProtocol naming a file whose name is not UTF-8."""

    def startProtocol(self):
        raise RuntimeError("cannot read " + os.fsdecode(b"/etc/caf\xe9.conf"))


class SurrogateLog(DatagramProtocol):
    """Echo that logs a file name that is not UTF-8 when it starts."""

    def startProtocol(self):
        log.warning("file name %s", os.fsdecode(b"caf\xe9"))

    def datagramReceived(self, data, addr):
        self.transport.write(data, addr)


class Faulty(DatagramProtocol):
    """WhoAmI (``pid:payload``), plus payloads that break the worker in the ways
    the blackhole audit measured: ``poison`` (os._exit in the handler),
    ``close`` (the APP closes its own port), ``wedge`` (a handler that never
    returns)."""

    def datagramReceived(self, data, addr):
        if data.startswith(b"poison"):
            os._exit(7)
        if data.startswith(b"close"):
            self.transport.stopListening()
            return
        if data.startswith(b"wedge"):
            time.sleep(3600)
        self.transport.write(b"%d:" % os.getpid() + data, addr)


class Sessions(DatagramProtocol):
    """A stateful APP: answers ``seq version pid`` where seq counts this flow's
    datagrams in this protocol instance and version is read from
    $APP_VERSION_FILE when the module is imported (a reload picks it up)."""

    VERSION = (open(os.environ["APP_VERSION_FILE"]).read().strip()  # noqa: SIM115
               if "APP_VERSION_FILE" in os.environ else "0")

    def startProtocol(self):
        self.seq = {}

    def datagramReceived(self, data, addr):
        n = self.seq[addr] = self.seq.get(addr, 0) + 1
        self.transport.write(b"%d %s %d %s" % (n, self.VERSION.encode(), os.getpid(), data),
                             addr)


class Leaky(DatagramProtocol):
    """WhoAmI that keeps 256 KiB per datagram forever: its memory only grows."""

    def startProtocol(self):
        self.kept = []

    def datagramReceived(self, data, addr):
        self.kept.append(bytearray(256 * 1024))
        self.transport.write(b"%d:" % os.getpid() + data, addr)
