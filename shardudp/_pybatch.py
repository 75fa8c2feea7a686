"""The "python" datapath's engine: recvmmsg/sendmmsg batches without a compiler.

``Engine`` keeps the contract of ``shardudp._batchio.Engine`` (see
``_batchio.c`` for the reasoning behind each rule) in Python, calling the C
library's ``recvmmsg`` and ``sendmmsg`` through ``ctypes``, which ships with
CPython. Nothing here is compiled at install time, so this is the fast path
wherever the C helper could not be built.

Why batches and not a tighter ``recvfrom`` loop: on the machines we measured,
one system call per datagram each way is most of a datagram's cost, and a
bare blocking ``recvfrom``/``sendto`` loop in Python is already at the
per-call limit (bench/README.md). Per datagram, this engine does what cannot
be batched (a ``bytes`` for the payload, the sender's tuple from a cache, the
handler call) and leaves everything else to one call per batch: the send
queue is copied into place with ``bytes.join`` and described with one
``struct.pack_into``.

Every socket call uses MSG_DONTWAIT: O_NONBLOCK is shared with other
processes holding the same open file description.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
import time
from bisect import bisect_right
from collections.abc import Callable
from itertools import accumulate
from typing import Any, Final

from shardudp import inflight
from shardudp.sockets import SEND_DROP_ERRNOS

__all__ = ["AVAILABLE", "MISSING", "Engine"]

_MSG_DONTWAIT: Final = socket.MSG_DONTWAIT
_MSG_TRUNC: Final = socket.MSG_TRUNC
_REC_STATE: Final = inflight.STATE
_EINTR_RETRIES: Final = 8
# Delivering one batch should take about this long; see adapt_batch in _batchio.c.
_BATCH_TARGET_NS: Final = 1_000_000
# Senders remembered as (host, port) tuples; cleared when full.
_RX_CACHE_SIZE: Final = 4096
# Bytes of the send arena per batch slot: replies up to this size (on
# average) go out in one sendmmsg per batch; larger ones take a few.
_ARENA_PER_SLOT: Final = 2048
_ARENA_MIN: Final = 2 * 65536
_MAX_PAYLOAD_V4: Final = 65507
# What write() compares addr with outside a batch: nothing a caller can pass.
_NO_SENDER: Final = object()


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint)]


_MMSG_SIZE: Final = ctypes.sizeof(_MMsgHdr)
_U32: Final = 4
_MSG_LEN_AT: Final = _MMsgHdr.msg_len.offset // _U32  # in uint32 units
_SIZE_T: Final = "Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I"
# sockaddr_in (16 bytes) / sockaddr_in6 (28 bytes): the name slot per message.
_NAME_LEN: Final[dict[int, int]] = {socket.AF_INET: 16, socket.AF_INET6: 28}


def _load() -> tuple[Any, Any, str]:
    if not sys.platform.startswith("linux"):
        return None, None, f"recvmmsg/sendmmsg are Linux calls; this is {sys.platform}"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        recv, send = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError) as exc:
        return None, None, f"the C library has no recvmmsg/sendmmsg ({exc})"
    recv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    recv.restype = ctypes.c_int
    send.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    send.restype = ctypes.c_int
    return recv, send, ""


_recvmmsg, _sendmmsg, MISSING = _load()
AVAILABLE: Final = _recvmmsg is not None


class Engine:
    """recvmmsg/sendmmsg data path of one adopted UDP socket, in Python.

    ``Engine(fd, family, port, protocol, stats, maxsize, batch, sample_mask,
    cache_cap)``, then ``read(max_count, max_bytes)``, ``write(datagram,
    addr=None)`` (installed as the transport's write), ``set_connected(addr)``
    and ``close()``; the port supplies the slow paths: ``_slow_write``,
    ``_send_failed``, ``_async_send_failed``, ``_handler_failed``, ``_refused``.
    """

    __slots__ = (
        "_arena",
        "_arena_addr",
        "_arena_mv",
        "_batch",
        "_batch_max",
        "_close_pending",
        "_closed",
        "_connected",
        "_cur",
        "_cur_name",
        "_evict",
        "_family",
        "_fd",
        "_flows",
        "_flows_cap",
        "_in_batch",
        "_iov_mv",
        "_iov_pack",
        "_keep",
        "_max_payload",
        "_maxsize",
        "_name_len",
        "_name_structs",
        "_port",
        "_protocol",
        "_qdata",
        "_qnames",
        "_rbuf_mv",
        "_rec",
        "_rec_addr",
        "_rec_state",
        "_rmsg_addr",
        "_rmsg_u32",
        "_rnames",
        "_rx_cache",
        "_rx_seq",
        "_sample_mask",
        "_smsg_addr",
        "_snames_mv",
        "_sock",
        "_stats",
        "_tx_cache",
        "_tx_cache_cap",
    )

    def __init__(
        self,
        fd: int,
        family: int,
        port: Any,
        protocol: Any,
        stats: Any,
        maxsize: int,
        batch: int,
        sample_mask: int,
        cache_cap: int,
    ) -> None:
        if _recvmmsg is None:
            raise RuntimeError(f"the python batch engine is unavailable: {MISSING}")
        if (fd < 0 or family not in _NAME_LEN or not 1 <= maxsize <= 65535
                or not 1 <= batch <= 1024 or cache_cap < 1):
            raise ValueError("Engine: bad fd, family, maxsize, batch or cache_cap")
        # Our own descriptor: the port may close its socket (and the number be
        # reused) while a batch is still being delivered or flushed.
        self._sock = socket.fromfd(fd, family, socket.SOCK_DGRAM)
        self._fd = self._sock.fileno()
        self._family = family
        self._port = port
        self._protocol = protocol
        self._rec: memoryview | None = None
        self._rec_addr = slice(0)
        self._rec_state = 0
        self._flows: dict[Any, float] | None = None
        self._flows_cap = 0
        self._evict: Callable[[], object] | None = None
        self._stats = stats
        self._maxsize = maxsize
        self._max_payload = _MAX_PAYLOAD_V4 if family == socket.AF_INET else 65527
        self._batch_max = batch
        self._batch = 1  # grows to batch_max after one read of a fast handler
        self._sample_mask = sample_mask
        self._tx_cache_cap = cache_cap
        self._tx_cache: dict[Any, bytes] = {}
        self._rx_cache: dict[bytes, tuple[str, int]] = {}
        self._rx_seq = 0
        self._closed = False
        self._close_pending = False
        self._connected = False
        self._in_batch = False
        self._cur: Any = _NO_SENDER
        self._cur_name = b""
        self._qdata: list[bytes] = []
        self._qnames: list[bytes] = []
        name_len = self._name_len = _NAME_LEN[family]

        # Receive side: batch slots of maxsize bytes and a name each.
        rbuf = (ctypes.c_char * (batch * maxsize))()
        rnames = (ctypes.c_char * (batch * name_len))()
        riov = (_IOVec * batch)()
        rmsg = (_MMsgHdr * batch)()
        for i in range(batch):
            riov[i].iov_base = ctypes.addressof(rbuf) + i * maxsize
            riov[i].iov_len = maxsize
            h = rmsg[i].msg_hdr
            h.msg_name = ctypes.addressof(rnames) + i * name_len
            h.msg_namelen = name_len
            h.msg_iov = ctypes.addressof(riov[i])
            h.msg_iovlen = 1
        self._rbuf_mv = memoryview(rbuf).cast("B")
        self._rnames = memoryview(rnames).cast("B")
        self._name_structs = [struct.Struct(f"{name_len}s" * n)
                              for n in range(batch + 1)]
        self._rmsg_u32 = memoryview(rmsg).cast("B").cast("I")
        self._rmsg_addr = ctypes.addressof(rmsg)

        # Send side: one arena the queued datagrams are packed into.
        arena_size = max(_ARENA_MIN, batch * _ARENA_PER_SLOT)
        arena = (ctypes.c_char * arena_size)()
        snames = (ctypes.c_char * (batch * name_len))()
        siov = (_IOVec * batch)()
        smsg = (_MMsgHdr * batch)()
        for i in range(batch):
            h = smsg[i].msg_hdr
            h.msg_name = ctypes.addressof(snames) + i * name_len
            h.msg_namelen = name_len
            h.msg_iov = ctypes.addressof(siov[i])
            h.msg_iovlen = 1
        self._arena = arena_size
        self._arena_addr = ctypes.addressof(arena)
        self._arena_mv = memoryview(arena).cast("B")
        self._snames_mv = memoryview(snames).cast("B")
        self._iov_mv = memoryview(siov).cast("B")
        self._iov_pack = [struct.Struct(f"={2 * n}{_SIZE_T}") for n in range(batch + 1)]
        self._smsg_addr = ctypes.addressof(smsg)
        # The ctypes objects own the memory the addresses above point into.
        self._keep = (rbuf, rnames, riov, rmsg, arena, snames, siov, smsg)

    # -- writing -------------------------------------------------------------

    def write(self, datagram: Any, addr: Any = None) -> None:
        # The reply to the sender being delivered, the common case, in as few
        # steps as Python allows: the kernel gave us this address, so it needs
        # no checking, and its sockaddr is at hand.
        if (addr is self._cur and not self._connected and type(datagram) is bytes
                and len(datagram) <= _MAX_PAYLOAD_V4):
            qdata = self._qdata
            if len(qdata) < self._batch_max:
                qdata.append(datagram)
                self._qnames.append(self._cur_name)
                return
        self._write(datagram, addr)

    def _write(self, datagram: Any, addr: Any) -> None:
        if self._closed:
            raise OSError("the port is closed")
        if type(datagram) is not bytes or len(datagram) > self._max_payload:
            self._slow_write(datagram, addr)  # odd types, EMSGSIZE: as stock
            return
        if self._connected:
            if addr is not None:
                self._slow_write(datagram, addr)  # stock's address check
                return
            # Never queued: a refusal belongs to the write that met it.
            self._send_now(datagram, None)
            return
        if addr is self._cur:
            name = self._cur_name
        else:
            try:
                cached = self._tx_cache.get(addr)
            except TypeError:  # unhashable: Python will say what is wrong
                cached = None
            if cached is None:
                self._slow_write(datagram, addr)
                return
            name = cached
        if self._in_batch:
            if len(self._qdata) >= self._batch_max:
                self._make_room()
                if len(self._qdata) >= self._batch_max:
                    if self._stats is not None:
                        self._stats.tx_errors += 1
                    return  # something keeps refilling it: drop, as a full buffer
            self._qdata.append(datagram)
            self._qnames.append(name)
            return
        self._send_now(datagram, addr)

    def _make_room(self) -> None:
        # A flush may run Python (error reporting) that writes and so refills
        # the queue: check again after each one, a bounded number of times.
        for _ in range(_EINTR_RETRIES):
            if len(self._qdata) < self._batch_max:
                return
            self._flush()

    def _send_now(self, datagram: bytes, addr: Any) -> None:
        """Outside a batch (or connected): the port sends it now, mapping
        errors as stock Twisted does."""
        if addr is None:
            self._port._send_connected(datagram, None)
        else:
            self._port._sendto(datagram, addr)

    def _slow_write(self, datagram: Any, addr: Any) -> None:
        """First write to a destination, or any odd case: stock checks, sent now."""
        if self._qdata:
            self._flush()  # keep datagrams to one destination in order
        cacheable = self._port._slow_write(datagram, addr)
        if cacheable and not self._connected and addr is not None:
            name = self._name_of(addr)
            if name is not None:
                cache = self._tx_cache
                if len(cache) >= self._tx_cache_cap:
                    cache.clear()
                cache[addr] = name

    def _name_of(self, addr: Any) -> bytes | None:
        """The sockaddr for a plain ("literal", port) of our family, else None.

        Scoped IPv6 addresses, "<broadcast>", 4-tuples... stay on the slow path.
        """
        if type(addr) is not tuple or len(addr) != 2:
            return None
        host, port = addr
        if type(host) is not str or type(port) is not int or not 0 <= port <= 65535:
            return None
        try:
            packed = socket.inet_pton(self._family, host)
        except (OSError, ValueError):
            return None
        if self._family == socket.AF_INET:
            return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), packed)
        return struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(port), 0, packed, 0)

    def _flush(self) -> None:
        """Send everything queued, in as few sendmmsg calls as errors allow.

        Errors are collected and reported only after the queue is reset: a
        callback (connectionRefused, a logger) may write, which enqueues or
        flushes again.
        """
        qdata, qnames = self._qdata, self._qnames
        n = len(qdata)
        if not n:
            return
        self._qdata, self._qnames = [], []
        lens = list(map(len, qdata))
        ends = list(accumulate(lens))
        errs: list[int] = []
        start, base = 0, 0
        while start < n and self._fd >= 0:
            # As many as fit in the arena from `start`, at least one.
            stop = max(start + 1, bisect_right(ends, base + self._arena, start))
            size = ends[stop - 1] - base
            self._arena_mv[:size] = b"".join(qdata[start:stop])
            count = stop - start
            iov: list[int] = [0] * (2 * count)
            iov[0::2] = accumulate(lens[start:stop - 1], initial=self._arena_addr)
            iov[1::2] = lens[start:stop]
            self._iov_pack[count].pack_into(self._iov_mv, 0, *iov)
            self._snames_mv[:count * self._name_len] = b"".join(qnames[start:stop])
            if not self._send_packed(count, lens, start, errs):
                if self._stats is not None:  # the chunks not yet tried are lost too
                    self._stats.tx_errors += n - stop
                break
            start, base = stop, ends[stop - 1]
        for err in errs:
            self._async_send_error(err)

    def _send_packed(self, count: int, lens: list[int], first: int, errs: list[int]) -> bool:
        """sendmmsg the `count` messages in place; False when the buffer is full."""
        stats = self._stats
        i, retries = 0, 0
        while i < count:
            r = _sendmmsg(self._fd, self._smsg_addr + i * _MMSG_SIZE, count - i, _MSG_DONTWAIT)
            if r > 0:
                if stats is not None:
                    stats.tx_datagrams += r
                    stats.tx_bytes += sum(lens[first + i:first + i + r])
                i += r
                continue
            err = ctypes.get_errno()
            if err == errno.EINTR and retries < _EINTR_RETRIES:
                retries += 1
                continue
            if err in SEND_DROP_ERRNOS:
                # The buffer is full: the rest would fail the same way.
                if stats is not None:
                    stats.tx_errors += count - i
                return False
            errs.append(err)  # message i failed on its own
            i += 1
        return True

    def _async_send_error(self, err: int) -> None:
        """A queued datagram failed on its own after its write() returned
        (full buffers never get here: _send_packed drops those). Never raises."""
        if self._stats is not None:
            self._stats.tx_errors += 1
        port = self._port
        if port is None:
            return
        try:
            if err == errno.ECONNREFUSED:
                if self._connected:
                    port._refused()
                return
            port._async_send_failed(OSError(err, os.strerror(err)))
        except Exception as exc:  # the reporting itself failed: never the data path
            _write_unraisable(exc, port)

    # -- reading -------------------------------------------------------------

    def read(self, max_count: int, max_bytes: int) -> int:
        if self._in_batch:
            raise RuntimeError("drain() called from inside datagramReceived of the same port")
        if self._closed:
            raise OSError("the port is closed")
        deliver: Callable[[bytes, Any], object] = self._protocol.datagramReceived
        stats = self._stats
        total = nbytes = 0
        retries = 0
        try:
            while total < max_count and nbytes < max_bytes and not self._close_pending:
                want = min(max_count - total, self._batch)
                # MSG_TRUNC: msg_len is then the datagram's real length.
                n = _recvmmsg(self._fd, self._rmsg_addr, want, _MSG_DONTWAIT | _MSG_TRUNC, None)
                if n < 0:
                    err = ctypes.get_errno()
                    if err == errno.EINTR and retries < _EINTR_RETRIES:
                        retries += 1
                        continue
                    if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    if err == errno.ECONNREFUSED:
                        if self._connected:
                            self._port._refused()
                        break
                    raise OSError(err, os.strerror(err))  # as stock: the reactor drops the port
                t0 = time.perf_counter_ns()
                self._in_batch = True
                try:
                    if stats is None:
                        nbytes += self._deliver(n, deliver)
                    else:
                        nbytes += self._deliver_counting(n, deliver, stats)
                finally:
                    self._in_batch = False
                    self._cur = _NO_SENDER
                self._flush()
                per = (time.perf_counter_ns() - t0) // n
                self._batch = max(1, min(self._batch_max,
                                         _BATCH_TARGET_NS // per if per > 0 else self._batch_max))
                total += n
                if n < want:
                    break  # the queue ran dry; epoll will tell us when there is more
        finally:
            if self._close_pending:
                self._release()
        return total

    def _unpack(self, n: int) -> tuple[list[int], list[bytes], list[Any], tuple[bytes, ...]]:
        """The batch just read: lengths, payloads, senders and their sockaddrs.

        Built with comprehensions and C-level calls (one ``unpack_from`` for
        all names, one ``map`` over the sender cache): a statement per
        datagram costs more than the work it does.
        """
        size = self._maxsize
        step = _MMSG_SIZE // _U32
        lens: list[int] = self._rmsg_u32[_MSG_LEN_AT:n * step:step].tolist()
        if max(lens) > size:
            lens = self._truncated(lens)
        names: tuple[bytes, ...] = self._name_structs[n].unpack_from(self._rnames)
        rbuf = self._rbuf_mv
        starts = range(0, n * size, size)
        datas = [rbuf[o:o + ln].tobytes() for o, ln in zip(starts, lens, strict=True)]
        addrs = list(map(self._rx_cache.get, names))
        if None in addrs:
            for i, a in enumerate(addrs):
                if a is None:
                    addrs[i] = self._sender(names[i])
        return lens, datas, addrs, names

    def _truncated(self, lens: list[int]) -> list[int]:
        """Count the datagrams longer than the buffer (cut to it), and the longest."""
        size = self._maxsize
        cut = [ln for ln in lens if ln > size]
        if self._stats is not None:
            self._stats.truncated += len(cut)
            self._stats.truncated_max = max(self._stats.truncated_max, *cut)
        return [min(ln, size) for ln in lens]

    def set_protocol(self, obj: Any) -> None:
        """Deliver to ``obj.datagramReceived`` from the next read on."""
        self._protocol = obj

    def set_flows(self, flows: dict[Any, float] | None, cap: int,
                  evict: Callable[[], object]) -> None:
        """Note in ``flows`` when each sender was last heard (session keeping)."""
        self._flows, self._flows_cap, self._evict = flows, cap, evict

    def _heard(self, addrs: list[Any]) -> None:
        """One update per batch, in C: a statement per datagram would cost more."""
        flows = self._flows
        if flows is None:
            return
        flows.update(dict.fromkeys(addrs, time.monotonic()))
        if len(flows) > self._flows_cap and self._evict is not None:
            self._evict()

    def set_record(self, record: Any, listener: int) -> None:
        """Keep the in-flight record (``shardudp.inflight``) in ``record`` (None: don't)."""
        self._rec = None if record is None else memoryview(record).cast("B")
        self._rec_addr = slice(inflight.ADDR_AT, inflight.ADDR_AT + self._name_len)
        self._rec_state = listener + 1

    def _deliver(self, n: int, deliver: Callable[[bytes, Any], object]) -> int:
        lens, datas, addrs, names = self._unpack(n)
        rec, at = self._rec, self._rec_addr
        if rec is not None:
            _REC_STATE.pack_into(rec, 0, self._rec_state)
        try:
            for data, addr, name in zip(datas, addrs, names, strict=False):
                self._cur = addr
                self._cur_name = name
                if rec is not None:
                    rec[at] = name
                try:
                    deliver(data, addr)
                except BaseException as exc:
                    self._handler_failed(exc)
                if self._close_pending:
                    break
        finally:
            if rec is not None:
                _REC_STATE.pack_into(rec, 0, 0)
        self._heard(addrs)
        return sum(lens)

    def _deliver_counting(
        self, n: int, deliver: Callable[[bytes, Any], object], stats: Any
    ) -> int:
        lens, datas, addrs, names = self._unpack(n)
        mask = self._sample_mask
        seq = first = self._rx_seq
        clock = time.perf_counter_ns
        rec, at = self._rec, self._rec_addr
        if rec is not None:
            _REC_STATE.pack_into(rec, 0, self._rec_state)
        try:
            for data, addr, name in zip(datas, addrs, names, strict=False):
                self._cur = addr
                self._cur_name = name
                if rec is not None:
                    rec[at] = name
                seq += 1
                try:
                    if seq & mask:
                        deliver(data, addr)
                    else:
                        t0 = clock()
                        deliver(data, addr)
                        stats.observe_ns(clock() - t0)  # failures are not timed
                except BaseException as exc:
                    self._handler_failed(exc)
                if self._close_pending:
                    break
        finally:
            if rec is not None:
                _REC_STATE.pack_into(rec, 0, 0)
            self._heard(addrs)
            self._rx_seq = seq
            stats.rx_datagrams += seq - first
            stats.rx_bytes += sum(lens[:seq - first])
        return sum(lens)

    def _handler_failed(self, exc: BaseException) -> None:
        """Let the port count and log what the protocol raised. Never raises:
        an exception out of read() would make the reactor drop the port."""
        try:
            self._port._handler_failed(exc)
        except Exception as failure:
            _write_unraisable(failure, self._port)

    def _sender(self, name: bytes) -> Any:
        """(host, port) for a sockaddr, as Python's recvfrom gives it (IPv6 as a
        2-tuple, as Twisted does), remembered in a bounded cache."""
        family, port = struct.unpack_from("=HH", name)
        port = socket.ntohs(port)
        if family == socket.AF_INET:
            addr = (socket.inet_ntop(socket.AF_INET, name[4:8]), port)
        elif family == socket.AF_INET6:
            addr = (socket.inet_ntop(socket.AF_INET6, name[8:24]), port)
        else:
            return None  # not a UDP/IP source (should not happen): no address
        cache = self._rx_cache
        if len(cache) >= _RX_CACHE_SIZE:
            cache.clear()
        cache[name] = addr
        return addr

    # -- lifecycle -----------------------------------------------------------

    def set_connected(self, addr: Any) -> None:
        if self._qdata:
            self._flush()  # queued before connect(): sent to their own addresses
        self._connected = addr is not None
        self._tx_cache.clear()

    def close(self) -> None:
        if self._closed:
            return
        if self._qdata:
            self._flush()  # replies written before the close still go out
        self._closed = True
        self._cur = _NO_SENDER
        if self._in_batch:
            self._close_pending = True  # buffers in use: release at the batch end
        else:
            self._release()

    def _release(self) -> None:
        """Drop every Python reference (breaking the port <-> engine cycle) and
        close our own dup of the socket."""
        if self._qdata:
            self._flush()
        self._closed = True
        self._close_pending = False
        self._fd = -1
        self._sock.close()
        self._port = self._protocol = self._stats = None
        self._rec = None
        self._flows = self._evict = None
        self._tx_cache.clear()
        self._rx_cache.clear()


class _Unraisable:
    """The argument sys.unraisablehook takes (its own type cannot be built)."""

    def __init__(self, exc: BaseException, obj: object) -> None:
        self.exc_type: type[BaseException] = type(exc)
        self.exc_value: BaseException | None = exc
        self.exc_traceback = exc.__traceback__
        self.err_msg: str | None = "Exception ignored while reporting a data path error"
        self.object = obj


def _write_unraisable(exc: BaseException, obj: object) -> None:
    """What PyErr_WriteUnraisable does for the C engine: report, never raise."""
    sys.unraisablehook(_Unraisable(exc, obj))
