"""Poison sources: two deaths in a window quarantine a source, for a while, within bounds."""

from __future__ import annotations

from shardudp.quarantine import (
    MAX_QUARANTINED,
    MAX_SUSPECTS,
    STRIKE_WINDOW,
    Quarantine,
    Source,
)

X = Source("echo", "127.0.0.1", 4000)


def test_the_second_death_quarantines_and_the_quarantine_expires() -> None:
    q = Quarantine(duration=60.0)
    first = q.death(X, 10.0)
    assert (first.strikes, first.quarantined) == (1, False)
    second = q.death(X, 11.0)
    assert (second.strikes, second.quarantined, second.until) == (2, True, 71.0)
    assert q.active() == {X: 71.0} and q.total == 1
    assert q.next_deadline() == 71.0
    assert q.expire(70.9) == [] and q.expire(71.0) == [X]
    assert q.active() == {} and q.next_deadline() is None
    # Released, it starts from no strikes.
    assert not q.death(X, 80.0).quarantined


def test_strikes_older_than_the_window_are_forgotten() -> None:
    q = Quarantine(duration=60.0)
    q.death(X, 0.0)
    assert not q.death(X, STRIKE_WINDOW + 1).quarantined
    assert q.death(X, STRIKE_WINDOW + 2).quarantined


def test_other_sources_and_listeners_are_separate() -> None:
    q = Quarantine(duration=60.0)
    q.death(X, 0.0)
    assert not q.death(Source("echo", "127.0.0.1", 4001), 1.0).quarantined
    assert not q.death(Source("dns", "127.0.0.1", 4000), 1.0).quarantined


def test_a_flood_of_sources_stays_bounded() -> None:
    q = Quarantine(duration=60.0)
    for i in range(3 * MAX_SUSPECTS):
        q.death(Source("echo", "10.0.0.1", i % 65536), float(i) / 1e6)
    assert len(q._suspects) == MAX_SUSPECTS
    for i in range(MAX_QUARANTINED + 10):
        s = Source("echo", "10.0.1.1", i)
        q.death(s, 1.0)
        q.death(s, 1.0)
    assert len(q.active()) == MAX_QUARANTINED
    assert Source("echo", "10.0.1.1", 0) not in q.active()  # the oldest made room
