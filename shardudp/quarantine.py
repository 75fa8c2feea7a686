"""Poison sources: which senders' datagrams kill workers, and how long to refuse them. Pure.

A worker records, in memory it shares with the master, the source of the
datagram its handler is working on. When a worker dies in a handler, the
master reads that record and tells this module (``death``); the second
death attributed to one source (listener, address, port) within
``STRIKE_WINDOW`` puts that source in quarantine for the configured time:
every worker then drops its datagrams before the handler.

Rules:

1. Only deaths in a handler count: a worker killed by the master for a
   planned stop, or dying outside any handler, names no source.
2. Strikes and quarantines are bounded (``MAX_SUSPECTS``, ``MAX_QUARANTINED``):
   a flood of spoofed sources can evict suspects, never grow our memory.
   Past the quarantine cap, the oldest entry makes room, and ``death`` says
   which (``Verdict.evicted``): workers refuse it until told otherwise.
3. A quarantine expires; a source that kills again starts from no strikes.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Final

from .config import Address

#: Two deaths in this long make a source poison; older strikes are forgotten.
STRIKE_WINDOW: Final = 300.0
STRIKES: Final = 2
#: Sources with one strike remembered; the least recent is forgotten first.
MAX_SUSPECTS: Final = 1024
#: Sources in quarantine at once: each costs a set entry in every worker.
MAX_QUARANTINED: Final = 1024


@dataclasses.dataclass(frozen=True, order=True)
class Source:
    """A sender on one listener: the listener's name, the address and the port."""

    listener: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{Address(self.host, self.port)} on {self.listener}"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one death means: the source's strike count, and whether it is now quarantined.

    ``evicted``: sources released early to make room for this one (the cap).
    """

    source: Source
    strikes: int
    quarantined: bool
    until: float | None = None
    evicted: tuple[Source, ...] = ()


class Quarantine:
    """Strikes against sources and the sources in quarantine; fed by the master with ``now``."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self._suspects: OrderedDict[Source, list[float]] = OrderedDict()
        self._until: OrderedDict[Source, float] = OrderedDict()
        #: Sources quarantined so far (a counter for metrics).
        self.total = 0

    def death(self, source: Source, now: float) -> Verdict:
        """A worker died handling a datagram from ``source``."""
        if source in self._until:  # raced with its own quarantine: nothing new
            return Verdict(source, STRIKES, True, self._until[source])
        times = [t for t in self._suspects.pop(source, []) if now - t < STRIKE_WINDOW]
        times.append(now)
        if len(times) < STRIKES:
            self._suspects[source] = times
            while len(self._suspects) > MAX_SUSPECTS:
                self._suspects.popitem(last=False)
            return Verdict(source, len(times), False)
        until = now + self.duration
        self._until[source] = until
        evicted = []
        while len(self._until) > MAX_QUARANTINED:
            evicted.append(self._until.popitem(last=False)[0])
        self.total += 1
        return Verdict(source, len(times), True, until, tuple(evicted))

    def expire(self, now: float) -> list[Source]:
        """Release the sources whose time is up; return them."""
        gone = [s for s, until in self._until.items() if until <= now]
        for s in gone:
            del self._until[s]
        return gone

    def active(self) -> dict[Source, float]:
        """Every quarantined source and when it is released."""
        return dict(self._until)

    def next_deadline(self) -> float | None:
        return min(self._until.values(), default=None)
