"""Poison sources: two deaths in a window quarantine a source, for a while, within bounds."""

from __future__ import annotations

import types
from typing import cast

from shardudp import supervision, wire
from shardudp.master import Master
from shardudp.poison import Poison
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


def fill(q: Quarantine, listener: str) -> list[Source]:
    sources = [Source(listener, "10.0.2.1", i) for i in range(MAX_QUARANTINED)]
    for s in sources:
        assert q.death(s, 1.0).evicted == ()
        assert q.death(s, 1.0).evicted == ()
    return sources


def test_a_source_evicted_to_make_room_is_reported() -> None:
    q = Quarantine(duration=60.0)
    first, *_ = fill(q, "echo")
    newcomer = Source("dns", "2001:db8::1", 53)
    q.death(newcomer, 2.0)
    verdict = q.death(newcomer, 2.0)
    assert (verdict.quarantined, verdict.evicted) == (True, (first,))
    assert first not in q.active() and newcomer in q.active()
    # Never reported again: expire() names only sources that were still in.
    assert first not in q.expire(1000.0)


def test_poison_retells_the_listener_of_an_evicted_source() -> None:
    """Workers of "echo" refused the evicted source: they must get a list without it."""
    sent: list[tuple[int, wire.Message]] = []
    fake = types.SimpleNamespace(
        clock=lambda: 2.0, children={7: None},
        send=lambda pid, msg: sent.append((pid, msg)),
        cfg=types.SimpleNamespace(listeners=[]))
    poison = Poison(duration=60.0)
    poison.attach(cast(Master, fake))
    first, *_ = fill(poison.quarantine, "echo")
    for _ in range(2):
        poison.after_action(supervision.Retired(0, 1, supervision.RestartReason.SIGNAL,
                                                ("dns", "10.0.3.1", 53)))
    told = {msg.listener: msg.sources for _, msg in sent if isinstance(msg, wire.Refuse)}
    assert set(told) == {"dns", "echo"}
    assert told["dns"] == ["10.0.3.1 53"]
    assert f"{first.host} {first.port}" not in told["echo"]
    assert len(told["echo"]) == MAX_QUARANTINED - 1
