"""Rate-limited error reports for the worker's ports.

A handler that fails on every datagram would otherwise write a traceback per
datagram: at 300k pps that is the disk, not the service, that dies. Two
reporters, both with ``report(exc)`` and ``flush()``:

* ``TwistedErrorLog``, for exceptions from the protocol (``datagramReceived``,
  ``connectionRefused``): each is a failure event in Twisted's log, as stock
  ``udp.Port.doRead``'s ``log.err()`` makes, so Twisted log observers, error
  trackers hooked on them and trial's ``flushLoggedErrors`` see it. Only
  beyond a burst of ``BURST`` in one ``interval`` are they counted instead,
  and summarised in one line per interval. In a worker, Twisted's log is
  routed to stdlib logging (``worker.run``), so these reach the master's log.
* ``ErrorLog``, for our own send errors, which stock Twisted raises rather
  than logs: stdlib logging, the first in full, then one summary per interval.

Summaries are written lazily, by the first report after the interval ends or
by ``flush()`` (the port calls it when it closes), so neither reporter needs
a timer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

__all__ = ["BURST", "ErrorLog", "TwistedErrorLog"]

#: Handler exceptions per interval reported in full, each with its traceback.
BURST: Final = 10

# Stock's log.err() events are critical; one datagram's handler failing is an
# error, and the level is all that differs: observers that look for failures
# (trial, error trackers) key on the failure, not the level.
_HANDLER_LEVEL: Final[Any] = LogLevel.error

logger = logging.getLogger("shardudp.port")
_twisted_log: Final[Any] = Logger(namespace="shardudp.port")
_Failure: Final[Any] = Failure


class ErrorLog:
    """Log the first failure with its traceback to stdlib logging, then one summary per interval."""

    __slots__ = ("_clock", "_interval", "_last_exc", "_next", "_seen", "_suppressed", "_what")

    def __init__(
        self, what: str, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._what = what
        self._interval = interval
        self._clock = clock
        self._seen = False
        self._suppressed = 0
        self._next = 0.0
        self._last_exc: BaseException | None = None

    def report(self, exc: BaseException) -> None:
        now = self._clock()
        if not self._seen:
            self._seen = True
            self._next = now + self._interval
            logger.error(
                "%s: %s: %s (further ones are summarised at most once every %gs)",
                self._what,
                type(exc).__name__,
                exc,
                self._interval,
                exc_info=exc,
            )
            return
        self._suppressed += 1
        self._last_exc = exc
        if now >= self._next:
            self._next = now + self._interval
            self.flush()

    def flush(self) -> None:
        """Write the summary of what was counted since the last line, if anything was."""
        if self._suppressed:
            exc = self._last_exc
            logger.error(
                "%s: %d more since the last report; latest %s: %s",
                self._what,
                self._suppressed,
                type(exc).__name__,
                exc,
            )
            self._suppressed = 0
            self._last_exc = None


class TwistedErrorLog:
    """Report each exception as a failure event in Twisted's log, beyond a burst only counted.

    Within each ``interval`` (from the first exception after the previous one
    ended) the first ``burst`` are logged in full; the rest are counted, and
    the next report after the interval, or ``flush()``, writes one summary
    line with their count and the latest one.
    """

    __slots__ = (
        "_burst", "_clock", "_in_window", "_interval", "_last_exc", "_log", "_suppressed",
        "_what", "_window_end",
    )

    def __init__(
        self,
        what: str,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        burst: int = BURST,
        log: Any = None,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        self._what = what
        self._interval = interval
        self._clock = clock
        self._burst = burst
        self._log: Any = _twisted_log if log is None else log
        self._window_end = -math.inf
        self._in_window = 0
        self._suppressed = 0
        self._last_exc: BaseException | None = None

    def report(self, exc: BaseException) -> None:
        now = self._clock()
        if now >= self._window_end:
            self.flush()
            self._window_end = now + self._interval
            self._in_window = 0
        if self._in_window < self._burst:
            self._in_window += 1
            # exc carries its traceback (__traceback__), which the Failure
            # keeps: the event is what stock's log.err() inside the except
            # block would have produced.
            self._log.failure(
                "{what}: {exc_type}: {exc}",
                _Failure(exc),
                level=_HANDLER_LEVEL,
                what=self._what,
                exc_type=type(exc).__name__,
                exc=exc,
            )
            return
        self._suppressed += 1
        self._last_exc = exc

    def flush(self) -> None:
        """Write the summary of what was counted since the last line, if anything was."""
        if not self._suppressed:
            return
        exc = self._last_exc
        count = self._suppressed
        self._suppressed = 0
        self._last_exc = None
        # No failure attached: a count is not an exception, and observers
        # collecting failures (flushLoggedErrors) must not see it as one.
        self._log.emit(
            _HANDLER_LEVEL,
            "{what}: {count} more since the last report (beyond {burst} in {per} they are "
            "only counted); latest {exc_type}: {exc}",
            what=self._what,
            count=count,
            burst=self._burst,
            per=f"{self._interval:g}s",
            exc_type=type(exc).__name__,
            exc=exc,
        )
