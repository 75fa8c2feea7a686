"""Read kernel statistics: per-socket drops and queues, per-process CPU and memory.

I/O only, called at scrape time from the exporter's HTTP thread. Every reader
returns None (or skips an entry) when the kernel object is gone instead of
raising: a worker may exit or a socket close between listing and reading.

Sockets are read through ``SO_MEMINFO`` (one getsockopt, O(1) per socket);
``/proc/net/udp{,6}`` is the fallback, found by inode, and costs a scan of
every UDP socket in the network namespace, so it is read once per scrape for
all sockets that need it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Final

# Not exported by Python's socket module. Linux >= 3.18.
SO_MEMINFO: Final = 55
# enum sk_meminfo_vars: RMEM_ALLOC=0, RCVBUF=1, ..., DROPS=8.
_MEMINFO_RMEM_ALLOC: Final = 0
_MEMINFO_RCVBUF: Final = 1
_MEMINFO_DROPS: Final = 8
_MEMINFO_VARS: Final = 9

_PROC_NET_UDP: Final = ("/proc/net/udp", "/proc/net/udp6")
# Column positions in /proc/net/udp{,6} after whitespace split.
_COL_QUEUES: Final = 4  # "tx_queue:rx_queue", hex
_COL_INODE: Final = 9
_COL_DROPS: Final = 12


@dataclass(frozen=True, slots=True)
class SocketStats:
    """Kernel view of one UDP socket.

    ``drops`` is the kernel's u32 ``sk_drops``: it wraps at 2**32 (see
    ``metrics.DropUnwrapper``). ``rx_queue_bytes`` counts truesize (about 832 B
    for a tiny datagram on lo), not payload.
    """

    drops: int
    rx_queue_bytes: int
    rcvbuf_bytes: int


@dataclass(frozen=True, slots=True)
class KernelStats:
    """What the master's sockets say, keyed by (slot label, listener name).

    ``drops`` are monotonic totals (``shardudp.drops``); ``queues`` maps to
    (receive queue bytes, receive buffer bytes) of the socket read just now.
    """

    drops: Mapping[tuple[str, str], int]
    queues: Mapping[tuple[str, str], tuple[int, int]]


def read_meminfo(sock: socket.socket) -> SocketStats:
    """Stats via ``SO_MEMINFO``; raises OSError if the kernel cannot say."""
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * _MEMINFO_VARS)
    if len(raw) < 4 * _MEMINFO_VARS:
        # Older kernels return fewer fields and may lack the drop counter.
        raise OSError(f"SO_MEMINFO returned {len(raw)} bytes, need {4 * _MEMINFO_VARS}")
    fields = struct.unpack(f"={_MEMINFO_VARS}I", raw[: 4 * _MEMINFO_VARS])
    return SocketStats(
        drops=fields[_MEMINFO_DROPS],
        rx_queue_bytes=fields[_MEMINFO_RMEM_ALLOC],
        rcvbuf_bytes=fields[_MEMINFO_RCVBUF],
    )


def socket_inode(sock: socket.socket) -> int:
    """The inode that names ``sock`` in /proc/net/udp."""

    return os.fstat(sock.fileno()).st_ino


def read_proc_net_udp(paths: Sequence[str] = _PROC_NET_UDP) -> dict[int, tuple[int, int]]:
    """Map inode -> (rx_queue bytes, drops) for every UDP socket in this netns."""
    found: dict[int, tuple[int, int]] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                next(f, None)  # header
                for line in f:
                    cols = line.split()
                    if len(cols) <= _COL_DROPS:
                        continue
                    rx_queue = int(cols[_COL_QUEUES].partition(b":")[2], 16)
                    found[int(cols[_COL_INODE])] = (rx_queue, int(cols[_COL_DROPS]))
        except (OSError, ValueError):
            # No IPv6 in this kernel, or a format we do not know: report what
            # the other file gave rather than nothing.
            continue
    return found


def read_proc(sock: socket.socket, table: dict[int, tuple[int, int]] | None = None) -> SocketStats:
    """Stats via ``/proc/net/udp{,6}``; raises OSError if the socket is not listed."""
    if table is None:
        table = read_proc_net_udp()
    inode = socket_inode(sock)
    entry = table.get(inode)
    if entry is None:
        raise OSError(f"socket inode {inode} not in /proc/net/udp or udp6")
    rx_queue, drops = entry
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return SocketStats(drops=drops, rx_queue_bytes=rx_queue, rcvbuf_bytes=rcvbuf)


def read_sockets(socks: Sequence[socket.socket]) -> list[SocketStats | None]:
    """Stats for each socket, in order; None for one that is closed or unreadable."""
    out: list[SocketStats | None] = []
    pending: list[int] = []
    for i, sock in enumerate(socks):
        try:
            out.append(read_meminfo(sock))
        except OSError:
            out.append(None)
            if sock.fileno() >= 0:
                pending.append(i)
    if pending:
        table = read_proc_net_udp()
        for i in pending:
            with contextlib.suppress(OSError):
                out[i] = read_proc(socks[i], table)
    return out


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """What Prometheus' standard process_* metrics say, for any pid we may read."""

    cpu_seconds: float
    resident_bytes: int
    open_fds: int | None  # None when /proc/<pid>/fd is not ours to list
    start_time: float  # seconds since the Unix epoch


@cache
def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    raise OSError("no btime line in /proc/stat")


@cache
def _ticks_and_page() -> tuple[int, int]:
    return os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")


def read_process(pid: int) -> ProcessStats | None:
    """Stats of one process from /proc; None if it is gone or /proc is unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # comm (field 2) may hold spaces and parentheses: split after the last ')'.
        # Fields from 3 (state) on, so field n is at index n - 3.
        fields = stat.rpartition(b")")[2].split()
        ticks, page = _ticks_and_page()
        utime, stime = int(fields[11]), int(fields[12])
        start_ticks, rss_pages = int(fields[19]), int(fields[21])
        start_time = _boot_time() + start_ticks / ticks
    except (OSError, ValueError, IndexError):
        return None
    try:
        open_fds: int | None = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        open_fds = None
    return ProcessStats(
        cpu_seconds=(utime + stime) / ticks,
        resident_bytes=rss_pages * page,
        open_fds=open_fds,
        start_time=start_time,
    )
