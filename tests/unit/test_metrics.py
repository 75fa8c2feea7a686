"""MetricsBook: pure aggregation of worker reports (no I/O, fake time)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardudp.errors import BookkeepingError
from shardudp.metrics import (
    RESTART_REASONS,
    U32_WRAP,
    BookSnapshot,
    Counts,
    DropUnwrapper,
    MalformedReport,
    MetricsBook,
    parse_counts,
)
from shardudp.stats import DURATION_BUCKETS, ERROR_KINDS, ListenerStats
from shardudp.supervision import RestartReason

REPO = Path(__file__).resolve().parents[2]


def snap(
    rx: int = 0,
    rx_bytes: int = 0,
    tx: int = 0,
    tx_bytes: int = 0,
    tx_errors: int = 0,
    durations_ns: tuple[int, ...] = (),
    errors: tuple[BaseException, ...] = (),
) -> dict[str, object]:
    """A report body made by the real worker-side counters."""
    st = ListenerStats()
    st.rx_datagrams, st.rx_bytes = rx, rx_bytes
    st.tx_datagrams, st.tx_bytes, st.tx_errors = tx, tx_bytes, tx_errors
    for ns in durations_ns:
        st.observe_ns(ns)
    for exc in errors:
        st.count_error(exc)
    return st.snapshot()


def totals(book: MetricsBook) -> dict[tuple[int, str], Counts]:
    return {(s.slot, s.listener): s.counts for s in book.snapshot().listeners}


def flat(c: Counts) -> list[int]:
    scalars = [v for f, v in dataclasses.asdict(c).items() if isinstance(v, int)]
    return scalars + list(c.errors) + list(c.duration_buckets)


def test_round_trip_of_worker_snapshot() -> None:
    book = MetricsBook()
    body = snap(
        rx=7,
        rx_bytes=700,
        tx=6,
        tx_bytes=600,
        tx_errors=1,
        durations_ns=(5_000, 30_000, 2_000_000_000),
        errors=(KeyError("k"), ValueError()),
    )
    assert book.report(0, 1, 1, {"echo": body}, now=10.0) is True
    (series,) = book.snapshot().listeners
    assert (series.slot, series.listener) == (0, "echo")
    c = series.counts
    assert (c.rx_datagrams, c.rx_bytes, c.tx_datagrams, c.tx_bytes, c.tx_errors) == (
        7,
        700,
        6,
        600,
        1,
    )
    assert dict(series.errors) == {"value": 1, "lookup": 1, "type": 0, "os": 0, "other": 0}
    assert c.duration_count == 3
    assert series.duration_sum_seconds == pytest.approx(2.000035)
    assert list(c.duration_buckets) == body["duration_buckets"]
    assert book.snapshot().last_report_at == {0: 10.0}


def test_histogram_is_cumulative_and_ends_at_inf() -> None:
    book = MetricsBook()
    # One sample per bucket boundary region: at a bound counts in that bucket (le).
    samples = (1, 10_000, 10_001, 1_000_000, 999_000_000, 1_000_000_000, 5_000_000_000)
    book.report(0, 1, 1, {"l": snap(durations_ns=samples)}, now=0.0)
    (series,) = book.snapshot().listeners
    hist = series.histogram
    assert [le for le, _ in hist] == [*DURATION_BUCKETS, math.inf]
    expected = [sum(1 for ns in samples if ns <= le * 1e9) for le, _ in hist]
    assert [n for _, n in hist] == expected
    assert hist[0][1] == 2  # 1 ns and exactly 10 us
    assert hist[-1][1] == len(samples) == series.counts.duration_count
    counts = [n for _, n in hist]
    assert counts == sorted(counts)


def test_monotonic_across_kill9_and_replacement() -> None:
    book = MetricsBook()
    seen: list[list[int]] = []

    def check() -> None:
        now = flat(totals(book)[(2, "dns")])
        if seen:
            assert all(a <= b for a, b in zip(seen[-1], now, strict=True)), (seen[-1], now)
        seen.append(now)

    book.report(2, 5, 1, {"dns": snap(rx=10, tx=9, durations_ns=(100,))}, now=1.0)
    check()
    book.report(2, 5, 2, {"dns": snap(rx=20, tx=19, durations_ns=(100, 200))}, now=2.0)
    check()
    book.retire(2, 5)  # kill -9: whatever happened after seq 2 is lost
    check()
    book.report(2, 9, 1, {"dns": snap(rx=3, tx=1, errors=(OSError(),))}, now=3.0)
    check()
    c = totals(book)[(2, "dns")]
    assert (c.rx_datagrams, c.tx_datagrams, c.duration_count) == (23, 20, 2)
    assert c.errors[ERROR_KINDS.index("os")] == 1
    book.retire(2, 9)
    check()
    assert totals(book)[(2, "dns")].rx_datagrams == 23


def test_stale_and_duplicate_seq_are_ignored() -> None:
    book = MetricsBook()
    assert book.report(0, 1, 5, {"a": snap(rx=50)}, now=1.0)
    assert not book.report(0, 1, 5, {"a": snap(rx=60)}, now=2.0)  # duplicate
    assert not book.report(0, 1, 4, {"a": snap(rx=40)}, now=3.0)  # stale
    assert totals(book)[(0, "a")].rx_datagrams == 50
    assert book.snapshot().last_report_at[0] == 1.0


def test_late_report_of_retired_incarnation_is_not_counted_twice() -> None:
    book = MetricsBook()
    book.report(1, 3, 1, {"a": snap(rx=10)}, now=1.0)
    book.retire(1, 3)
    assert not book.report(1, 3, 2, {"a": snap(rx=15)}, now=2.0)
    assert totals(book)[(1, "a")].rx_datagrams == 10
    # Retiring an incarnation that never reported shuts its door as well.
    book.retire(1, 4)
    assert not book.report(1, 4, 1, {"a": snap(rx=99)}, now=3.0)
    assert totals(book)[(1, "a")].rx_datagrams == 10


def test_missing_listener_keeps_its_last_values() -> None:
    book = MetricsBook()
    book.report(0, 1, 1, {"a": snap(rx=5), "b": snap(rx=7)}, now=1.0)
    book.report(0, 1, 2, {"a": snap(rx=6)}, now=2.0)
    t = totals(book)
    assert (t[(0, "a")].rx_datagrams, t[(0, "b")].rx_datagrams) == (6, 7)
    book.retire(0, 1)
    assert totals(book)[(0, "b")].rx_datagrams == 7


def test_overlapping_incarnations_of_one_slot_add_up() -> None:
    # During a rolling reload the old and new worker of a slot both run.
    book = MetricsBook()
    book.report(0, 1, 1, {"a": snap(rx=100)}, now=1.0)
    book.report(0, 2, 1, {"a": snap(rx=4)}, now=1.5)
    book.report(1, 3, 1, {"a": snap(rx=8)}, now=1.2)
    t = totals(book)
    assert (t[(0, "a")].rx_datagrams, t[(1, "a")].rx_datagrams) == (104, 8)
    book.retire(0, 1)
    assert totals(book)[(0, "a")].rx_datagrams == 104
    assert book.snapshot().last_report_at == {0: 1.5, 1: 1.2}


def _bad(**changes: Any) -> dict[str, object]:
    body = snap(rx=1, durations_ns=(10,))
    for key, value in changes.items():
        if value is _DELETE:
            del body[key]
        else:
            body[key] = value
    return body


_DELETE = object()
_GOOD_BUCKETS = snap(durations_ns=(10,))["duration_buckets"]


@pytest.mark.parametrize(
    ("listeners", "field"),
    [
        ({"a": _bad(rx_datagrams=-1)}, "listeners['a'].rx_datagrams"),
        ({"a": _bad(rx_bytes=True)}, "listeners['a'].rx_bytes"),
        ({"a": _bad(tx_bytes=1.5)}, "listeners['a'].tx_bytes"),
        ({"a": _bad(tx_errors="3")}, "listeners['a'].tx_errors"),
        ({"a": _bad(tx_datagrams=_DELETE)}, "listeners['a'].tx_datagrams"),
        ({"a": _bad(errors={"value": -2})}, "listeners['a'].errors.value"),
        ({"a": _bad(errors={"weird": 1})}, "listeners['a'].errors"),
        ({"a": _bad(errors=[1, 2])}, "listeners['a'].errors"),
        ({"a": _bad(duration_buckets=[0, 1])}, "listeners['a'].duration_buckets"),
        ({"a": _bad(duration_count=5)}, "listeners['a'].duration_count"),
        (
            {"a": _bad(duration_buckets=[-1, *_GOOD_BUCKETS[1:]])},  # type: ignore[index]
            "listeners['a'].duration_buckets[0]",
        ),
        ({"a": [1, 2, 3]}, "listeners['a']"),
        ({7: snap()}, "listeners"),
        ({"": snap()}, "listeners"),
        ([("a", snap())], "listeners"),
    ],
)
def test_malformed_report_is_rejected_naming_the_field(listeners: object, field: str) -> None:
    book = MetricsBook()
    book.report(0, 1, 1, {"a": snap(rx=1)}, now=1.0)
    before = book.snapshot()
    with pytest.raises(MalformedReport) as info:
        book.report(0, 1, 2, listeners, now=2.0)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert field in str(info.value)
    assert book.snapshot() == before


def test_decreasing_counter_within_incarnation_is_rejected_atomically() -> None:
    book = MetricsBook()
    book.report(0, 1, 1, {"a": snap(rx=10), "b": snap(tx=4, durations_ns=(10, 10))}, now=1.0)
    before = book.snapshot()
    with pytest.raises(MalformedReport, match="went down from 2 to 1") as info:
        # "a" is fine and comes first, yet nothing of this report may land.
        book.report(0, 1, 2, {"a": snap(rx=11), "b": snap(tx=4, durations_ns=(10,))}, now=2.0)
    assert info.value.field == "listeners['b'].duration_count"
    assert book.snapshot() == before
    # The seq was not consumed: the next good report goes through.
    assert book.report(0, 1, 2, {"a": snap(rx=12)}, now=3.0)
    assert totals(book)[(0, "a")].rx_datagrams == 12


def test_bad_ids_and_slot_mismatch_are_rejected() -> None:
    book = MetricsBook()
    with pytest.raises(MalformedReport, match="seq"):
        book.report(0, 1, -1, {}, now=0.0)
    with pytest.raises(MalformedReport, match="slot"):
        book.report("0", 1, 1, {}, now=0.0)  # type: ignore[arg-type]
    book.report(0, 1, 1, {"a": snap(rx=1)}, now=0.0)
    with pytest.raises(MalformedReport, match="belongs to slot 0"):
        book.report(3, 1, 2, {"a": snap(rx=2)}, now=0.0)
    with pytest.raises(ValueError, match="belongs to slot 0"):
        book.retire(3, 1)
    assert totals(book)[(0, "a")].rx_datagrams == 1


def test_restarts_counted_per_slot_and_reason() -> None:
    book = MetricsBook()
    book.restart(0, RestartReason.SIGNAL)
    book.restart(0, RestartReason.SIGNAL)
    book.restart(1, RestartReason.TIMEOUT)
    assert dict(book.snapshot().restarts) == {(0, "signal"): 2, (1, "timeout"): 1}
    with pytest.raises(BookkeepingError, match="'oom' is not a RestartReason"):
        book.restart(0, "oom")  # type: ignore[arg-type]
    assert set(RESTART_REASONS) == {"exit", "signal", "timeout", "wire", "boot", "closed",
                                    "memory"}


def test_snapshot_is_frozen_and_detached_from_the_book() -> None:
    book = MetricsBook()
    book.report(0, 1, 1, {"a": snap(rx=1)}, now=1.0)
    book.restart(0, RestartReason.EXIT)
    s1 = book.snapshot()
    assert book.snapshot() is s1  # cached while nothing changed
    with pytest.raises(dataclasses.FrozenInstanceError):
        s1.listeners = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        s1.restarts[(0, "exit")] = 5  # type: ignore[index]
    book.report(0, 1, 2, {"a": snap(rx=2)}, now=2.0)
    book.restart(0, RestartReason.EXIT)
    assert s1.listeners[0].counts.rx_datagrams == 1
    assert s1.restarts[(0, "exit")] == 1
    assert book.snapshot().listeners[0].counts.rx_datagrams == 2
    assert BookSnapshot().listeners == ()


def test_random_lifecycles_match_a_simple_model() -> None:
    """Reports, lost reports, stale redeliveries and kill -9 in a seeded random order."""
    rng = random.Random(4)
    book = MetricsBook()
    live: dict[int, tuple[int, int, ListenerStats]] = {}  # slot -> (incarnation, seq, stats)
    # incarnation -> (seq, body) of the last report the book accepted
    reported: dict[int, tuple[int, dict[str, object]]] = {}
    retired_rx = dict.fromkeys(range(3), 0)
    next_inc = 1
    prev: dict[tuple[int, str], list[int]] = {}
    for _ in range(600):
        slot = rng.randrange(3)
        if slot not in live:
            live[slot] = (next_inc, 0, ListenerStats())
            next_inc += 1
        inc, seq, st = live[slot]
        roll = rng.random()
        if roll < 0.75:
            st.rx_datagrams += rng.randrange(5)
            st.observe_ns(rng.randrange(10**6))
            seq += 1
            live[slot] = (inc, seq, st)
            if rng.random() < 0.85:  # some reports never arrive
                assert book.report(slot, inc, seq, {"x": st.snapshot()}, now=float(seq))
                reported[inc] = (seq, st.snapshot())
        elif roll < 0.85 and inc in reported:
            # A redelivered or reordered report: same or older seq, bigger values.
            old_seq, _ = reported[inc]
            st.rx_datagrams += 1
            stale = old_seq - rng.randrange(min(old_seq, 2))
            assert not book.report(slot, inc, stale, {"x": st.snapshot()}, now=0.0)
        else:
            book.retire(slot, inc)
            last = reported.pop(inc, None)
            retired_rx[slot] += parse_counts(last[1]).rx_datagrams if last is not None else 0
            del live[slot]
        now = totals(book)
        for s in range(3):
            accepted = reported.get(live[s][0]) if s in live else None
            expected = retired_rx[s] + (parse_counts(accepted[1]).rx_datagrams if accepted else 0)
            assert now.get((s, "x"), Counts()).rx_datagrams == expected
        flat_now = {k: flat(v) for k, v in now.items()}
        for key, values in prev.items():
            assert all(a <= b for a, b in zip(values, flat_now[key], strict=True))
        prev = flat_now
    assert sum(retired_rx.values()) > 0


def test_parse_counts_ignores_unknown_extra_fields() -> None:
    body = snap(rx=3)
    body["future_field"] = {"anything": 1}
    assert parse_counts(body).rx_datagrams == 3


def test_drop_unwrapper_handles_u32_wrap_and_forgets() -> None:
    u = DropUnwrapper()
    assert u.update("s", U32_WRAP - 5) == U32_WRAP - 5
    assert u.update("s", 10) == U32_WRAP + 10
    assert u.update("s", 10) == U32_WRAP + 10
    assert u.update("t", 3) == 3
    u.keep_only(["t"])
    assert u.update("s", 7) == 7  # a new socket under an old key starts afresh


_PURITY_PROBE = """
import builtins, importlib, json, sys
import shardudp  # the package's own __init__ is not under test here
for name in [m for m in sys.modules if m in ("shardudp.metrics", "shardudp.stats")]:
    del sys.modules[name]
before = set(sys.modules)
seen = []
real_import = builtins.__import__
def spy(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__", "")
    if importer.startswith("shardudp") and level == 0:
        seen.append(name)
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = spy
importlib.import_module("shardudp.metrics")
builtins.__import__ = real_import
print(json.dumps({"direct": seen, "new": sorted(set(sys.modules) - before)}))
"""

_IMPURE = ("socket", "os", "time", "threading", "select", "selectors", "signal", "twisted")


def test_metrics_module_is_pure() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _PURITY_PROBE],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    found = json.loads(out.stdout)
    assert "shardudp.stats" in found["direct"] or "shardudp.stats" in found["new"]
    direct = {name.split(".")[0] for name in found["direct"]}
    new = {name.split(".")[0] for name in found["new"]}
    assert not direct & set(_IMPURE), found["direct"]
    assert not new & set(_IMPURE), found["new"]
