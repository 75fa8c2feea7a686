"""The worker's UDP data path: Twisted-compatible ports over adopted sockets.

Every class here is a ``twisted.internet.udp.MulticastPort``, so protocols see
the transport they expect. What they add over stock Twisted:

* ``adopt()`` takes a socket the master created, bound and keeps, and dups it.
* Guards for shared (``SO_REUSEPORT``) sockets: ``connect()`` refuses, because
  on Linux a connected socket silently leaves its reuseport group. On a
  multicast listener's socket (bound to its group) the membership is the
  master's: joining or leaving that group is a successful no-op, and joining
  any other group fails (the socket could never receive it).
* ``MSG_DONTWAIT`` on every read and write: ``O_NONBLOCK`` lives on the open
  file description shared with the master and every past worker, so anyone
  could have set blocking mode.
* A handler exception is counted and logged (rate-limited), never fatal.
* Optional per-listener counters (``shardudp.stats.ListenerStats``).

Four data paths, picked with ``port_class()``:

* ``c``: ``recvmmsg``/``sendmmsg`` batches through ``shardudp._batchio``;
  writes made while a batch is delivered go out in one ``sendmmsg``.
* ``python``: the same batches and rules with nothing compiled: the C
  library's ``recvmmsg``/``sendmmsg`` through ``ctypes`` (``_pybatch``).
* ``python-loop``: one ``recvfrom`` per datagram in a tight loop, and a write
  path that validates each distinct address once instead of three times per
  datagram; for a C library without ``recvmmsg``.
* ``twisted``: stock Twisted's read and write algorithms with only the guards
  and counters added, as the baseline for A/B benchmarks.

``auto`` takes the first of c, python, python-loop that works here.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any, ClassVar, Final, Self

from twisted.internet import abstract, error
from twisted.internet.interfaces import IHalfCloseableDescriptor
from twisted.internet.udp import MulticastPort
from zope.interface import implementer

from shardudp import datapaths, inflight
from shardudp.errorlog import ErrorLog, TwistedErrorLog
from shardudp.errors import ShardedSocketError
from shardudp.membership import ListenerMembership, canonical_ip, membership_of
from shardudp.sockets import SEND_DROP_ERRNOS
from shardudp.stats import SAMPLE_EVERY, ListenerStats

HAVE_C_BATCHIO: Final = datapaths.C_ENGINE is not None

__all__ = [
    "HAVE_C_BATCHIO",
    "CShardPort",
    "PythonLoopShardPort",
    "PythonShardPort",
    "ShardPort",
    "ShardedSocketError",
    "TwistedShardPort",
    "port_class",
]

logger = logging.getLogger("shardudp.port")

# Twisted leaves these untyped; calling them through Any keeps --strict quiet
# without sprinkling ignores over the data path.
_InvalidAddressError: Any = error.InvalidAddressError
_MessageLengthError: Any = error.MessageLengthError
_StockPort: Any = MulticastPort

_MSG_DONTWAIT: Final = socket.MSG_DONTWAIT
_REC_STATE: Final = inflight.STATE
_REC_ADDR: Final = inflight.ADDR
_SAMPLE_MASK: Final = SAMPLE_EVERY - 1
DEFAULT_MAX_PACKET_SIZE: Final = 65535


def _stock_address_error(host: object, family: int) -> str | None:
    """Why stock Twisted's ``write()`` would refuse ``host``, or None if it would not."""
    if not isinstance(host, str | bytes):
        return "write() only accepts IP addresses as str"
    h: Any = host
    is4 = abstract.isIPAddress(h)
    is6 = abstract.isIPv6Address(h)
    if not is4 and not is6 and host != "<broadcast>":
        return "write() only accepts IP addresses, not hostnames"
    if (is4 or host == "<broadcast>") and family == socket.AF_INET6:
        return "IPv6 port write() called with IPv4 or broadcast address"
    if is6 and family == socket.AF_INET:
        return "IPv4 port write() called with IPv6 address"
    return None


@implementer(IHalfCloseableDescriptor)
class ShardPort(ListenerMembership):
    """The shared part of every data path; use ``port_class()`` to get a concrete one."""

    datapath: ClassVar[str] = ""
    # One doRead delivers at most this many datagrams and about maxThroughput
    # bytes, then yields, so timers and other sockets run under a flood.
    maxDatagramsPerRead: ClassVar[int] = 256
    maxThroughput = 256 * 1024
    # Distinct destination hosts remembered as valid; cleared when full, so a
    # scan of many clients costs a revalidation, never unbounded memory.
    addressCacheSize: ClassVar[int] = 4096

    _stats: ListenerStats | None
    _shared: bool
    #: What datagrams are delivered to: the protocol, or a ``Gate`` in front of it.
    _target: Any
    #: The in-flight record (``shardudp.inflight``) and this listener's state word.
    _rec: memoryview | None = None
    _rec_state: int = 0
    #: Senders' sockaddr bytes for the record, by address tuple (bounded).
    _rec_names: dict[Any, bytes]
    _errors: TwistedErrorLog
    _send_errors: ErrorLog
    _good_hosts: dict[object, None]
    _sock: socket.socket

    @classmethod
    def adopt(
        cls,
        sock: socket.socket,
        protocol: Any,
        reactor: Any,
        stats: ListenerStats | None = None,
        shared: bool = True,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        multicast_interface: str | None = None,
    ) -> Self:
        """Wrap a dup of ``sock`` (created and bound elsewhere) for ``protocol``.

        The caller keeps its own ``sock``; closing the port closes only the dup.
        ``multicast_interface``: for a socket bound to a multicast group, the
        interface address its group was joined on ("" for the kernel's
        choice), from the listener's configuration. None reads the socket's
        outgoing interface instead, which anyone sharing the socket may have
        changed since (``setOutgoingInterface`` in single mode).
        """
        family = _check_adoptable(sock)
        if isinstance(max_packet_size, bool) or not isinstance(max_packet_size, int):
            raise TypeError(f"max_packet_size must be an int, not {type(max_packet_size).__name__}")
        if not 1 <= max_packet_size <= DEFAULT_MAX_PACKET_SIZE:
            raise ValueError(f"max_packet_size must be 1..65535, got {max_packet_size}")
        if stats is not None and not isinstance(stats, ListenerStats):
            raise TypeError(f"stats must be a ListenerStats or None, not {type(stats).__name__}")
        if multicast_interface and canonical_ip(multicast_interface) is None:
            raise ValueError(f"multicast_interface must be an IP address, "
                             f"not {multicast_interface!r}")
        dup = sock.dup()
        try:
            # The shared file description may have been left blocking by anyone.
            dup.setblocking(False)
            interface = dup.getsockname()[0]
            make: Any = cls
            self: Self = make(
                None, protocol, interface=interface, maxPacketSize=max_packet_size, reactor=reactor
            )
        except BaseException:
            dup.close()
            raise
        self.addressFamily = family
        self._preexistingSocket = dup  # type: ignore[assignment]
        self._sock = dup
        self._stats = stats
        self._shared = bool(shared)
        self._target = protocol
        self._rec_names = {}
        self._good_hosts = {}
        # Only the master's sockets have a membership it owns; a socket a
        # protocol opened itself (reactor.listenMulticast) joins as in Twisted.
        self._membership = membership_of(dup, multicast_interface) if shared else None
        name = f"{type(protocol).__name__} on {interface}:{dup.getsockname()[1]}"
        self._errors = TwistedErrorLog(f"datagramReceived of {name} raised")
        self._send_errors = ErrorLog(f"send from {name} failed")
        self._adopted()
        return self

    def _adopted(self) -> None:
        """Hook for subclasses, run at the end of adopt()."""

    def set_gate(self, gate: Any) -> None:
        """Deliver through ``gate`` (an object with ``datagramReceived``), or straight to
        the protocol again with None. The gate costs nothing while absent."""
        self._target = self.protocol if gate is None else gate

    def track_flows(self, gate: Any) -> None:
        """Session keeping: note when each sender was last heard, in ``gate.flows``.
        Here the gate does it, per datagram; the batch data paths do it themselves."""
        gate.native = False

    def set_record(self, record: Any, listener: int) -> None:
        """Keep the sender of each datagram being handled in ``record``, an in-flight
        record shared with the master (``shardudp.inflight``); None stops it."""
        self._rec = None if record is None else memoryview(record).cast("B")
        self._rec_state = listener + 1

    def _record_name(self, addr: Any) -> bytes:
        """The sockaddr bytes of ``addr`` for the in-flight record, cached (bounded)."""
        names = self._rec_names
        if len(names) >= self.addressCacheSize:
            names.clear()
        # Padded to the record's full width: one fixed-size slice store per datagram.
        packed = names[addr] = inflight.sockaddr(addr[0], addr[1]).ljust(inflight.ADDR_MAX, b"\0")
        return packed

    @property
    def shared(self) -> bool:
        return self._shared

    @property
    def stats(self) -> ListenerStats | None:
        return self._stats

    # -- reading -----------------------------------------------------------

    def doRead(self) -> None:
        self._read(self.maxDatagramsPerRead, self.maxThroughput)

    def drain(self, max_datagrams: int) -> int:
        """Read and deliver until the socket is empty or ``max_datagrams``; return the count.

        Works while reading is stopped (a standby listener). The C path also
        stops at a short recvmmsg batch, i.e. when the queue was empty then.
        """
        if max_datagrams <= 0 or not self.connected:
            return 0
        return self._read(max_datagrams, 1 << 62)

    def _read(self, max_count: int, max_bytes: int) -> int:
        """``_read_datagrams`` with the in-flight record saying our handler runs."""
        rec = self._rec
        if rec is None:
            return self._read_datagrams(max_count, max_bytes, None)
        _REC_STATE.pack_into(rec, 0, self._rec_state)
        try:
            return self._read_datagrams(max_count, max_bytes, rec)
        finally:
            _REC_STATE.pack_into(rec, 0, 0)

    def _read_datagrams(self, max_count: int, max_bytes: int, rec: memoryview | None) -> int:
        """Read and deliver; the sender of each goes into ``rec`` (if any) first."""
        raise NotImplementedError

    def _handler_failed(self, exc: BaseException) -> None:
        stats = self._stats
        if stats is not None:
            stats.count_error(exc)
        self._errors.report(exc)

    def _refused(self) -> None:
        """ECONNREFUSED on a connected socket: tell the protocol, as Twisted does."""
        try:
            self.protocol.connectionRefused()
        except BaseException as exc:
            self._handler_failed(exc)

    def readConnectionLost(self, reason: Any) -> None:
        """epoll said EPOLLERR without EPOLLIN: usually a pending socket error.

        On a connected UDP socket an ICMP port-unreachable sets the socket
        error, which epoll reports as EPOLLERR alone; the reactor takes that
        for a closed descriptor and, for stock Twisted, closes the port. Here
        it becomes connectionRefused() and the port keeps reading. Only a
        descriptor with no error to report (a real shutdown) is closed.
        """
        sock = self._sock
        try:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # reading clears it
            queued = _drain_error_queue(sock)
        except OSError:
            err, queued = errno.EBADF, 0
        if err == errno.ECONNREFUSED:
            if self._connectedAddr:
                self._refused()
        elif err and err != errno.EBADF:
            self._send_errors.report(OSError(err, os.strerror(err)))
        if (err and err != errno.EBADF) or queued:
            if self.connected and not self.disconnecting:
                _StockPort.startReading(self)
            return
        self.connectionLost(reason)

    # -- writing -----------------------------------------------------------

    def _check_host(self, host: object) -> None:
        """Raise what stock Twisted raises for a bad destination; remember good ones."""
        reason = _stock_address_error(host, self.addressFamily)
        if reason is not None:
            raise _InvalidAddressError(host, reason)
        cache = self._good_hosts
        if len(cache) >= self.addressCacheSize:
            cache.clear()
        cache[host] = None

    def _check_connected_addr(self, addr: object) -> None:
        if addr is not None and addr != self._connectedAddr:
            raise _InvalidAddressError(
                addr, f"port is connected to {self._connectedAddr}; write() takes no other address"
            )

    def _send_failed(self, exc: OSError, datagram: bytes, addr: Any) -> None:
        """Map a send error the way stock Twisted does, but drop on a full buffer."""
        stats = self._stats
        if stats is not None:
            stats.tx_errors += 1
        no = exc.errno
        if no in SEND_DROP_ERRNOS:
            return
        if no == errno.EMSGSIZE:
            raise _MessageLengthError("message too long") from exc
        if no == errno.ECONNREFUSED:
            # Unconnected sockets get this only for an earlier datagram; stock
            # Twisted ignores it there too.
            if self._connectedAddr:
                self._refused()
            return
        raise exc

    def write(self, datagram: bytes, addr: Any = None) -> None:
        if self._connectedAddr:
            self._send_connected(datagram, addr)
            return
        if addr is None:
            raise _InvalidAddressError(None, "write() on an unconnected port needs addr")
        if addr[0] not in self._good_hosts:
            self._check_host(addr[0])
        # _sendto inlined: this is the per-reply hot path.
        try:
            self._sock.sendto(datagram, _MSG_DONTWAIT, addr)
        except OSError as exc:
            self._send_failed(exc, datagram, addr)
            return
        stats = self._stats
        if stats is not None:
            stats.tx_datagrams += 1
            stats.tx_bytes += len(datagram)

    def _sendto(self, datagram: bytes, addr: Any) -> None:
        try:
            self._sock.sendto(datagram, _MSG_DONTWAIT, addr)
        except OSError as exc:
            self._send_failed(exc, datagram, addr)
            return
        stats = self._stats
        if stats is not None:
            stats.tx_datagrams += 1
            stats.tx_bytes += len(datagram)

    def _send_connected(self, datagram: bytes, addr: Any) -> None:
        self._check_connected_addr(addr)
        try:
            self._sock.send(datagram, _MSG_DONTWAIT)
        except OSError as exc:
            self._send_failed(exc, datagram, addr)
            return
        stats = self._stats
        if stats is not None:
            stats.tx_datagrams += 1
            stats.tx_bytes += len(datagram)

    # -- guards ------------------------------------------------------------

    def connect(self, host: str, port: int) -> None:
        if self._shared:
            raise ShardedSocketError(
                "connect() refused: this socket is shared (a member of a SO_REUSEPORT group); "
                "on Linux connect() silently removes it from the group and reshuffles every "
                "worker's flows. For connected UDP, bind a listener to port 0 (--bind HOST:0) "
                "to give each worker a private socket, or open a client socket with "
                "reactor.listenUDP(0, proto) and connect that."
            )
        _StockPort.connect(self, host, port)

    # -- closing ----------------------------------------------------------

    #: Called once with the name of the call that closed the port, when the
    #: port was not closed by ``close_quietly`` (the worker stopping): the
    #: worker tells the master the APP left this listener.
    on_closed: Callable[[str], None] | None = None
    _closed_by: str | None = None

    def stopListening(self) -> Any:
        if self._closed_by is None:
            self._closed_by = "stopListening"
        return _StockPort.stopListening(self)

    def loseConnection(self) -> None:
        if self._closed_by is None:
            self._closed_by = "loseConnection"
        _StockPort.loseConnection(self)

    def close_quietly(self) -> Any:
        """``stopListening`` for the worker's own graceful stop: nobody is told."""
        self.on_closed = None
        return self.stopListening()

    def connectionLost(self, reason: Any = None) -> None:
        self._errors.flush()
        self._send_errors.flush()
        tell, self.on_closed = self.on_closed, None
        if tell is not None:
            tell(self._closed_by or "connectionLost")
        try:
            _StockPort.connectionLost(self, reason)
        except BaseException as exc:
            # Usually the protocol's stopProtocol, which may even call
            # sys.exit(). Stock Twisted then neither closes the socket nor
            # fires stopListening's Deferred, and a stopping worker would wait
            # out its graceful timeout.
            logger.error("stopping %s raised %s: %s; closing its port anyway",
                         type(self.protocol).__name__, type(exc).__name__, exc, exc_info=exc)
            self._finish_close()

    def _finish_close(self) -> None:
        """What stock connectionLost does after doStop, for when doStop raised."""
        sock = self.__dict__.pop("socket", None)
        if sock is not None:
            sock.close()
        self.__dict__.pop("fileno", None)
        d = self.__dict__.pop("d", None)
        if d is not None:
            d.callback(None)


def _drain_error_queue(sock: socket.socket) -> int:
    """Read and discard queued errors (IP_RECVERR); return how many there were."""
    # They keep EPOLLERR raised until read; bounded so a flood cannot pin us.
    for queued in range(64):
        try:
            sock.recvmsg(1, 1024, socket.MSG_ERRQUEUE | _MSG_DONTWAIT)
        except OSError:
            return queued
    return 64


def _check_adoptable(sock: object) -> socket.AddressFamily:
    if not isinstance(sock, socket.socket):
        raise TypeError(f"adopt() needs a socket.socket, not {type(sock).__name__}")
    if sock.fileno() < 0:
        raise ValueError("adopt() was given a closed socket")
    if sock.type != socket.SOCK_DGRAM:
        raise ValueError(f"adopt() needs a SOCK_DGRAM socket, not {sock.type!r}")
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"adopt() needs an AF_INET or AF_INET6 socket, not {sock.family!r}")
    if sock.getsockname()[1] == 0:
        raise ValueError("adopt() needs a bound socket; this one has no port")
    return sock.family


class PythonLoopShardPort(ShardPort):
    """Pure Python without batches: one recvfrom per datagram in a tight loop.

    One loop, counting always: with counting off (``stats`` None) it counts
    into a private ``ListenerStats`` that nobody reports. The two plain
    increments cost less than keeping a second, non-counting copy of the loop
    in step with this one.
    """

    datapath = "python-loop"
    _tally: ListenerStats

    def _adopted(self) -> None:
        self._tally = self._stats if self._stats is not None else ListenerStats()

    def _read_datagrams(self, max_count: int, max_bytes: int, rec: memoryview | None) -> int:
        stats = self._tally
        recvfrom = self._sock.recvfrom
        size = self.maxPacketSize
        # One byte more than fits: a longer datagram shows up as truncated.
        bufsize = size + 1 if size < DEFAULT_MAX_PACKET_SIZE else size
        deliver = self._target.datagramReceived
        v6 = self.addressFamily == socket.AF_INET6
        clock = time.perf_counter_ns
        observe = stats.observe_ns
        names = self._rec_names
        nbytes = 0
        # for/range and early returns: the cheapest loop CPython 3.11 offers.
        for count in range(max_count):
            try:
                data, addr = recvfrom(bufsize, _MSG_DONTWAIT)
            except BlockingIOError:
                return count
            except ConnectionRefusedError:
                if self._connectedAddr:
                    self._refused()
                return count
            except OSError:
                if not self.connected:  # a handler closed the port mid-batch
                    return count
                raise
            n = len(data)
            if n > size:
                stats.count_truncated(0)  # recvfrom cannot say how long it was
                data, n = data[:size], size
            stats.rx_bytes += n
            stats.rx_datagrams += 1
            if v6:
                addr = addr[:2]
            if rec is not None:
                rec[_REC_ADDR] = names.get(addr) or self._record_name(addr)
            try:
                if stats.rx_datagrams & _SAMPLE_MASK:
                    deliver(data, addr)
                else:
                    t0 = clock()
                    deliver(data, addr)
                    observe(clock() - t0)
            except BaseException as exc:
                self._handler_failed(exc)
            nbytes += n
            if nbytes >= max_bytes:
                return count + 1
        return max_count


class TwistedShardPort(ShardPort):
    """Stock Twisted's algorithms (byte-bounded recvfrom loop, three address
    checks per write) plus only the guards and counters: the A/B baseline."""

    datapath = "twisted"

    def _read_datagrams(self, max_count: int, max_bytes: int, rec: memoryview | None) -> int:
        # Stock bounds a read by bytes only; the count bound is ours (drain).
        count = 0
        read = 0
        stats = self._stats
        size = self.maxPacketSize
        # One byte more than fits: a longer datagram shows up as truncated.
        bufsize = size + 1 if size < DEFAULT_MAX_PACKET_SIZE else size
        while read < max_bytes and count < max_count:
            try:
                data, addr = self._sock.recvfrom(bufsize, _MSG_DONTWAIT)
            except BlockingIOError:
                return count
            except ConnectionRefusedError:
                if self._connectedAddr:
                    self._refused()
                return count
            except OSError:
                if not self.connected:  # a handler closed the port mid-batch
                    return count
                raise
            if len(data) > size:
                if stats is not None:
                    stats.count_truncated(0)  # recvfrom cannot say how long it was
                data = data[:size]
            read += len(data)
            count += 1
            if self.addressFamily == socket.AF_INET6:
                addr = addr[:2]
            if rec is not None:
                rec[_REC_ADDR] = self._rec_names.get(addr) or self._record_name(addr)
            if stats is not None:
                stats.rx_datagrams += 1
                stats.rx_bytes += len(data)
            try:
                if stats is not None and not stats.rx_datagrams & _SAMPLE_MASK:
                    t0 = time.perf_counter_ns()
                    self._target.datagramReceived(data, addr)
                    stats.observe_ns(time.perf_counter_ns() - t0)
                else:
                    self._target.datagramReceived(data, addr)
            except BaseException as exc:
                self._handler_failed(exc)
        return count

    def write(self, datagram: bytes, addr: Any = None) -> None:
        if self._connectedAddr:
            self._send_connected(datagram, addr)
            return
        if addr is None:
            raise _InvalidAddressError(None, "write() on an unconnected port needs addr")
        # Stock validates every datagram, uncached; keep that cost.
        reason = _stock_address_error(addr[0], self.addressFamily)
        if reason is not None:
            raise _InvalidAddressError(addr[0], reason)
        self._sendto(datagram, addr)


class _BatchShardPort(ShardPort):
    """recvmmsg/sendmmsg batches through an engine (``_batchio`` or ``_pybatch``).

    The engine does the reading and the common writes; the port keeps the
    rare cases, which must match stock Twisted exactly (first write to a
    destination, handler failures, refusals, late send errors).
    """

    # Datagrams per recvmmsg; each slot has a max_packet_size buffer.
    batchSize: ClassVar[int] = 64

    _engine: Any

    def _adopted(self) -> None:
        self._engine = datapaths.engine(self.datapath)(
            self._sock.fileno(),
            int(self.addressFamily),
            self,
            self.protocol,
            self._stats,
            self.maxPacketSize,
            self.batchSize,
            _SAMPLE_MASK,
            self.addressCacheSize,
        )
        # The protocol calls transport.write per reply: make that the
        # engine's method itself, with no frame of ours in between.
        self.write = self._engine.write  # type: ignore[method-assign]

    def _read(self, max_count: int, max_bytes: int) -> int:
        return int(self._engine.read(max_count, max_bytes))

    def set_gate(self, gate: Any) -> None:
        super().set_gate(gate)
        self._engine.set_protocol(self._target)

    def set_record(self, record: Any, listener: int) -> None:
        super().set_record(record, listener)
        self._engine.set_record(record, listener)

    def track_flows(self, gate: Any) -> None:
        self._engine.set_flows(gate.flows, gate.cap, gate.evict)
        gate.native = True

    def _slow_write(self, datagram: bytes, addr: Any) -> bool:
        """First write to a destination (or any odd case): stock checks, sent now.

        Returns True when the address may be cached as valid for later writes.
        """
        ShardPort.write(self, datagram, addr)
        return True

    def _async_send_failed(self, exc: OSError) -> None:
        """A queued datagram failed after its write() returned: log, do not raise."""
        self._send_errors.report(exc)

    def connect(self, host: str, port: int) -> None:
        super().connect(host, port)
        self._engine.set_connected(self._connectedAddr)

    def connectionLost(self, reason: Any = None) -> None:
        engine = self._engine
        try:
            super().connectionLost(reason)
        finally:
            # Break the port <-> engine cycle (and close the engine's dup)
            # now rather than at the next GC.
            engine.close()


class CShardPort(_BatchShardPort):
    """recvmmsg/sendmmsg batches through the ``shardudp._batchio`` extension."""

    datapath = "c"


class PythonShardPort(_BatchShardPort):
    """The same batches with nothing compiled: ``recvmmsg``/``sendmmsg`` via ctypes."""

    datapath = "python"


_CLASSES: Final[dict[str, type[ShardPort]]] = {
    cls.datapath: cls
    for cls in (CShardPort, PythonShardPort, PythonLoopShardPort, TwistedShardPort)
}


def port_class(datapath: str) -> type[ShardPort]:
    """The port class for a ``--datapath`` value (see ``datapaths.resolve``)."""
    return _CLASSES[datapaths.resolve(datapath)]
