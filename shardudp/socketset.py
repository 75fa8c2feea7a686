"""Every listener socket the master holds, per slot, for its whole life.

How many sockets a listener needs follows from its kind:
- unicast: one ``SO_REUSEPORT`` socket per slot; the kernel hashes flows;
- port 0 ("private"): one ephemeral socket per slot, outside any group, so a
  worker may ``connect()`` it;
- multicast ``fanout``: one socket per slot, each getting a copy;
- multicast ``shard``: one socket per slot, each with a BPF filter keeping
  its share of sources, so no worker wakes for another's datagrams; plus one
  *tally* socket refusing everything, whose drop counter says how many
  datagrams reached the listener (see ``shardudp.drops``);
- multicast ``single``: one socket shared by every slot, read by the leader
  only; when the leader dies its queue is still there for the next one.

A unicast listener that keeps sessions (``session_idle``) has two sockets per
slot in its group, *generations* 0 and 1: a slot's current worker reads one;
a reload's new worker reads the other, while the old one keeps its held
sessions on the first (``shardudp.sessions``). The steering program decides
which generation gets which flow, so an unread generation gets nothing.

The exporter's thread reads these sockets' kernel counters while the master
opens and closes them: both hold ``_lock`` (the master only while changing
the set, for a few system calls).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from collections.abc import Iterator
from typing import Literal

from . import sockets, sockstats
from .config import Listener
from .drops import SHARED, DropBook, Reading, Role
from .errors import StartupError

log = logging.getLogger("shardudp.sockets")

Kind = Literal["group", "private", "shard", "fanout", "single"]
#: (index, count): keep the sources whose hash % count == index.
Share = tuple[int, int]


def kind_of(listener: Listener) -> Kind:
    """How a listener's sockets are laid out over slots (see the module docstring)."""

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
    #: Session keeping: which of the slot's two sockets of the listener this is.
    gen: int = 0

    @property
    def shared(self) -> bool:
        """True when ``connect()`` would break sharing (group or shared socket)."""
        return self.kind != "private"


class SocketSet:
    """Owns every listener socket the master holds, per slot, for its whole life.

    The master opens, detaches and closes slots through it; it is the only
    code that changes sockets' group membership or filters. Thread-safe for
    ``kernel_stats`` (the exporter reads it at scrape time).
    """

    def __init__(self, listeners: tuple[Listener, ...]) -> None:
        self.listeners = listeners
        self._by_slot: dict[int, list[SlotSocket]] = {}
        self._single: dict[str, socket.socket] = {}
        self._tally: dict[str, socket.socket] = {}
        # The shares each shard socket's filter keeps now; () refuses everything.
        self._shares: dict[socket.socket, tuple[Share, ...]] = {}
        self._logged_rcvbuf: set[str] = set()
        self._detached: set[int] = set()
        #: Each group listener's reuseport members as slots, in the kernel's
        #: order (``socks[]``): binding appends; leaving moves the last member
        #: into the leaver's place. A steering program names members by index.
        self._members: dict[str, list[tuple[int, int]]] = {
            lst.name: [] for lst in listeners if kind_of(lst) == "group"}
        #: Each slot's current socket generation (session listeners).
        self._gen: dict[int, int] = {}
        #: Per shard listener, the slots whose filters must not keep any share
        #: (no worker reads them): their sources go to the others meanwhile.
        self._idle: dict[str, frozenset[int]] = {}
        self._drops = DropBook()
        self._lock = threading.Lock()

    def open_slot(self, slot: int) -> None:
        """Create (and bind) this slot's sockets; raises StartupError."""
        with self._lock:
            made: list[SlotSocket] = []
            try:
                for lst in self.listeners:
                    for gen in range(2 if lst.sessions else 1):
                        made.append(SlotSocket(lst, self._open(lst), kind_of(lst), gen))
            except BaseException:
                self._close_own(made)
                raise
            self._by_slot[slot] = made
            self._gen[slot] = 0
            for ss in made:
                if ss.kind == "group":
                    self._members[ss.listener.name].append((slot, ss.gen))
            # Sampled while its new shard sockets still refuse everything:
            # that keeps the shard drop arithmetic exact (shardudp.drops).
            self._sample()
            self._refilter()

    def _open(self, lst: Listener) -> socket.socket:
        kind = kind_of(lst)
        if kind == "single":
            sock = self._single.get(lst.name)
            if sock is None:
                sock = self._single[lst.name] = sockets.open_socket(lst, reuseport=True)
        elif kind == "shard":
            if lst.name not in self._tally:
                self._tally[lst.name] = sockets.open_socket(lst, reuseport=True, filtered=True)
            sock = sockets.open_socket(lst, reuseport=True, filtered=True)
            self._shares[sock] = ()
        else:
            sock = sockets.open_socket(lst, reuseport=kind != "private")
        self._log_rcvbuf(lst, sock)
        return sock

    def for_slot(self, slot: int, beside: bool = False) -> list[SlotSocket]:
        """The sockets a new worker of ``slot`` is handed: of a session listener, the
        slot's current generation, or the other one for a worker ``beside`` the
        current one (a reload).

        Their multicast options (TTL, loopback, outgoing interface) are first
        reset to the listener's: they live on the socket, so a previous
        worker's ``setTTL`` would otherwise carry over. A single-mode socket
        is shared: resetting it also resets it for the current leader.
        """
        gen = self._gen.get(slot, 0) ^ (1 if beside else 0)
        out = [ss for ss in self._by_slot.get(slot, ()) if not ss.listener.sessions
               or ss.gen == gen]
        for ss in out:
            try:
                sockets.apply_multicast_options(ss.sock, ss.listener)
            except (OSError, StartupError) as exc:
                log.warning("listener %s: cannot reset multicast options for slot %d: %s",
                            ss.listener.name, slot, exc)
        return out

    def slots(self) -> list[int]:
        return sorted(self._by_slot)

    def all_sockets(self) -> list[tuple[int, SlotSocket]]:
        return [(slot, ss) for slot, lst in sorted(self._by_slot.items()) for ss in lst]

    def fds(self) -> set[int]:
        return {ss.sock.fileno() for _, ss in self.all_sockets()}

    def detach_slot(self, slot: int) -> None:
        """Keep the slot's queues but stop new datagrams arriving (scale down)."""
        with self._lock:
            self._detach(slot)

    def _detach(self, slot: int) -> None:
        for ss in self._by_slot.get(slot, ()):
            if ss.kind == "group":
                sockets.detach_from_group(ss.sock)
                members = self._members[ss.listener.name]
                if (slot, ss.gen) in members:
                    i = members.index((slot, ss.gen))
                    members[i] = members[-1]
                    members.pop()
            elif ss.kind == "fanout":
                # Not a drop-all filter: the kernel would count every datagram
                # it refuses as a drop of this slot.
                sockets.leave_group(ss.sock, ss.listener)
        self._detached.add(slot)
        self._refilter()  # shard: the others take over its share, then it refuses all

    def close_slot(self, slot: int) -> None:
        with self._lock:
            if slot not in self._by_slot:
                return
            if slot not in self._detached:
                self._detach(slot)  # so that no datagram of its share is lost
            self._sample()  # the last word of the sockets about to close
            closed = self._close_own(self._by_slot.pop(slot))
            self._drops.forget(closed)
            self._detached.discard(slot)
            self._gen.pop(slot, None)

    def members(self, listener: str) -> tuple[tuple[int, int], ...]:
        """A group listener's reuseport members as (slot, generation), in the kernel's order."""
        return tuple(self._members.get(listener, ()))

    def gen_of(self, slot: int) -> int:
        """The socket generation the slot's current worker reads (session listeners)."""
        return self._gen.get(slot, 0)

    def set_gen(self, slot: int, gen: int) -> None:
        self._gen[slot] = gen

    def group_listeners(self) -> list[Listener]:
        """The listeners whose sockets form a reuseport group (steerable)."""
        return [lst for lst in self.listeners if lst.name in self._members]

    def shard_listeners(self) -> list[Listener]:
        return [lst for lst in self.listeners if kind_of(lst) == "shard"]

    def steer(self, listener: str, program: list[sockets.Insn] | None) -> None:
        """Attach ``program`` to a group listener's reuseport group (None: the kernel's hash).

        Through any member: the program belongs to the whole group.
        """
        with self._lock:
            member = next((ss.sock for slot, _ in self._members.get(listener, ())
                           for ss in self._by_slot[slot] if ss.listener.name == listener), None)
            if member is None:
                return
            if program is None:
                sockets.detach_reuseport_program(member)
            else:
                sockets.attach_reuseport_program(member, program)

    def set_idle(self, listener: str, idle: frozenset[int]) -> None:
        """Shard listener: ``idle`` slots keep no share; the others split theirs."""
        with self._lock:
            if self._idle.get(listener, frozenset()) != idle:
                self._idle[listener] = idle
                self._refilter()

    def close_all(self) -> None:
        with self._lock:
            for lst in self._by_slot.values():
                self._close_own(lst)
            for sock in [*self._single.values(), *self._tally.values()]:
                sock.close()
            self._by_slot.clear()
            self._single.clear()
            self._tally.clear()
            self._shares.clear()
            self._detached.clear()
            for members in self._members.values():
                members.clear()

    def _close_own(self, slot_sockets: list[SlotSocket]) -> list[socket.socket]:
        """Close the sockets that are the slot's own (not the shared single one); return them."""
        own = [ss.sock for ss in slot_sockets if ss.kind != "single"]
        for sock in own:
            self._shares.pop(sock, None)
            sock.close()
        return own

    def forget_in_child(self) -> None:
        """In a forked worker: drop the master's socket objects without closing.

        The worker closes foreign fds by number; detaching first stops a later
        garbage collection from closing an fd number the worker reused.
        """
        for _, ss in self.all_sockets():
            ss.sock.detach()
        for sock in [*self._single.values(), *self._tally.values()]:
            sock.detach()

    def kernel_stats(self) -> sockstats.KernelStats:
        """Drops, queue and buffer of every listener, read now; safe from any thread.

        Drops are monotonic totals (see ``shardudp.drops``): per slot where a
        socket is the slot's own, under ``SHARED`` for the single-mode socket
        and for shard overflow. The tally socket is not listed.
        """
        with self._lock:
            return self._sample()

    def _sample(self) -> sockstats.KernelStats:
        entries = list(self._entries())
        stats = sockstats.read_sockets([sock for sock, *_ in entries])
        self._drops.update(
            Reading(sock, name, label, role, st.drops if st is not None else None)
            for (sock, name, label, role), st in zip(entries, stats, strict=True))
        queues = {(label, name): (st.rx_queue_bytes, st.rcvbuf_bytes)
                  for (_, name, label, role), st in zip(entries, stats, strict=True)
                  if st is not None and role != "tally"}
        return sockstats.KernelStats(drops=self._drops.totals(), queues=queues)

    def _entries(self) -> Iterator[tuple[socket.socket, str, str, Role]]:
        """(socket, listener, slot label, role) of every socket, each once.

        Tallies come last: read after the members, a datagram arriving
        mid-sample can only make shard overflow look smaller, for one sample.
        """
        for slot, ss in self.all_sockets():
            if ss.kind != "single":
                role: Role = "member" if ss.kind == "shard" else "socket"
                yield ss.sock, ss.listener.name, str(slot), role
        for name, sock in self._single.items():
            yield sock, name, SHARED, "socket"
        for name, sock in self._tally.items():
            yield sock, name, SHARED, "tally"

    def _refilter(self) -> None:
        """Give each live shard socket its share of sources; called whenever slots change.

        Two phases, so that no datagram is ever refused by every socket: first
        each live socket keeps its new share on top of its old one, then only
        the new one (a detached socket: nothing). A datagram arriving between
        the two phases, a few microseconds, may be handled twice, never zero
        times.
        """
        attached = [s for s in sorted(self._by_slot) if s not in self._detached]
        want: dict[tuple[int, str], tuple[Share, ...]] = {}
        for lst in self.shard_listeners():
            idle = self._idle.get(lst.name, frozenset())
            # Nobody reading at all: keep every share where it is, to queue.
            live = [s for s in attached if s not in idle] or attached
            for i, slot in enumerate(live):
                want[slot, lst.name] = ((i, len(live)),)
        shard = [(slot, ss) for slot, ss in self.all_sockets() if ss.kind == "shard"]
        for slot, ss in shard:
            now = self._shares[ss.sock]
            new = want.get((slot, ss.listener.name), ())
            if new and new[0] not in now:
                self._set_shares(ss.sock, now + new)
        for slot, ss in shard:
            new = want.get((slot, ss.listener.name), ())
            if self._shares[ss.sock] != new:
                self._set_shares(ss.sock, new)

    def _set_shares(self, sock: socket.socket, shares: tuple[Share, ...]) -> None:
        sockets.attach_filter(sock, sockets.shard_filter(shares, sock.family == socket.AF_INET6))
        self._shares[sock] = shares

    def _log_rcvbuf(self, lst: Listener, sock: socket.socket) -> None:
        if not lst.rcvbuf or lst.name in self._logged_rcvbuf:
            return
        self._logged_rcvbuf.add(lst.name)
        got = sockets.rcvbuf_of(sock)
        level = logging.WARNING if got < lst.rcvbuf else logging.INFO
        log.log(level, "listener %s: asked SO_RCVBUF %d, the kernel gave %d%s", lst.name,
                lst.rcvbuf, got,
                " (raise net.core.rmem_max to get more)" if got < lst.rcvbuf else "")
