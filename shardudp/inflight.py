"""The datagram in flight: which source a worker's handler is working on, readable after it died.

Each worker gets a page of memory shared with the master (an anonymous
``MAP_SHARED`` mapping made before fork, so no file descriptor). While a
port delivers datagrams it keeps there the number of its listener and the
sender of the datagram being handled, written as the kernel's
``sockaddr``: the C data path copies the bytes it received, the Python ones
write what they built. A worker killed in its handler (``os._exit``, a
signal, the master's KILL for a wedged handler) leaves the record naming the
source that did it; the master reads it after reaping the worker
(``decode``) and lets ``shardudp.quarantine`` judge.

Layout: a native ``u32`` at 0 (0: not in a handler; else the listener's
index + 1), the sender's ``sockaddr`` at ``ADDR_AT`` (at most ``ADDR_MAX``
bytes). The cost is a few stores per datagram.
"""

from __future__ import annotations

import ipaddress
import mmap
import socket
import struct
from typing import Final

#: The state word at 0 (the C data path's REC_* constants say the same).
STATE: Final = struct.Struct("=I")
ADDR_AT: Final = 8
ADDR_MAX: Final = 28
#: Where the sender goes: one fixed-size slice store per datagram.
ADDR: Final = slice(ADDR_AT, ADDR_AT + ADDR_MAX)
SIZE: Final = ADDR_AT + ADDR_MAX
_IN4: Final = struct.Struct("=H2s4s8x")
_IN6: Final = struct.Struct("=H2sI16sI")


def new_record() -> mmap.mmap:
    """A zeroed page shared with every process forked after this call."""
    return mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)


def sockaddr(host: str, port: int) -> bytes:
    """The kernel's ``sockaddr_in``/``sockaddr_in6`` for a sender (as recvfrom gave it)."""
    ip = ipaddress.ip_address(host.partition("%")[0])
    pbytes = port.to_bytes(2, "big")
    if ip.version == 4:
        return _IN4.pack(socket.AF_INET, pbytes, ip.packed)
    return _IN6.pack(socket.AF_INET6, pbytes, 0, ip.packed, 0)


def decode(record: bytes | mmap.mmap | memoryview) -> tuple[int, str, int] | None:
    """(listener number, host, port) of the datagram whose handler was running, else None.

    The bytes come from a process that died mid-write, perhaps: anything that
    does not parse is None, never an exception.
    """
    raw = bytes(record[:SIZE])
    (state,) = STATE.unpack_from(raw, 0)
    if state == 0:
        return None
    family = struct.unpack_from("=H", raw, ADDR_AT)[0]
    try:
        if family == socket.AF_INET:
            _, pbytes, addr = _IN4.unpack_from(raw, ADDR_AT)
            host = str(ipaddress.IPv4Address(addr))
        elif family == socket.AF_INET6:
            _, pbytes, _, addr, _ = _IN6.unpack_from(raw, ADDR_AT)
            host = str(ipaddress.IPv6Address(addr))
        else:
            return None
    except (ValueError, struct.error):
        return None
    return state - 1, host, int.from_bytes(pbytes, "big")
