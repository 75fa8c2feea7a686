"""A port's gate: checks between the socket and the protocol, present only while needed.

The master may ask a worker to refuse some sources (quarantine) or to count
the datagrams it serves for slots that are not read (steering); a listener
that keeps sessions has its flows tracked (when each was last heard from).
A port then delivers through a ``Gate`` instead of straight to the
protocol; with nothing to check it goes straight again, so the common case
pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Final

from .stats import ListenerStats
from .steering import bucket_of, hash_flow

#: Senders remembered as lent or not while counting steered datagrams.
_LENT_CACHE: Final = 4096


class Gate:
    """Stands in front of one port's protocol (its ``datagramReceived``).

    Owned by the worker, which updates it from the master's ``Refuse`` and
    ``Cover`` messages and installs it with ``port.set_gate``.
    """

    __slots__ = ("_cap", "_deliver", "_lent", "_lent_cache", "_seed", "_stats", "flows",
                 "native", "now", "refused")

    def __init__(self, protocol: Any, stats: ListenerStats | None) -> None:
        self._deliver: Callable[[bytes, Any], object] = protocol.datagramReceived
        self._stats = stats if stats is not None else ListenerStats()
        #: (host, port) pairs whose datagrams are dropped before the handler.
        self.refused: frozenset[tuple[str, int]] = frozenset()
        self._lent: frozenset[int] | None = None
        self._seed = 0
        self._lent_cache: dict[Any, bool] = {}
        #: Session keeping: sender -> when it was last heard from (``now`` then).
        self.flows: dict[Any, float] | None = None
        self._cap = 0
        #: The port's engine notes senders itself (the batch data paths): the
        #: gate need not stand in the way for that.
        self.native = False
        #: A coarse clock the worker advances (one read of it per datagram).
        self.now = 0.0

    @property
    def active(self) -> bool:
        """Whether datagrams must go through the gate (else straight to the protocol)."""
        return (bool(self.refused) or self._lent is not None
                or (self.flows is not None and not self.native))

    @property
    def cap(self) -> int:
        return self._cap

    def track(self, cap: int) -> None:
        """Keep when each sender was last heard from, for at most ``cap`` senders."""
        self.flows = {}
        self._cap = cap

    def forget_idle(self, before: float) -> int:
        """Drop senders not heard from since ``before``; return how many went."""
        flows = self.flows
        if flows is None:
            return 0
        idle = [a for a, t in flows.items() if t < before]
        for a in idle:
            del flows[a]
        return len(idle)

    def refuse(self, sources: Iterable[tuple[str, int]]) -> None:
        self.refused = frozenset(sources)

    def cover(self, seed: int, buckets: Iterable[int]) -> None:
        """Count datagrams whose bucket is among ``buckets`` (lent to us); none: stop."""
        lent = frozenset(buckets)
        self._lent = lent or None
        self._seed = seed
        self._lent_cache.clear()

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if addr in self.refused:
            self._stats.refused += 1
            if self.flows is not None:
                # A batch engine noted it before we refused it: no session to keep.
                self.flows.pop(addr, None)
            return
        if self._lent is not None:
            lent = self._lent_cache.get(addr)
            if lent is None:
                lent = self._is_lent(addr)
            if lent:
                self._stats.steered += 1
        flows = self.flows
        if flows is not None and not self.native:
            flows[addr] = self.now
            if len(flows) > self._cap:
                self.evict()
        self._deliver(data, addr)

    def evict(self) -> None:
        """Make room: the least recently heard eighth of the senders goes (counted).

        A batch at a time, so the sort is paid once per cap/8 new senders. Also
        called by an engine that notes senders itself, once per batch: a batch
        may have added more than an eighth, so the excess goes too.
        """
        flows = self.flows
        assert flows is not None
        going = len(flows) - self._cap + max(1, self._cap // 8)
        oldest = sorted(flows.items(), key=lambda item: item[1])[:going]
        for addr, _ in oldest:
            del flows[addr]
        self._stats.evicted += len(oldest)

    def _is_lent(self, addr: Any) -> bool:
        assert self._lent is not None
        cache = self._lent_cache
        if len(cache) >= _LENT_CACHE:
            cache.clear()
        lent = cache[addr] = bucket_of(hash_flow(addr[0], addr[1], self._seed)) in self._lent
        return lent
