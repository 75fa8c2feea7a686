"""The steering service: keeps every listener's flows on slots that read them.

A thin shell over ``shardudp.steering`` (the pure table and program) and
the supervisor's ``serving`` answer. Once per loop turn, and right after any
change to the sockets, it decides per listener which slots count as reading
and has ``SocketSet`` (the only code that touches sockets) attach the result:

- unicast (reuseport group) listeners: a classic BPF program mapping flows to
  sockets through a consistent table (a scale moves about 1/(N+1) of the
  flows) and lending the buckets of a slot that has not been read for
  ``steer_grace`` to the slots that are read, until it is read again;
- ``shard`` multicast listeners: the filters' shares, the same way.

Datagrams already queued in a slot's sockets stay there for its next
worker: steering only changes where new ones go.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from . import steering, supervision, wire
from .services import Service
from .steering import Steering, Table

log = logging.getLogger("shardudp.master")


@dataclasses.dataclass
class _Listener:
    """What the steerer last decided for one listener."""

    #: slot -> since when it has not been read (None: it is read).
    idle_since: dict[int, float] = dataclasses.field(default_factory=dict)
    #: Slots whose flows go elsewhere now (idle past the grace), and why.
    steered: dict[int, supervision.NotServing] = dataclasses.field(default_factory=dict)
    #: The reasons of every slot not read right now (within the grace too).
    idle: dict[int, supervision.NotServing] = dataclasses.field(default_factory=dict)
    program: list[steering.Insn] | None = None


class Steerer(Service):
    """Owns the home table of flows to slots and each listener's steering decision.

    Registered after the services that report worker state, before the
    monitor, so that what /healthz and /metrics say about steering is what
    the kernel does.
    """

    def __init__(self, grace: float, seed: int | None = None, *, programs: bool = True) -> None:
        self.grace = grace
        #: False: unicast groups keep the kernel's hash (--no-steering); the
        #: shard multicast shares and the serving state are kept all the same.
        self.programs = programs
        self.seed = int.from_bytes(os.urandom(4), "big") if seed is None else seed
        self.table: Table | None = None
        self.listeners: dict[str, _Listener] = {}
        #: Flows moved by scaling, as a share of the table, per step (for metrics).
        self.moved_total = 0.0
        #: (slot, listener) -> the buckets lent to that slot, as its workers were told.
        self.covers: dict[tuple[int, str], tuple[int, ...]] = {}
        self._dirty = True

    # -- hooks

    def started(self) -> None:
        slots = self.master.sockets.slots()
        self.table = Table.initial(slots)
        names = [lst.name for lst in self.master.sockets.group_listeners()]
        names += [lst.name for lst in self.master.sockets.shard_listeners()]
        self.listeners = {name: _Listener() for name in names}
        self._steer(self.master.clock())

    def after_action(self, action: supervision.Action) -> None:
        match action:
            case supervision.OpenSlot() | supervision.DetachSlot() | supervision.CloseSlot():
                # A membership change: the indices the program returns moved.
                self._dirty = True
                self._retable()
                self._steer(self.master.clock())
            case supervision.Spawn() | supervision.Kill() | supervision.Retired():
                self._steer(self.master.clock())
            case _:
                pass

    def after_turn(self, now: float) -> None:
        self._retable()
        self._steer(now)

    def deadline(self) -> float | None:
        times = [since + self.grace for st in self.listeners.values()
                 for slot, since in st.idle_since.items() if slot not in st.steered]
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

    # -- internals

    def _retable(self) -> None:
        """The table's slots: those in service. A new slot joins once its first
        worker is READY (until then its socket gets nothing); a retiring one leaves."""
        sup = self.master.sup
        if sup is None or self.table is None:
            return
        keep = set()
        for i, s in sup.slots.items():
            if s.retiring or s.opening:
                continue
            ready = s.current is not None and sup.workers[s.current].state is \
                supervision.WorkerState.READY
            if i in self.table.slots or ready:
                keep.add(i)
        if keep and keep != self.table.slots and not sup.stopping:
            new = self.table.with_slots(keep)
            moved = self.table.moved(new)
            log.info("flow table: %d slots; %.1f%% of flows change slot", len(keep),
                     100 * moved)
            self.moved_total += moved
            self.table = new
            self._dirty = True

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
            st.idle = idle
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

    def _attach(self, name: str, st: _Listener) -> None:
        assert self.table is not None
        sockets = self.master.sockets
        lst = next(x for x in sockets.listeners if x.name == name)
        serving = set(self.table.slots) - set(st.steered)
        if lst in sockets.shard_listeners():
            sockets.set_idle(name, frozenset(st.steered))
            return
        members = sockets.members(name)
        if not members or not self.programs:
            return
        owners = steering.lend(self.table.owners, serving)
        self._cover(name, owners)
        plan = Steering(tuple(owners), members, {}, lst.address.family_name == "ipv6", self.seed)
        program = plan.program()
        if program != st.program:
            try:
                sockets.steer(name, program)
            except OSError as exc:  # never expected; the kernel's hash still serves
                log.error("listener %s: cannot attach the steering program: %s", name, exc)
                return
            st.program = program

    def for_new_worker(self, slot: int) -> list[wire.Message]:
        return [wire.Cover(listener=name, seed=self.seed, buckets=list(buckets))
                for (s, name), buckets in sorted(self.covers.items()) if s == slot and buckets]

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
