"""Held sessions: flows kept on the worker that has their state while the table moves on. Pure.

With session keeping on (``session_idle`` > 0), a flow that was active
within ``session_idle`` belongs to the worker that served it. When a reload
replaces that worker, or a scale gives the flow's bucket to another slot,
the flow is *pinned* to the socket its worker reads (``steering.Steering``
pins), until its worker reports it idle (it *drained*) or the holder's
deadline passes (it is *cut*, and goes where its bucket says).

Rules:

1. A pin names a flow (listener, host, port), the member socket that keeps
   it, and the holder: the worker process whose state it is.
2. Pins are bounded by what the listener's program can hold
   (``steering.Steering.room_for_pins``): past that, the least recently
   active of the newly reported flows are cut at once (reason ``capacity``).
3. Every pin of a holder ends by its ``deadline`` (``drain_timeout`` after it
   began holding): the rest are cut (reason ``deadline``). A holder that
   dies loses its pins (reason ``lost``).
4. A draining holder is done when it has reported at least once and holds
   nothing: the master may then stop it.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable, Iterable
from typing import Final

#: What a cut counts as, the ``reason`` label of ``shardudp_sessions_cut_total``.


class Cut(enum.Enum):
    """Why held sessions ended before they went idle."""

    DEADLINE = "deadline"
    CAPACITY = "capacity"
    LOST = "lost"


Flow = tuple[str, int]
#: How long, at most, a switch of the table waits for workers to say which
#: of their flows must stay (a worker that does not answer loses those).
REPORT_WAIT: Final = 1.0


@dataclasses.dataclass
class Holder:
    """A worker holding sessions of one listener: until when, and on which socket."""

    pid: int
    listener: str
    member: Hashable
    deadline: float
    #: A reload or scale-down: the worker stops once it holds nothing.
    draining: bool
    reported: bool = False
    flows: set[Flow] = dataclasses.field(default_factory=set)


@dataclasses.dataclass
class Tally:
    """Counts for /metrics, per listener: drained, cut by reason, moved by a scale."""

    drained: int = 0
    cut: dict[Cut, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(Cut, 0))
    moved: int = 0


class Book:
    """Every held session, by holder; fed by the master's steering service with ``now``."""

    def __init__(self) -> None:
        self.holders: dict[tuple[int, str], Holder] = {}
        self.tally: dict[str, Tally] = {}

    def hold(self, pid: int, listener: str, member: Hashable, deadline: float, *,
             draining: bool) -> Holder:
        """Start (or extend) ``pid``'s holding of ``listener``'s sessions on ``member``."""
        h = self.holders.get((pid, listener))
        if h is None:
            h = self.holders[pid, listener] = Holder(pid, listener, member, deadline, draining)
        else:
            h.member, h.draining = member, h.draining or draining
            h.deadline = min(h.deadline, deadline) if h.flows else deadline
        return h

    def report(self, pid: int, listener: str, active: Iterable[Flow], ended: Iterable[Flow],
               room: int, *, moved: bool = False, more: bool = False) -> list[Flow]:
        """A holder's report: flows it still serves (new ones added) and flows gone idle.

        Returns the flows cut for want of room (rule 2). ``moved`` counts the
        new flows as moved by a scale. ``more``: the rest of this report follows
        (the holder has not said all yet).
        """
        h = self.holders.get((pid, listener))
        if h is None:
            return []
        tally = self.tally.setdefault(listener, Tally())
        h.reported = h.reported or not more
        for flow in ended:
            if flow in h.flows:
                h.flows.discard(flow)
                tally.drained += 1
        fresh = [f for f in active if f not in h.flows]
        free = max(0, room - self.pinned(listener))
        keep, cut = fresh[:free], fresh[free:]
        h.flows.update(keep)
        if moved:
            tally.moved += len(keep)
        tally.cut[Cut.CAPACITY] += len(cut)
        return cut

    def expire(self, now: float) -> list[Holder]:
        """Cut what holders past their deadline still hold; return those holders."""
        late = [h for h in self.holders.values() if now >= h.deadline and (h.flows or
                                                                           not h.reported)]
        for h in late:
            self._cut(h, Cut.DEADLINE)
            h.reported = True
        return late

    def lost(self, pid: int) -> None:
        """Worker ``pid`` is gone: whatever it held is lost."""
        for key in [k for k in self.holders if k[0] == pid]:
            self._cut(self.holders.pop(key), Cut.LOST)

    def release(self, pid: int) -> None:
        """Forget ``pid`` (it stopped after draining)."""
        for key in [k for k in self.holders if k[0] == pid]:
            del self.holders[key]

    def done(self) -> list[int]:
        """Draining holders that have reported and hold nothing, on every listener."""
        by_pid: dict[int, bool] = {}
        for (pid, _), h in self.holders.items():
            ok = h.draining and h.reported and not h.flows
            by_pid[pid] = by_pid.get(pid, True) and ok
        return sorted(pid for pid, ok in by_pid.items() if ok)

    def pins(self, listener: str) -> dict[Flow, Hashable]:
        """Every held flow of ``listener`` and the member socket that keeps it."""
        return {flow: h.member for h in self.holders.values() if h.listener == listener
                for flow in h.flows}

    def pinned(self, listener: str) -> int:
        return sum(len(h.flows) for h in self.holders.values() if h.listener == listener)

    def next_deadline(self) -> float | None:
        return min((h.deadline for h in self.holders.values() if h.flows or not h.reported),
                   default=None)

    def _cut(self, h: Holder, why: Cut) -> None:
        self.tally.setdefault(h.listener, Tally()).cut[why] += len(h.flows)
        h.flows.clear()
