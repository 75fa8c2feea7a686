"""The poison-source service: sources whose datagrams kill workers are refused for a while.

A thin shell over ``shardudp.quarantine``: it hears of every unexpected
worker death with the source its handler was on (``Retired.culprit``, read
by the master from the worker's in-flight record), says so once, and tells
every worker (and every new one, before it reads anything) which sources of
each listener to drop before the handler.
"""

from __future__ import annotations

import logging

from . import supervision, wire
from .quarantine import MAX_QUARANTINED, Quarantine, Source
from .services import Service

log = logging.getLogger("shardudp.master")


class Poison(Service):
    """Owns the quarantine (``shardudp.quarantine.Quarantine``) and keeps workers told of it."""

    def __init__(self, duration: float) -> None:
        self.quarantine = Quarantine(duration)
        self.enabled = duration > 0

    def after_action(self, action: supervision.Action) -> None:
        if not isinstance(action, supervision.Retired) or action.culprit is None:
            return
        source = Source(*action.culprit)
        now = self.master.clock()
        if not self.enabled:
            log.warning("worker slot=%d died handling a datagram from %s (quarantine is off)",
                        action.slot, source)
            return
        verdict = self.quarantine.death(source, now)
        if not verdict.quarantined:
            log.warning("worker slot=%d died handling a datagram from %s: strike %d; a "
                        "second death puts it in quarantine", action.slot, source,
                        verdict.strikes)
            return
        log.error("quarantined %s for %g s: workers died handling its datagrams; its "
                  "datagrams are dropped before the handler until then", source,
                  self.quarantine.duration)
        for gone in verdict.evicted:
            log.warning("quarantine of %s is over early: at most %d sources are in quarantine "
                        "at once", gone, MAX_QUARANTINED)
        # An evicted source may be of another listener, whose workers would
        # otherwise keep refusing it: expire() will never name it.
        for name in sorted({source.listener, *(s.listener for s in verdict.evicted)}):
            self._tell(name)

    def after_turn(self, now: float) -> None:
        for source in self.quarantine.expire(now):
            log.info("quarantine of %s is over", source)
            self._tell(source.listener)

    def deadline(self) -> float | None:
        return self.quarantine.next_deadline()

    def for_new_worker(self, slot: int) -> list[wire.Message]:
        names = {s.listener for s in self.quarantine.active()}
        return [self._refusal(name) for name in sorted(names)]

    def counts(self) -> dict[str, int]:
        """Sources in quarantine now, per listener (for /metrics)."""
        out = {lst.name: 0 for lst in self.master.cfg.listeners}
        for s in self.quarantine.active():
            out[s.listener] = out.get(s.listener, 0) + 1
        return out

    def _refusal(self, listener: str) -> wire.Refuse:
        return wire.Refuse(listener=listener,
                           sources=[wire.flow_text(s.host, s.port)
                                    for s in sorted(self.quarantine.active())
                                    if s.listener == listener])

    def _tell(self, listener: str) -> None:
        msg = self._refusal(listener)
        for pid in list(self.master.children):
            self.master.send(pid, msg)
