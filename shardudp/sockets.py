"""Socket creation and configuration, in the master. See shared kernel facts.

Rules this module enforces:
- ``SO_REUSEPORT`` on every group socket, never ``SO_REUSEADDR`` (it lets
  another uid bind the port and steal unicast);
- multicast sockets set ``IP_MULTICAST_ALL`` to 0 so they only see the
  groups they joined;
- a socket leaves its reuseport group only by ``connect()`` (to drain) or by
  its last close, so the master keeps each one for its whole life.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from .config import Address, Listener
from .errors import StartupError

log = logging.getLogger("shardudp.sockets")

SO_ATTACH_FILTER: Final = 26
IP_MULTICAST_ALL: Final = 49
IPV6_MULTICAST_ALL: Final = 29
SKF_NET_OFF: Final = -0x100000
_KNUTH: Final = 2654435761


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- classic BPF ---------------------------------------------------------------

Insn = tuple[int, int, int, int]


def shard_filter(index: int, count: int, ipv6: bool) -> list[Insn]:
    """Keep a datagram iff hash(source address, source port) % count == index.

    A socket filter sees the UDP header at offset 0 and the IP header at
    SKF_NET_OFF; the last 32 bits of the source address are enough to spread
    hosts, and the port spreads flows of one host.
    """
    src_word = (SKF_NET_OFF + (20 if ipv6 else 12)) & 0xFFFFFFFF
    return [
        (0x28, 0, 0, 0),  # ldh [0]            source port
        (0x07, 0, 0, 0),  # tax
        (0x20, 0, 0, src_word),  # ld [net+off]  source address (low word)
        (0xAC, 0, 0, 0),  # xor x
        (0x24, 0, 0, _KNUTH),  # mul #knuth
        (0x74, 0, 0, 16),  # rsh #16
        (0x94, 0, 0, count),  # mod #count
        (0x15, 0, 1, index),  # jeq #index, keep, drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1  keep whole datagram
        (0x06, 0, 0, 0),  # ret #0   drop
    ]


def shard_of(src_ip: str, src_port: int, count: int) -> int:
    """The slot ``shard_filter`` keeps for this source (for tests and docs)."""
    packed = ipaddress.ip_address(src_ip).packed[-4:]
    a = (int(struct.unpack("!I", packed)[0]) ^ src_port) * _KNUTH & 0xFFFFFFFF
    return (a >> 16) % count


DROP_ALL: Final[list[Insn]] = [(0x06, 0, 0, 0)]


def attach_filter(sock: socket.socket, prog: list[Insn]) -> None:
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# -- /proc/net/udp -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcSocket:
    host: str
    port: int
    uid: int
    inode: int


def _parse_hex_addr(hexaddr: str) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc prints the address as host-order 32-bit words.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def parse_proc_net_udp(text: str) -> list[ProcSocket]:
    """Parse the untrusted-format text of /proc/net/udp or udp6."""
    out: list[ProcSocket] = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or ":" not in parts[1]:
            continue
        hexaddr, hexport = parts[1].rsplit(":", 1)
        try:
            out.append(ProcSocket(_parse_hex_addr(hexaddr), int(hexport, 16),
                                  int(parts[7]), int(parts[9])))
        except ValueError:
            continue
    return out


def bound_udp_sockets() -> list[ProcSocket]:
    found: list[ProcSocket] = []
    for name in ("udp", "udp6"):
        try:
            found += parse_proc_net_udp(Path(f"/proc/net/{name}").read_text())
        except OSError:
            continue
    return found


def _overlaps(a: str, b: str) -> bool:
    ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if ia == ib:
        return True
    # A v6 wildcard may be dual-stack and so cover every v4 address too.
    if ia.is_unspecified and (ia.version == ib.version or ia.version == 6):
        return True
    return bool(ib.is_unspecified and (ia.version == ib.version or ib.version == 6))


def find_port_conflicts(addrs: Iterable[Address], existing: list[ProcSocket]) -> list[str]:
    """Refuse to silently join someone else's reuseport group.

    With SO_REUSEPORT and the same uid, a second server binding a port that a
    first one serves would join its group and take part of its traffic.
    """
    problems = []
    for addr in addrs:
        if addr.port == 0:
            continue
        for s in existing:
            if s.port == addr.port and _overlaps(addr.host, s.host):
                problems.append(
                    f"{addr} is already in use by another socket on {s.host}:{s.port} "
                    f"(uid {s.uid}, inode {s.inode}); is another server running?"
                )
                break
    return problems


# -- creating sockets ----------------------------------------------------------


def _ifindex_of(addr: str) -> int:
    """The interface index owning an IPv6 address (from /proc/net/if_inet6)."""
    want = ipaddress.ip_address(addr).packed.hex()
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] == want:
                return int(parts[1], 16)
    except OSError:
        pass
    raise StartupError(f"no interface has the IPv6 address {addr}")


def join_group(sock: socket.socket, group: str, interface: str | None) -> None:
    if ":" in group:
        ifindex = _ifindex_of(interface) if interface else 0
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        if ifindex:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
    else:
        iface = socket.inet_aton(interface or "0.0.0.0")
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                        socket.inet_aton(group) + iface)
        if interface:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, iface)


def open_socket(listener: Listener, *, reuseport: bool) -> socket.socket:
    """A bound, non-blocking UDP socket for ``listener``."""
    addr = listener.address
    fam = family_of(addr.host)
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if listener.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listener.rcvbuf)
        if listener.sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, listener.sndbuf)
        if listener.multicast:
            if fam == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
        sock.bind((addr.host, addr.port))
        if listener.multicast:
            join_group(sock, addr.host, listener.multicast_interface)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        what = "bind" if exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL) else "set up"
        raise StartupError(f"cannot {what} {addr} for listener {listener.name!r}: "
                           f"{exc.strerror or exc}") from None
    return sock


def rcvbuf_of(sock: socket.socket) -> int:
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def detach_from_group(sock: socket.socket) -> None:
    """Stop new datagrams reaching ``sock`` while keeping its queue.

    ``connect()`` takes a socket out of its reuseport group (kernel facts);
    the peer is the discard port on loopback, which never sends to us.
    """
    host, _port = sock.getsockname()[:2]
    fam = sock.family
    if ipaddress.ip_address(host).is_unspecified or ipaddress.ip_address(host).is_multicast:
        host = "::1" if fam == socket.AF_INET6 else "127.0.0.1"
    sock.connect((host, 9))
