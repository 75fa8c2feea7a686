"""Multicast memberships of a worker's port: whose they are and what the APP may change.

On a multicast listener's socket (bound to its group) the membership is the
master's: it joined the group for every worker, and in ``single`` mode the
very socket is every worker's. So ``joinGroup``/``leaveGroup`` of that group
(with no interface, or the listener's own) succeed and change nothing, and
any other group is refused with ``MulticastJoinError`` (the socket could
never receive it). A socket the APP opened itself joins as in Twisted.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.udp import MulticastPort
from twisted.python.failure import Failure

from shardudp.config import parse_ip
from shardudp.errors import StartupError
from shardudp.sockets import ifindex_of

logger = logging.getLogger("shardudp.port")


class ListenerMembership(MulticastPort):
    """Mixed into every port: the membership rules above, and TTLs that work on IPv6.

    ``_membership`` is (group, interface the master joined it on: an
    address, "" for the kernel's choice, or an IPv6 interface index when read
    back from the socket) of a multicast listener's socket, None otherwise.
    """

    _membership: tuple[str, str | int] | None
    _sock: socket.socket
    addressFamily: Any
    socket: Any

    def joinGroup(self, addr: str, interface: str = "") -> Deferred[None]:
        if self._membership is not None:
            return self._listener_membership("joinGroup", addr, interface)
        d: Deferred[None] = super().joinGroup(addr, interface)

        def already_member(f: Failure) -> Failure | None:
            # Memberships live on the socket, which outlives workers: a
            # previous worker may have joined already, so we are in the group.
            exc = f.value
            cause = getattr(exc, "__cause__", None)
            if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                return None
            if isinstance(exc, error.MulticastJoinError) and errno.EADDRINUSE in exc.args:
                return None
            return f

        d.addErrback(already_member)
        return d

    def leaveGroup(self, addr: str, interface: str = "") -> Deferred[None]:
        if self._membership is not None:
            return self._listener_membership("leaveGroup", addr, interface)
        return super().leaveGroup(addr, interface)

    def _listener_membership(self, call: str, addr: str, interface: str) -> Deferred[None]:
        """joinGroup/leaveGroup on a multicast listener's socket, bound to its group.

        The master joined the group on the listener's interface for every
        worker (and, in single mode, this very socket is every worker's):
        leaving it would cut them all off, and joining it again changes
        nothing, so both are no-ops. An empty interface means the listener's.
        """
        assert self._membership is not None
        group, own_if = self._membership
        port = self._sock.getsockname()[1]
        if canonical_ip(addr) != group:
            return fail(error.MulticastJoinError(
                f"{call}({addr!r}) refused: this listener's sockets are bound to {group}:{port} "
                f"and never receive {addr}; add a --multicast listener for {addr}:{port}"))
        if not self._is_own_interface(interface):
            return fail(error.MulticastJoinError(
                f"{call}({addr!r}, {interface!r}) refused: the master joined {group} for this "
                f"listener on {own_if or 'the interface the kernel chose'} "
                "(--multicast-interface); its memberships are the master's"))
        logger.debug("%s(%r, %r) on a listener socket is a no-op: the master holds the "
                     "membership of %s for every worker", call, addr, interface, group)
        return succeed(None)

    def _is_own_interface(self, interface: str) -> bool:
        assert self._membership is not None
        own_if = self._membership[1]
        given = canonical_ip(interface)
        if not interface or given in ("0.0.0.0", "::"):
            return True  # stock Twisted's "any": here, the listener's own
        if given is None or not own_if:
            return False
        if given == own_if:
            return True
        if self.addressFamily != socket.AF_INET6:
            return False
        # An IPv6 membership is per interface: any of its addresses names it.
        try:
            return ifindex_of(given) == (own_if if isinstance(own_if, int) else ifindex_of(own_if))
        except StartupError:
            return False

    # IP_MULTICAST_TTL is an IPv4 option; on an AF_INET6 socket Linux accepts it
    # but it only affects v4-mapped traffic, so stock Twisted silently does
    # nothing useful there.
    def getTTL(self) -> int:
        if self.addressFamily == socket.AF_INET6:
            return int(self.socket.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS))
        return int(super().getTTL())

    def setTTL(self, ttl: int) -> None:
        if self.addressFamily == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
            return
        super().setTTL(ttl)


def canonical_ip(text: object) -> str | None:
    """An IP literal written the way the configuration writes it; None for anything else."""
    try:
        return parse_ip(text)
    except ValueError:
        return None


def membership_of(
    sock: socket.socket, interface: str | None
) -> tuple[str, str | int] | None:
    """(group, interface) of a socket bound to a multicast group, else None.

    Without the listener's ``interface``, it is read back from the socket's
    outgoing interface, which the master sets to the listener's before
    handing the socket over.
    """
    host = sock.getsockname()[0]
    group = canonical_ip(host)
    if group is None or not ipaddress.ip_address(group).is_multicast:
        return None
    if interface is not None:
        return group, canonical_ip(interface) or ""
    if sock.family == socket.AF_INET6:
        return group, int(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF))
    raw = sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)
    iface = socket.inet_ntoa(raw)
    return group, "" if iface == "0.0.0.0" else iface
