"""Master-side aggregation of worker traffic reports.

Pure: no sockets, no clock, no threads. The master's loop (one thread) feeds
reports in with the time as an argument and hands the exporter an immutable
snapshot; nothing here blocks or does I/O.

Accounting model
----------------
Each worker process has an *incarnation* (unique across the master's life) and
sends cumulative counters with an increasing ``seq``. Per (slot, listener) the
exported value is::

    retired totals of dead incarnations + latest values of live incarnations

so a counter only ever grows, across crashes, kill -9 and replacements. What a
worker counted after its last report reached the master is unknowable and is
lost; with the default 1 s interval that is at most about a second of traffic
per dead worker. A graceful exit sends a final report, so nothing is lost then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from types import MappingProxyType
from typing import Final

from shardudp.errors import BookkeepingError, WireError
from shardudp.stats import DURATION_BUCKETS, ERROR_KINDS
from shardudp.supervision import RestartReason

#: The ``reason`` label values of restart counters, in export order.
RESTART_REASONS: Final = tuple(r.value for r in RestartReason)

# Scalar counters of a listener snapshot, in wire order.
_SCALARS: Final = (
    "rx_datagrams",
    "rx_bytes",
    "tx_datagrams",
    "tx_bytes",
    "tx_errors",
    "steered",
    "refused",
    "truncated",
    "evicted",
    "duration_count",
    "duration_sum_ns",
)
_N_BUCKETS: Final = len(DURATION_BUCKETS) + 1

# The kernel's per-socket drop counter (sk_drops) is a u32 and wraps.
U32_WRAP: Final = 1 << 32


class MalformedReport(WireError, ValueError):
    """A worker report the master refuses to count; ``field`` names the culprit.

    A WireError because the worker sent it: the master's existing handling
    (treat the worker as faulty) applies.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"bad metrics report: {field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Counts:
    """Validated cumulative counters of one listener.

    ``errors`` is aligned with ``ERROR_KINDS``; ``duration_buckets`` is not
    cumulative and has one entry per ``DURATION_BUCKETS`` bound plus +Inf.
    """

    rx_datagrams: int = 0
    rx_bytes: int = 0
    tx_datagrams: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    steered: int = 0
    refused: int = 0
    truncated: int = 0
    evicted: int = 0
    duration_count: int = 0
    duration_sum_ns: int = 0
    errors: tuple[int, ...] = (0,) * len(ERROR_KINDS)
    duration_buckets: tuple[int, ...] = (0,) * _N_BUCKETS

    def __add__(self, other: Counts) -> Counts:
        return _counts(
            [getattr(self, f) + getattr(other, f) for f in _SCALARS],
            errors=tuple(a + b for a, b in zip(self.errors, other.errors, strict=True)),
            duration_buckets=tuple(
                a + b for a, b in zip(self.duration_buckets, other.duration_buckets, strict=True)
            ),
        )

    def first_decrease(self, before: Counts) -> tuple[str, int, int] | None:
        """The first counter that is lower here than in ``before``, if any."""
        for f in _SCALARS:
            old, new = getattr(before, f), getattr(self, f)
            if new < old:
                return f, old, new
        for kind, old, new in zip(ERROR_KINDS, before.errors, self.errors, strict=True):
            if new < old:
                return f"errors.{kind}", old, new
        for i, (old, new) in enumerate(
            zip(before.duration_buckets, self.duration_buckets, strict=True)
        ):
            if new < old:
                return f"duration_buckets[{i}]", old, new
        return None


ZERO: Final = Counts()


def _counts(
    scalars: Sequence[int], errors: tuple[int, ...], duration_buckets: tuple[int, ...]
) -> Counts:
    """Build Counts from scalar values in ``_SCALARS`` order."""
    (rx_datagrams, rx_bytes, tx_datagrams, tx_bytes, tx_errors, steered, refused, truncated,
     evicted, count, sum_ns) = scalars
    return Counts(
        rx_datagrams=rx_datagrams,
        rx_bytes=rx_bytes,
        tx_datagrams=tx_datagrams,
        tx_bytes=tx_bytes,
        tx_errors=tx_errors,
        steered=steered,
        refused=refused,
        truncated=truncated,
        evicted=evicted,
        duration_count=count,
        duration_sum_ns=sum_ns,
        errors=errors,
        duration_buckets=duration_buckets,
    )


def _count(value: object, field: str) -> int:
    # bool is an int subclass; a True where a count belongs is a bug upstream.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedReport(field, f"expected a non-negative integer, got {type(value).__name__}")
    if value < 0:
        raise MalformedReport(field, f"expected a non-negative integer, got {value}")
    return value


def parse_counts(raw: object, where: str = "listener") -> Counts:
    """Validate one ``ListenerStats.snapshot()`` dict from the wire.

    Unknown extra keys are ignored so a newer worker can add fields during a
    rolling upgrade; missing counters and unknown error kinds are rejected,
    because silently dropping them would under-count.
    """
    if not isinstance(raw, Mapping):
        raise MalformedReport(where, f"expected a mapping, got {type(raw).__name__}")
    for f in _SCALARS:
        if f not in raw:
            raise MalformedReport(f"{where}.{f}", "missing")
    scalars = [_count(raw[f], f"{where}.{f}") for f in _SCALARS]

    errors_raw = raw.get("errors")
    if not isinstance(errors_raw, Mapping):
        raise MalformedReport(f"{where}.errors", "expected a mapping of error kind to count")
    for kind in errors_raw:
        if kind not in ERROR_KINDS:
            raise MalformedReport(
                f"{where}.errors", f"unknown error kind {kind!r}; known: {', '.join(ERROR_KINDS)}"
            )
    errors = tuple(_count(errors_raw.get(k, 0), f"{where}.errors.{k}") for k in ERROR_KINDS)

    buckets_raw = raw.get("duration_buckets")
    if not isinstance(buckets_raw, list | tuple) or len(buckets_raw) != _N_BUCKETS:
        raise MalformedReport(
            f"{where}.duration_buckets", f"expected a list of {_N_BUCKETS} counts"
        )
    buckets = tuple(_count(v, f"{where}.duration_buckets[{i}]") for i, v in enumerate(buckets_raw))
    counts = _counts(scalars, errors=errors, duration_buckets=buckets)
    # The worker bumps both in one step on a single thread, so any mismatch
    # means a corrupted or hand-made report.
    if sum(buckets) != counts.duration_count:
        raise MalformedReport(
            f"{where}.duration_count",
            f"{counts.duration_count} does not match the bucket total {sum(buckets)}",
        )
    return counts


@dataclass(frozen=True, slots=True)
class ListenerSeries:
    """Exported totals of one (slot, listener), ready for Prometheus."""

    slot: int
    listener: str
    counts: Counts

    @property
    def errors(self) -> tuple[tuple[str, int], ...]:
        return tuple(zip(ERROR_KINDS, self.counts.errors, strict=True))

    @property
    def histogram(self) -> tuple[tuple[float, int], ...]:
        """Cumulative (upper bound in seconds, count) pairs, ending with +Inf."""
        bounds = (*DURATION_BUCKETS, math.inf)
        return tuple(zip(bounds, accumulate(self.counts.duration_buckets), strict=True))

    @property
    def duration_sum_seconds(self) -> float:
        return self.counts.duration_sum_ns / 1e9


@dataclass(frozen=True, slots=True)
class BookSnapshot:
    """An immutable copy of everything the exporter needs from the book."""

    listeners: tuple[ListenerSeries, ...] = ()
    restarts: Mapping[tuple[int, str], int] = field(default_factory=lambda: MappingProxyType({}))
    last_report_at: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(slots=True)
class _Live:
    slot: int
    seq: int
    listeners: dict[str, Counts]


class MetricsBook:
    """Aggregates worker reports; the master loop is its only user (one thread).

    Call ``retire`` for every worker process that ends (after draining its
    pipe, so its final report is in): until then its values count as live.
    ``now`` is whatever clock the exporter ages reports with (time.monotonic).
    """

    def __init__(self) -> None:
        self._live: dict[int, _Live] = {}
        # One int per dead worker process: the price of ignoring a late report
        # from an incarnation whose values were already folded into totals.
        self._dead: set[int] = set()
        self._retired: dict[tuple[int, str], Counts] = {}
        self._restarts: dict[tuple[int, str], int] = {}
        self._last_report_at: dict[int, float] = {}
        self._cache: BookSnapshot | None = None

    def report(self, slot: int, incarnation: int, seq: int, listeners: object, now: float) -> bool:
        """Record one cumulative report; False if stale, duplicate or from a retired worker.

        Raises MalformedReport (a ValueError) and changes nothing if any value
        is malformed or lower than this incarnation reported before.
        """
        _count(slot, "slot")
        _count(incarnation, "incarnation")
        _count(seq, "seq")
        if incarnation in self._dead:
            return False
        live = self._live.get(incarnation)
        if live is not None:
            if live.slot != slot:
                raise MalformedReport(
                    "slot", f"incarnation {incarnation} belongs to slot {live.slot}, not {slot}"
                )
            if seq <= live.seq:
                return False
        if not isinstance(listeners, Mapping):
            raise MalformedReport(
                "listeners", f"expected a mapping, got {type(listeners).__name__}"
            )

        parsed: dict[str, Counts] = {}
        for name, raw in listeners.items():
            if not isinstance(name, str) or not name:
                raise MalformedReport(
                    "listeners", f"listener name must be a non-empty string, got {name!r}"
                )
            where = f"listeners[{name!r}]"
            counts = parse_counts(raw, where)
            before = live.listeners.get(name) if live is not None else None
            if before is not None:
                drop = counts.first_decrease(before)
                if drop is not None:
                    field, old, new = drop
                    raise MalformedReport(
                        f"{where}.{field}",
                        f"went down from {old} to {new} within incarnation {incarnation}",
                    )
            parsed[name] = counts

        if live is None:
            live = self._live[incarnation] = _Live(slot, seq, {})
        live.seq = seq
        # A listener missing from this report keeps its previous values: dropping
        # them would make the exported totals go backwards.
        live.listeners.update(parsed)
        previous = self._last_report_at.get(slot)
        self._last_report_at[slot] = now if previous is None else max(previous, now)
        self._cache = None
        return True

    def retire(self, slot: int, incarnation: int) -> None:
        """Fold a dead incarnation's last values into the slot's retired totals."""
        live = self._live.get(incarnation)
        if live is not None and live.slot != slot:
            raise MalformedReport(
                "slot", f"incarnation {incarnation} belongs to slot {live.slot}, not {slot}"
            )
        self._dead.add(incarnation)
        if live is None:
            return
        del self._live[incarnation]
        for name, counts in live.listeners.items():
            key = (slot, name)
            self._retired[key] = self._retired.get(key, ZERO) + counts
        self._cache = None

    def restart(self, slot: int, reason: RestartReason) -> None:
        """Count one worker restart of ``slot``.

        The reason comes from our own supervisor, never from a worker: a value
        that is not a ``RestartReason`` is our bug (``BookkeepingError``).
        """
        if not isinstance(reason, RestartReason):
            raise BookkeepingError(f"restart of slot {slot}: {reason!r} is not a RestartReason")
        _count(slot, "slot")
        key = (slot, reason.value)
        self._restarts[key] = self._restarts.get(key, 0) + 1
        self._cache = None

    def snapshot(self) -> BookSnapshot:
        """Immutable totals; cached until the next change, so calling it often is cheap."""
        if self._cache is None:
            totals = dict(self._retired)
            for live in self._live.values():
                for name, counts in live.listeners.items():
                    key = (live.slot, name)
                    totals[key] = totals.get(key, ZERO) + counts
            self._cache = BookSnapshot(
                listeners=tuple(
                    ListenerSeries(slot, name, counts)
                    for (slot, name), counts in sorted(totals.items())
                ),
                restarts=MappingProxyType(dict(self._restarts)),
                last_report_at=MappingProxyType(dict(self._last_report_at)),
            )
        return self._cache


class DropUnwrapper:
    """Turns wrapping u32 kernel drop counters into monotonic totals.

    Keyed by whatever identifies one kernel socket (``drops.DropBook`` uses
    one key per socket it holds, so a replaced socket starts afresh rather
    than looking like a wrap). More than 2**32 drops between two reads cannot be told apart
    from fewer; at one scrape every 15 s that needs ~286 M drops per second.
    Not thread-safe: the caller serialises.
    """

    def __init__(self) -> None:
        self._seen: dict[object, tuple[int, int]] = {}  # key -> (last raw, total)

    def update(self, key: object, raw: int) -> int:
        last = self._seen.get(key)
        total = raw if last is None else last[1] + (raw - last[0]) % U32_WRAP
        self._seen[key] = (raw, total)
        return total

    def keep_only(self, keys: Iterable[object]) -> None:
        """Forget sockets no longer exported, so the table stays bounded."""
        wanted = set(keys)
        for key in [k for k in self._seen if k not in wanted]:
            del self._seen[key]
