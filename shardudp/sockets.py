"""Socket creation and configuration, in the master. See shared kernel facts.

Rules this module enforces:
- ``SO_REUSEPORT`` on every group socket, never ``SO_REUSEADDR`` (it lets
  another uid bind the port and steal unicast);
- every socket sets ``IP_MULTICAST_ALL`` (``IPV6_MULTICAST_ALL``) to 0, so it
  only sees the groups it joined itself: with the default, a unicast socket
  on 0.0.0.0:P gets a copy of every group on port P that anything on the host
  joined;
- every IPv6 socket sets ``IPV6_V6ONLY``: [::]:P serves IPv6 only, whatever
  the host's ``bindv6only`` says, so it never overlaps 0.0.0.0:P or
  127.0.0.1:P (``0.0.0.0:P`` plus ``[::]:P`` is the dual-stack recipe);
- a filtered (shard) socket refuses everything from before it is bound until
  it is given its share, so it never takes another socket's datagrams;
- a socket leaves its reuseport group only by ``connect()`` (to drain) or by
  its last close, so the master keeps each one for its whole life.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from .config import Address, Listener
from .errors import StartupError

log = logging.getLogger("shardudp.sockets")

SO_ATTACH_FILTER: Final = 26
SO_ATTACH_REUSEPORT_CBPF: Final = 51
SO_DETACH_REUSEPORT_BPF: Final = 68
IP_MULTICAST_ALL: Final = 49
IPV6_MULTICAST_ALL: Final = 29
SKF_NET_OFF: Final = -0x100000
_KNUTH: Final = 2654435761


def family_of(host: str) -> socket.AddressFamily:
    """The address family of an IP literal."""

    return socket.AF_INET6 if ":" in host else socket.AF_INET


# -- classic BPF ---------------------------------------------------------------

Insn = tuple[int, int, int, int]
DROP_ALL: Final[list[Insn]] = [(0x06, 0, 0, 0)]


def _source_words(ipv6: bool) -> list[int]:
    """BPF load offsets of the source address's 32-bit words, in the IP header."""
    first = 8 if ipv6 else 12
    return [(SKF_NET_OFF + first + 4 * i) & 0xFFFFFFFF for i in range(4 if ipv6 else 1)]


def shard_filter(shares: Sequence[tuple[int, int]], ipv6: bool) -> list[Insn]:
    """Keep a datagram iff hash(source) % count == index for any (index, count) share.

    No shares: drop everything. A socket filter sees the UDP header at offset
    0 and the IP header at SKF_NET_OFF. The hash folds every word of the
    source address (so IPv6 hosts differing only in their high bits spread)
    with the source port, which spreads the flows of one host.
    """
    if not shares:
        return list(DROP_ALL)
    prog: list[Insn] = [(0x28, 0, 0, 0)]  # ldh [0]          source port
    for word in _source_words(ipv6):
        prog += [
            (0x07, 0, 0, 0),  # tax
            (0x20, 0, 0, word),  # ld [net+off]   one word of the source address
            (0xAC, 0, 0, 0),  # xor x
        ]
    prog += [(0x24, 0, 0, _KNUTH), (0x74, 0, 0, 16)]  # mul #knuth; rsh #16
    if len(shares) > 1:
        prog.append((0x02, 0, 0, 0))  # st M[0]   the hash, for the next share
    last = len(prog) + 3 * len(shares) - 1  # index of the final "ret #0"
    for i, (index, count) in enumerate(shares):
        if i:
            prog.append((0x60, 0, 0, 0))  # ld M[0]
        prog.append((0x94, 0, 0, count))  # mod #count
        # jeq #index: on a match jump to "ret #-1", just past the final "ret #0".
        prog.append((0x15, last - len(prog), 0, index))
    prog += [(0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]  # ret #0 (drop); ret #-1 (keep)
    return prog


def shard_of(src_ip: str, src_port: int, count: int) -> int:
    """The share index ``shard_filter`` keeps this source in (for tests and docs)."""
    packed = ipaddress.ip_address(src_ip).packed
    folded = src_port
    for (word,) in struct.iter_unpack("!I", packed):
        folded ^= word
    return ((folded * _KNUTH & 0xFFFFFFFF) >> 16) % count


def _fprog(prog: list[Insn]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """A ``struct sock_fprog`` for ``prog``, and the buffer it points into (keep it alive)."""
    buf = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in prog))
    return struct.pack("@HP", len(prog), ctypes.addressof(buf)), buf


def attach_reuseport_program(sock: socket.socket, prog: list[Insn]) -> None:
    """Steer ``sock``'s whole reuseport group with ``prog`` (it returns a member's index)."""
    fprog, _buf = _fprog(prog)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach_reuseport_program(sock: socket.socket) -> None:
    """Back to the kernel's hash for ``sock``'s group (no program attached is fine)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def attach_filter(sock: socket.socket, prog: list[Insn]) -> None:
    """Attach the classic BPF socket filter ``prog`` (SO_ATTACH_FILTER) to ``sock``."""

    fprog, _buf = _fprog(prog)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


# -- /proc/net/udp -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcSocket:
    """One line of /proc/net/udp{,6}: a bound UDP socket on this host."""

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
    """Every bound UDP socket in this network namespace, IPv4 and IPv6."""

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
    # Another program's v6 wildcard may be dual-stack and so cover every v4
    # address too (ours are V6ONLY, but /proc/net/udp6 does not say which).
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


def ifindex_of(addr: str) -> int:
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


def _set_membership(sock: socket.socket, listener: Listener, join: bool) -> None:
    group, interface = listener.address.host, listener.multicast_interface
    if ":" in group:
        ifindex = ifindex_of(interface) if interface else 0
        mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", ifindex)
        opt = socket.IPV6_JOIN_GROUP if join else socket.IPV6_LEAVE_GROUP
        sock.setsockopt(socket.IPPROTO_IPV6, opt, mreq)
    else:
        mreq = socket.inet_aton(group) + socket.inet_aton(interface or "0.0.0.0")
        opt = socket.IP_ADD_MEMBERSHIP if join else socket.IP_DROP_MEMBERSHIP
        sock.setsockopt(socket.IPPROTO_IP, opt, mreq)


def join_group(sock: socket.socket, listener: Listener) -> None:
    """Make ``sock`` a member of the listener's group on its interface."""
    _set_membership(sock, listener, join=True)


def leave_group(sock: socket.socket, listener: Listener) -> None:
    """Stop the listener's group reaching ``sock``; what is queued stays."""
    _set_membership(sock, listener, join=False)


def apply_multicast_options(sock: socket.socket, listener: Listener) -> None:
    """Set what ``sock`` sends to groups with: the listener's TTL, loopback and interface.

    Called when the socket is made and again before each new worker gets it:
    these options live on the socket, which outlives workers, so what one
    worker set (``setTTL``, ``setOutgoingInterface``) would leak into the next.
    """
    interface = listener.multicast_interface
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, listener.multicast_ttl)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP,
                        int(listener.multicast_loopback))
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF,
                        ifindex_of(interface) if interface else 0)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, listener.multicast_ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP,
                        int(listener.multicast_loopback))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                        socket.inet_aton(interface or "0.0.0.0"))


def open_socket(listener: Listener, *, reuseport: bool, filtered: bool = False) -> socket.socket:
    """A bound, non-blocking UDP socket for ``listener``.

    ``filtered``: attach a filter refusing everything before binding; the
    caller gives the socket its share later (see ``shard_filter``).
    """
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
        if fam == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MULTICAST_ALL, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if filtered:
            attach_filter(sock, DROP_ALL)
        apply_multicast_options(sock, listener)
        sock.bind((addr.host, addr.port))
        if listener.multicast:
            join_group(sock, listener)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(_open_error(listener, exc)) from None
    except StartupError:
        sock.close()
        raise
    return sock


_BIND_ERRNOS: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})
#: Send failures that UDP semantics turn into a silent drop (a full buffer):
#: the datagram is lost and counted, the handler goes on. Every data path
#: treats them alike.
SEND_DROP_ERRNOS: Final = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})


def _open_error(listener: Listener, exc: OSError) -> str:
    """The one line a failed ``open_socket`` reports, with what to do about it."""
    addr = listener.address
    what = "bind" if exc.errno in _BIND_ERRNOS else "set up"
    line = f"cannot {what} {addr} for listener {listener.name!r}: {exc.strerror or exc}"
    if exc.errno == errno.EACCES and 0 < addr.port < 1024:
        line += ("; ports below 1024 need privilege: start as root (with --user USER to run "
                 "the workers as USER), or grant CAP_NET_BIND_SERVICE (in a systemd unit: "
                 "AmbientCapabilities=CAP_NET_BIND_SERVICE)")
    return line


#: Below it, binding needs privilege (``net.ipv4.ip_unprivileged_port_start``; IPv6 too).
_UNPRIVILEGED_PORT_START: Final = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
#: Its bit in a capability set (linux/capability.h).
CAP_NET_BIND_SERVICE: Final = 10


def _unprivileged_port_start() -> int:
    try:
        return int(_UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return 1024


def _may_bind_privileged() -> bool:
    """Root, or CAP_NET_BIND_SERVICE in our effective set."""
    if os.geteuid() == 0:
        return True
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_BIND_SERVICE & 1)
    return False


def privilege_refusal(listener: Listener) -> str | None:
    """The line ``open_socket`` would fail with for lack of privilege to bind the
    listener's port, predicted without binding anything (for ``check``)."""
    port = listener.address.port
    if 0 < port < _unprivileged_port_start() and not _may_bind_privileged():
        return _open_error(listener, OSError(errno.EACCES, os.strerror(errno.EACCES)))
    return None


def rcvbuf_of(sock: socket.socket) -> int:
    """The socket's receive buffer as the kernel stores it (twice what was asked)."""

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
