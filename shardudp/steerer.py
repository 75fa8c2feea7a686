"""The steering service: keeps every flow where it is read, and held sessions where they live.

A thin shell over ``shardudp.steering`` (the table and the program),
``shardudp.sessions`` (held sessions) and the supervisor's ``serving``
answer. Once per loop turn, and right after any change to the sockets, it
decides per listener where each flow goes and has ``SocketSet`` (the only
code that touches sockets) attach the result:

- unicast (reuseport group) listeners: a classic BPF program mapping flows to
  sockets through a consistent table (a scale moves about 1/(N+1) of the
  flows) and lending the buckets of a slot unread for ``steer_grace`` to the
  slots that are read, until it is read again;
- with session keeping, pins: flows a replaced worker (a reload, a
  scale-down) or a slot losing buckets (a scale) still serves stay with it
  until they go idle or ``drain_timeout`` passes; a reload's new worker reads
  the slot's other socket generation meanwhile;
- ``shard`` multicast listeners: the filters' shares, as for lending.

Datagrams already queued in a slot's sockets stay there for its next
worker: steering only changes where new ones go.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Hashable

from . import sessions, steering, supervision, wire
from .config import Listener
from .errors import WireError
from .master import Child
from .services import Service
from .steering import Steering, Table

log = logging.getLogger("shardudp.master")


@dataclasses.dataclass
class _Listener:
    """What the steerer last decided for one listener."""

    config: Listener
    #: slot -> since when it has not been read.
    idle_since: dict[int, float] = dataclasses.field(default_factory=dict)
    #: Slots whose flows go elsewhere now (unread past the grace), and why.
    steered: dict[int, supervision.NotServing] = dataclasses.field(default_factory=dict)
    program: list[steering.Insn] | None = None


@dataclasses.dataclass
class _Switch:
    """A new table waiting for the workers whose flows it moves to say which to keep."""

    table: Table
    until: float


class Steerer(Service):
    """Owns the home table of flows to slots, each listener's steering decision, the
    held sessions and the slots' socket generations.

    Registered before the poison service and the monitor, so that what
    /healthz and /metrics say about steering is what the kernel does.
    """

    def __init__(self, grace: float, seed: int | None = None, *, programs: bool = True) -> None:
        self.grace = grace
        #: False: unicast groups keep the kernel's hash (--no-steering); the
        #: shard multicast shares and the serving state are kept all the same.
        self.programs = programs
        self.seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
        self.table: Table | None = None
        self.switch: _Switch | None = None
        self.listeners: dict[str, _Listener] = {}
        self.book = sessions.Book()
        #: (slot, listener) -> the buckets lent to that slot, as its workers were told.
        self.covers: dict[tuple[int, str], tuple[int, ...]] = {}
        #: Draining workers of a reload: the slot to move to its other generation.
        self._flips: dict[int, int] = {}
        self._dirty = True

    # -- hooks

    def started(self) -> None:
        self.table = Table.initial(self.master.sockets.slots())
        lsts = self.master.sockets.group_listeners() + self.master.sockets.shard_listeners()
        self.listeners = {lst.name: _Listener(lst) for lst in lsts}
        self._steer(self.master.clock())

    def for_new_worker(self, slot: int) -> list[wire.Message]:
        sup = self.master.sup
        s = sup.slots.get(slot) if sup is not None else None
        if s is not None and s.current is not None:
            # A worker beside the current one reads the other generation: an
            # older worker still draining there must go first, sessions cut.
            for pid in self._drainers_of(slot):
                self._finish(pid, cut=True)
        return [wire.Cover(listener=name, seed=self.seed, buckets=list(buckets))
                for (s_, name), buckets in sorted(self.covers.items()) if s_ == slot and buckets]

    def after_action(self, action: supervision.Action) -> None:
        now = self.master.clock()
        match action:
            case supervision.OpenSlot() | supervision.DetachSlot() | supervision.CloseSlot():
                # A membership change: the indices the program returns moved.
                self._dirty = True
                self._retable(now)
                self._steer(now)
            case supervision.Drain():
                self._hold_for_drain(action.pid, action.slot, now)
            case supervision.Retired():
                if action.pid in self._flips or any(k[0] == action.pid for k in self.book.holders):
                    self._gone(action.pid)
                self._steer(now)
            case supervision.Spawn() | supervision.Kill():
                self._steer(now)
            case _:
                pass

    def on_message(self, child: Child, msg: wire.Message, now: float) -> bool:
        if not isinstance(msg, wire.Sessions):
            return False
        lst = self.listeners.get(msg.listener)
        if lst is None or not lst.config.sessions:
            raise WireError(f"sessions report for {msg.listener!r}, which keeps none")
        active = [wire.parse_flow_untrusted(t, "sessions report") for t in msg.active]
        ended = [wire.parse_flow_untrusted(t, "sessions report") for t in msg.ended]
        log.debug("sessions from pid=%d: %d active, %d ended", child.pid, len(active), len(ended))
        holder = self.book.holders.get((child.pid, msg.listener))
        if holder is None:
            return True  # a report that raced the end of its holding
        slot = child.slot
        moved = not holder.draining or self._retiring(slot)
        cut = self.book.report(child.pid, msg.listener, active, ended,
                               self._room(msg.listener), moved=moved, more=msg.more)
        if cut:
            log.warning("listener %s: %d sessions of worker pid=%d cut: the steering program "
                        "holds no more", msg.listener, len(cut), child.pid)
        self._dirty = True
        self._progress(now)
        return True

    def after_turn(self, now: float) -> None:
        for h in self.book.expire(now):
            self._dirty = True
            log.info("listener %s: worker pid=%d reached its drain deadline; its remaining "
                     "sessions are cut", h.listener, h.pid)
        self._progress(now)
        self._retable(now)
        self._steer(now)

    def deadline(self) -> float | None:
        times = [since + self.grace for st in self.listeners.values()
                 for slot, since in st.idle_since.items() if slot not in st.steered]
        if self.switch is not None:
            times.append(self.switch.until)
        held = self.book.next_deadline()
        if held is not None:
            times.append(held)
        return min(times, default=None)

    # -- queries (status, /healthz, /metrics)

    def not_serving(self) -> dict[tuple[int, str], supervision.NotServing]:
        """(slot, listener) -> why nobody reads it, for every listener the master holds."""
        sup = self.master.sup
        if sup is None:
            return {}
        now = self.master.clock()
        out = {}
        for lst in self.master.cfg.listeners:
            for slot, why in sup.serving(now, lst.name).items():
                if why is not None:
                    out[slot, lst.name] = why
        return out

    def steered(self) -> dict[tuple[int, str], supervision.NotServing]:
        """(slot, listener) -> why, for the slots whose flows go to other slots now."""
        return {(slot, name): why for name, st in self.listeners.items()
                for slot, why in st.steered.items()}

    # -- held sessions

    def _sessions(self) -> list[Listener]:
        return [st.config for st in self.listeners.values() if st.config.sessions]

    def _hold_for_drain(self, pid: int, slot: int, now: float) -> None:
        """A replaced worker (reload) or a retiring slot's worker drains its sessions."""
        gen = self.master.sockets.gen_of(slot)
        for lst in self._sessions():
            self.book.hold(pid, lst.name, (slot, gen), now + lst.drain_timeout, draining=True)
        if not self._retiring(slot):
            self._flips[pid] = slot
        if not self._sessions():  # nothing to hold: done at once
            self._finish(pid)

    def _progress(self, now: float) -> None:
        """Flip slots whose old worker has said what it keeps; stop those done draining;
        switch to a pending table once everyone it moves flows from has answered."""
        for pid, slot in list(self._flips.items()):
            if all(h.reported for (p, _), h in self.book.holders.items() if p == pid):
                # New flows of the slot go to the new worker's generation now.
                self.master.sockets.set_gen(slot, 1 - self.master.sockets.gen_of(slot))
                del self._flips[pid]
                self._dirty = True
        for pid in self.book.done():
            if pid not in self._flips:
                self._finish(pid)
        for (pid, name), h in list(self.book.holders.items()):
            if not h.draining and h.reported and not h.flows:
                del self.book.holders[pid, name]
                self.master.send(pid, wire.Watch(listener=name, seed=self.seed, buckets=[]))
        sw = self.switch
        if sw is not None and (now >= sw.until or all(
                h.reported for h in self.book.holders.values() if not h.draining)):
            self._install(sw.table)
            self.switch = None

    def _finish(self, pid: int, *, cut: bool = False) -> None:
        """Stop holding for ``pid`` (cutting what it holds if ``cut``) and let it stop."""
        if cut:
            for (p, _), h in list(self.book.holders.items()):
                if p == pid:
                    h.deadline = 0.0
            self.book.expire(float("inf"))
        self.book.release(pid)
        self._flips.pop(pid, None)
        self._dirty = True
        sup = self.master.sup
        if sup is not None:
            self.master.apply(sup.drained(pid, self.master.clock()))

    def _gone(self, pid: int) -> None:
        """Worker ``pid`` exited: whatever it still held is lost."""
        slot = self._flips.pop(pid, None)
        if slot is not None:
            self.master.sockets.set_gen(slot, 1 - self.master.sockets.gen_of(slot))
        self.book.lost(pid)
        self._dirty = True

    def _drainers_of(self, slot: int) -> list[int]:
        sup = self.master.sup
        if sup is None:
            return []
        return sorted({pid for (pid, _), h in self.book.holders.items()
                       if h.draining and pid in sup.workers
                       and sup.workers[pid].slot == slot})

    def _retiring(self, slot: int) -> bool:
        sup = self.master.sup
        s = sup.slots.get(slot) if sup is not None else None
        return s is None or s.retiring

    def _room(self, listener: str) -> int:
        st = self.listeners[listener]
        members = self.master.sockets.members(listener)
        if self.table is None or not members:
            return 0
        return self._plan(st, self.table, members).room_for_pins()

    # -- the table

    def _retable(self, now: float) -> None:
        """The table's slots: those in service. A new slot joins once its first
        worker is READY (until then its socket gets nothing); a retiring one leaves.

        With session keeping, the new table waits (at most ``REPORT_WAIT``) for
        the workers whose buckets move to say which of their flows must stay.
        """
        sup = self.master.sup
        if sup is None or self.table is None or self.switch is not None or sup.stopping:
            return
        keep = set()
        for i, s in sup.slots.items():
            if s.retiring or s.opening:
                continue
            ready = s.current is not None and sup.workers[s.current].state is \
                supervision.WorkerState.READY
            if i in self.table.slots or ready:
                keep.add(i)
        if not keep or keep == self.table.slots:
            return
        new = self.table.with_slots(keep)
        asked = self._watch_moving(new, keep, now)
        if asked:
            self.switch = _Switch(new, now + sessions.REPORT_WAIT)
        else:
            self._install(new)

    def _watch_moving(self, new: Table, keep: set[int], now: float) -> bool:
        """Ask the workers of staying slots that lose buckets which flows there are theirs."""
        assert self.table is not None
        sup = self.master.sup
        assert sup is not None
        asked = False
        for lst in self._sessions():
            moving: dict[int, list[int]] = {}
            for b, (old, nxt) in enumerate(zip(self.table.owners, new.owners, strict=True)):
                if old != nxt and old in keep:
                    moving.setdefault(old, []).append(b)
            for slot, buckets in moving.items():
                s = sup.slots.get(slot)
                if s is None or s.current is None:
                    continue
                member = (slot, self.master.sockets.gen_of(slot))
                self.book.hold(s.current, lst.name, member, now + lst.drain_timeout,
                               draining=False)
                self.master.send(s.current, wire.Watch(listener=lst.name, seed=self.seed,
                                                       buckets=buckets))
                asked = True
            # A retiring slot's drain holder answers for its flows too.
            asked = asked or any(not h.reported and h.listener == lst.name
                                 for h in self.book.holders.values())
        return asked

    def _install(self, new: Table) -> None:
        assert self.table is not None
        moved = self.table.moved(new)
        log.info("flow table: %d slots; %.1f%% of the table moves", len(new.slots), 100 * moved)
        self.table = new
        self._dirty = True

    # -- carrying it out

    def _steer(self, now: float) -> None:
        sup = self.master.sup
        if sup is None or self.table is None:
            return
        for name, st in self.listeners.items():
            idle = {slot: why for slot, why in sup.serving(now, name).items() if why is not None}
            for slot in list(st.idle_since):
                if slot not in idle:
                    del st.idle_since[slot]
            for slot in idle:
                st.idle_since.setdefault(slot, now)
            steered = {slot: idle[slot] for slot, since in st.idle_since.items()
                       if now - since >= self.grace and not sup.stopping}
            if steered != st.steered:
                self._say(name, st.steered, steered)
                st.steered = steered
                self._dirty = True
        if not self._dirty:
            return
        self._dirty = False
        for name, st in self.listeners.items():
            self._attach(name, st)

    def _plan(self, st: _Listener, table: Table, members: tuple[Hashable, ...]) -> Steering:
        sockets = self.master.sockets
        serving = set(table.slots) - set(st.steered)
        owners = steering.lend(table.owners, serving)
        keys = tuple((slot, sockets.gen_of(slot)) for slot in owners)
        pins = {steering.hash_flow(host, port, self.seed): member
                for (host, port), member in self.book.pins(st.config.name).items()}
        return Steering(keys, members, pins, st.config.address.family_name == "ipv6",
                        self.seed)

    def _attach(self, name: str, st: _Listener) -> None:
        assert self.table is not None
        sockets = self.master.sockets
        if st.config in sockets.shard_listeners():
            sockets.set_idle(name, frozenset(st.steered))
            return
        members = sockets.members(name)
        if not members or not self.programs:
            return
        self._cover(name, steering.lend(self.table.owners, set(self.table.slots) -
                                        set(st.steered)))
        program = self._plan(st, self.table, members).program()
        if program != st.program:
            try:
                sockets.steer(name, program)
            except OSError as exc:  # never expected; the kernel's hash still serves
                log.error("listener %s: cannot attach the steering program: %s", name, exc)
                return
            st.program = program

    def _cover(self, name: str, owners: list[int]) -> None:
        """Tell each slot's workers which buckets are lent to it, so they count them."""
        assert self.table is not None
        lent: dict[int, list[int]] = {}
        for b, (home, now) in enumerate(zip(self.table.owners, owners, strict=True)):
            if home != now:
                lent.setdefault(now, []).append(b)
        sup = self.master.sup
        assert sup is not None
        for slot in set(lent) | {s for (s, n) in self.covers if n == name}:
            buckets = tuple(lent.get(slot, ()))
            if self.covers.get((slot, name), ()) == buckets:
                continue
            self.covers[slot, name] = buckets
            s = sup.slots.get(slot)
            for pid in (s.current, s.incoming) if s is not None else ():
                if pid is not None:
                    self.master.send(pid, wire.Cover(listener=name, seed=self.seed,
                                                     buckets=list(buckets)))

    @staticmethod
    def _say(name: str, before: dict[int, supervision.NotServing],
             after: dict[int, supervision.NotServing]) -> None:
        for slot in sorted(set(after) - set(before)):
            log.warning("listener %s: slot %d is not read (%s); its flows go to other slots",
                        name, slot, after[slot].value)
        for slot in sorted(set(before) - set(after)):
            log.info("listener %s: slot %d is read again; its flows are back", name, slot)

