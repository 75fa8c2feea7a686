"""The memory guard: a worker over ``max_worker_memory`` is replaced, its successor first.

Like uWSGI's reload-on-rss, for an APP that leaks: the master reads each
worker's resident memory once a second (``/proc``, as the exporter does) and
asks the supervisor to renew a slot whose worker is over the limit. The
successor boots beside it and takes over when READY; the old one stops (or
drains its sessions) then, so nothing queued or held is lost. Each such
replacement counts as ``shardudp_worker_restarts_total{reason="memory"}``.
"""

from __future__ import annotations

import logging
from typing import Final

from . import sockstats, supervision
from .services import Service

log = logging.getLogger("shardudp.master")

#: How often the workers' memory is read.
INTERVAL: Final = 1.0


class MemoryGuard(Service):
    """Owns the check of each current worker's resident memory against the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._next = 0.0

    def after_turn(self, now: float) -> None:
        sup = self.master.sup
        if now < self._next:
            return
        self._next = now + INTERVAL
        if sup is None or sup.stopping:
            return
        for slot, s in sorted(sup.slots.items()):
            if s.current is None or s.incoming is not None:
                continue
            st = sockstats.read_process(s.current)
            if st is None or st.resident_bytes <= self.limit:
                continue
            text = (f"worker slot={slot} pid={s.current} uses {st.resident_bytes >> 20} MiB, "
                    f"over max_worker_memory ({self.limit >> 20} MiB)")
            self.master.apply(sup.renew(slot, supervision.StopReason.MEMORY, text, now))

    def deadline(self) -> float | None:
        return self._next
