"""Worker-side traffic counters: plain ints, bumped on the data path.

Pure: no I/O, no clock. The port calls these; the worker turns them into a
cumulative snapshot for the master every interval. Everything here is on the
per-datagram path, so it stays attribute increments and nothing more.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

# A small fixed label set: an unbounded exception-class label would let one
# buggy handler blow up the number of series.
ERROR_KINDS: Final = ("value", "lookup", "type", "os", "other")

# Upper bounds in seconds; the histogram's +Inf bucket is implicit.
DURATION_BUCKETS: Final = (
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
_BUCKETS_NS: Final = tuple(int(b * 1e9) for b in DURATION_BUCKETS)

# Timing every datagram costs two clock reads and a bisect, about 5% of a
# 2.5 us datagram; one in SAMPLE_EVERY keeps the distribution at a fraction
# of that. Must be a power of two: the port tests `n & (SAMPLE_EVERY - 1)`.
SAMPLE_EVERY: Final = 8


def error_kind(exc: BaseException) -> str:
    """Map a handler exception onto the fixed ``error`` label set."""
    if isinstance(exc, ValueError):  # includes UnicodeDecodeError
        return "value"
    if isinstance(exc, LookupError):
        return "lookup"
    if isinstance(exc, TypeError | AttributeError):
        return "type"
    if isinstance(exc, OSError):
        return "os"
    return "other"


class ListenerStats:
    """Cumulative counters of one listener in one worker."""

    __slots__ = (
        "duration_buckets",
        "duration_count",
        "duration_sum_ns",
        "errors",
        "evicted",
        "refused",
        "rx_bytes",
        "rx_datagrams",
        "steered",
        "truncated",
        "truncated_max",
        "tx_bytes",
        "tx_datagrams",
        "tx_errors",
    )

    def __init__(self) -> None:
        self.rx_datagrams = 0
        self.rx_bytes = 0
        self.tx_datagrams = 0
        self.tx_bytes = 0
        self.tx_errors = 0
        #: Datagrams of flows whose home slot was not read, served here instead.
        self.steered = 0
        #: Datagrams dropped before the handler: their source is in quarantine.
        self.refused = 0
        #: Datagrams longer than max_packet_size, cut to it; and the longest seen.
        self.truncated = 0
        self.truncated_max = 0
        #: Session keeping: senders dropped from the flow table to make room.
        self.evicted = 0
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        # One slot per finite bucket plus the +Inf bucket; not cumulative.
        self.duration_buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_count = 0
        self.duration_sum_ns = 0

    def count_truncated(self, size: int) -> None:
        """A datagram of ``size`` bytes (0 when unknown) was cut to max_packet_size."""
        self.truncated += 1
        if size > self.truncated_max:
            self.truncated_max = size

    def count_error(self, exc: BaseException) -> None:
        self.errors[error_kind(exc)] += 1

    def observe_ns(self, elapsed_ns: int) -> None:
        self.duration_buckets[bisect_left(_BUCKETS_NS, elapsed_ns)] += 1
        self.duration_count += 1
        self.duration_sum_ns += elapsed_ns

    def snapshot(self) -> dict[str, object]:
        """A msgpack-friendly copy of every counter."""
        return {
            "rx_datagrams": self.rx_datagrams,
            "rx_bytes": self.rx_bytes,
            "tx_datagrams": self.tx_datagrams,
            "tx_bytes": self.tx_bytes,
            "tx_errors": self.tx_errors,
            "steered": self.steered,
            "refused": self.refused,
            "truncated": self.truncated,
            "truncated_max": self.truncated_max,
            "evicted": self.evicted,
            "errors": dict(self.errors),
            "duration_buckets": list(self.duration_buckets),
            "duration_count": self.duration_count,
            "duration_sum_ns": self.duration_sum_ns,
        }
