"""Every listener socket the master holds, per slot, for its whole life.

How many sockets a listener needs follows from its kind:
- unicast: one ``SO_REUSEPORT`` socket per slot; the kernel hashes flows;
- port 0 ("private"): one ephemeral socket per slot, outside any group, so a
  worker may ``connect()`` it;
- multicast ``fanout``: one socket per slot, each getting a copy;
- multicast ``shard``: one socket per slot, each with a BPF filter keeping
  its share of sources, so no worker wakes for another's datagrams;
- multicast ``single``: one socket shared by every slot, read by the leader
  only; when the leader dies its queue is still there for the next one.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from typing import Literal

from . import sockets
from .config import Listener

log = logging.getLogger("shardudp.sockets")

Kind = Literal["group", "private", "shard", "fanout", "single"]


def kind_of(listener: Listener) -> Kind:
    if listener.multicast:
        mode = listener.multicast_mode
        return "single" if mode == "single" else ("shard" if mode == "shard" else "fanout")
    return "private" if listener.private else "group"


@dataclasses.dataclass(frozen=True)
class SlotSocket:
    """What a worker is handed for one listener."""

    listener: Listener
    sock: socket.socket
    kind: Kind

    @property
    def shared(self) -> bool:
        """True when ``connect()`` would break sharing (group or shared socket)."""
        return self.kind != "private"


class SocketSet:
    def __init__(self, listeners: tuple[Listener, ...]) -> None:
        self.listeners = listeners
        self._by_slot: dict[int, list[SlotSocket]] = {}
        self._single: dict[str, socket.socket] = {}
        self._logged_rcvbuf: set[str] = set()
        self._detached: set[int] = set()

    def open_slot(self, slot: int) -> None:
        """Create (and bind) this slot's sockets; raises StartupError."""
        made: list[SlotSocket] = []
        try:
            for lst in self.listeners:
                kind = kind_of(lst)
                if kind == "single":
                    sock = self._single.get(lst.name)
                    if sock is None:
                        sock = self._single[lst.name] = sockets.open_socket(lst, reuseport=True)
                else:
                    sock = sockets.open_socket(lst, reuseport=kind != "private")
                made.append(SlotSocket(lst, sock, kind))
                self._log_rcvbuf(lst, sock)
        except BaseException:
            for ss in made:
                if ss.kind != "single":
                    ss.sock.close()
            raise
        self._by_slot[slot] = made
        self._refilter()

    def for_slot(self, slot: int) -> list[SlotSocket]:
        return list(self._by_slot.get(slot, ()))

    def slots(self) -> list[int]:
        return sorted(self._by_slot)

    def all_sockets(self) -> list[tuple[int, SlotSocket]]:
        return [(slot, ss) for slot, lst in sorted(self._by_slot.items()) for ss in lst]

    def fds(self) -> set[int]:
        return {ss.sock.fileno() for _, ss in self.all_sockets()}

    def detach_slot(self, slot: int) -> None:
        """Keep the slot's queues but stop new datagrams arriving (scale down)."""
        for ss in self._by_slot.get(slot, ()):
            if ss.kind == "group":
                sockets.detach_from_group(ss.sock)
            elif ss.kind in ("shard", "fanout"):
                sockets.attach_filter(ss.sock, sockets.DROP_ALL)
        self._detached.add(slot)
        self._refilter()

    def close_slot(self, slot: int) -> None:
        for ss in self._by_slot.pop(slot, ()):
            if ss.kind != "single":
                ss.sock.close()
        self._detached.discard(slot)
        self._refilter()

    def close_all(self) -> None:
        for slot in list(self._by_slot):
            self.close_slot(slot)
        for sock in self._single.values():
            sock.close()
        self._single.clear()

    def forget_in_child(self) -> None:
        """In a forked worker: drop the master's socket objects without closing.

        The worker closes foreign fds by number; detaching first stops a later
        garbage collection from closing an fd number the worker reused.
        """
        for _, ss in self.all_sockets():
            ss.sock.detach()
        for sock in self._single.values():
            sock.detach()

    def _refilter(self) -> None:
        """Give each live shard socket its share; called whenever slots change."""
        live = [s for s in sorted(self._by_slot) if s not in self._detached]
        for index, slot in enumerate(live):
            for ss in self._by_slot[slot]:
                if ss.kind == "shard":
                    prog = sockets.shard_filter(index, len(live), ss.sock.family == socket.AF_INET6)
                    sockets.attach_filter(ss.sock, prog)

    def _log_rcvbuf(self, lst: Listener, sock: socket.socket) -> None:
        if not lst.rcvbuf or lst.name in self._logged_rcvbuf:
            return
        self._logged_rcvbuf.add(lst.name)
        got = sockets.rcvbuf_of(sock)
        level = logging.WARNING if got < lst.rcvbuf else logging.INFO
        log.log(level, "listener %s: asked SO_RCVBUF %d, the kernel gave %d%s", lst.name,
                lst.rcvbuf, got,
                " (raise net.core.rmem_max to get more)" if got < lst.rcvbuf else "")
