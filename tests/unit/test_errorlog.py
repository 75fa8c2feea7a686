"""shardudp.errorlog: handler exceptions through Twisted's log, send errors through stdlib."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from twisted.logger import Logger, LogLevel, STDLibLogObserver, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from shardudp.errorlog import BURST, ErrorLog, TwistedErrorLog


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _raised(exc: BaseException) -> BaseException:
    """``exc`` as a handler's except block would catch it: with a traceback."""

    def handler_frame() -> None:
        raise exc

    try:
        handler_frame()
    except BaseException as caught:
        return caught
    raise AssertionError("unreachable")


def _twisted_log(clock: Clock, **kwargs: Any) -> tuple[TwistedErrorLog, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer: Any = events.append
    log = TwistedErrorLog("datagramReceived of P on 127.0.0.1:9 raised", clock=clock,
                          log=Logger(namespace="test", observer=observer), **kwargs)
    return log, events


def _failures(events: list[dict[str, Any]]) -> list[Failure]:
    return [e["log_failure"] for e in events if "log_failure" in e]


def _summaries(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events if "log_failure" not in e]


def test_each_exception_of_a_burst_is_a_failure_event_with_its_traceback() -> None:
    log, events = _twisted_log(Clock())
    exc = _raised(ValueError("bad datagram"))
    log.report(exc)
    (event,) = events
    failure = event["log_failure"]
    assert failure.value is exc
    assert "handler_frame" in failure.getTraceback()
    assert event["log_level"] == LogLevel.error
    assert formatEvent(event) == (
        "datagramReceived of P on 127.0.0.1:9 raised: ValueError: bad datagram")


def test_beyond_the_burst_exceptions_are_counted_and_summarised_once_per_interval() -> None:
    clock = Clock()
    log, events = _twisted_log(clock)
    for i in range(BURST + 15):
        log.report(_raised(ValueError(f"n{i}")))
        clock.now += 0.01
    assert len(_failures(events)) == BURST
    assert _summaries(events) == []
    clock.now += 1.0
    log.report(_raised(KeyError("late")))
    (summary,) = _summaries(events)
    assert "15 more since the last report" in summary
    assert "latest ValueError: n24" in summary
    # The summary comes first, then the new interval's burst starts in full.
    assert "log_failure" not in events[BURST]
    assert events[BURST + 1]["log_failure"].type is KeyError
    assert len(_failures(events)) == BURST + 1


def test_a_new_interval_gets_a_full_burst_again() -> None:
    clock = Clock()
    log, events = _twisted_log(clock, burst=3, interval=2.0)
    for _ in range(5):
        log.report(ValueError("x"))
    clock.now += 1.9
    log.report(ValueError("still the first interval"))
    assert len(_failures(events)) == 3
    clock.now += 0.1
    for _ in range(3):
        log.report(ValueError("y"))
    assert len(_failures(events)) == 6
    (summary,) = _summaries(events)
    assert "3 more" in summary and "beyond 3 in 2s" in summary


def test_flush_writes_a_pending_summary_once() -> None:
    log, events = _twisted_log(Clock(), burst=1)
    log.flush()
    assert events == []
    log.report(ValueError("a"))
    log.report(ValueError("b"))
    log.flush()
    log.flush()
    assert len(_failures(events)) == 1
    (summary,) = _summaries(events)
    assert "1 more" in summary and "latest ValueError: b" in summary


def test_the_burst_must_be_positive() -> None:
    with pytest.raises(ValueError, match="burst"):
        TwistedErrorLog("x", burst=0)


def test_an_exception_that_cannot_be_printed_is_still_reported() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    log, events = _twisted_log(Clock())
    log.report(_raised(Unprintable()))
    (failure,) = _failures(events)
    assert failure.type is Unprintable


def test_in_a_worker_the_event_reaches_stdlib_logging_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # worker.run routes Twisted's log through STDLibLogObserver.
    caplog.set_level(logging.ERROR, logger="twisted-test")
    observer: Any = STDLibLogObserver(name="twisted-test")
    log = TwistedErrorLog("datagramReceived of P raised", clock=Clock(),
                          log=Logger(namespace="shardudp.port", observer=observer))
    log.report(_raised(ValueError("bad datagram")))
    (record,) = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "datagramReceived of P raised: ValueError: bad datagram"
    assert record.exc_info is not None and record.exc_info[1] is not None
    assert "handler_frame" in caplog.text


def test_error_log_logs_the_first_in_full_then_summaries(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="shardudp.port")
    clock = Clock()
    log = ErrorLog("send from P failed", interval=1.0, clock=clock)
    for i in range(50):
        log.report(OSError(f"n{i}"))
    assert len(caplog.records) == 1
    assert caplog.records[0].exc_info is not None
    clock.now += 1.5
    log.report(KeyError("late"))
    assert len(caplog.records) == 2
    summary = caplog.records[1].getMessage()
    assert "50 more" in summary and "KeyError" in summary
    assert caplog.records[1].exc_info is None
    log.report(ValueError("x"))
    log.flush()
    assert "1 more" in caplog.records[2].getMessage()
    log.flush()
    assert len(caplog.records) == 3


class TrialSeesHandlerErrorsTests(SynchronousTestCase):
    """Through the default (global) Twisted log, as stock's ``log.err()``: trial collects them."""

    def test_flushLoggedErrors_sees_each_exception_of_the_burst(self) -> None:
        clock = Clock()
        log = TwistedErrorLog("datagramReceived of P raised", clock=clock)
        for _ in range(BURST + 5):
            log.report(_raised(ValueError("bad")))
        clock.now += 2
        log.report(_raised(KeyError("next interval")))
        # The summary line carries no failure, so it is not an error to flush.
        flush: Any = self.flushLoggedErrors
        assert len(flush(ValueError)) == BURST
        assert len(flush(KeyError)) == 1
        assert flush() == []

