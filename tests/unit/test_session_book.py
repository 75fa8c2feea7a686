"""Held sessions: pinned while active, released when idle, cut at the deadline or the cap."""

from __future__ import annotations

from shardudp.sessions import Book, Cut

A, B, C = ("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)


def test_a_drain_holds_what_is_reported_until_it_goes_idle() -> None:
    book = Book()
    book.hold(100, "echo", (0, 0), deadline=60.0, draining=True)
    assert book.done() == []  # nothing reported yet: not done
    assert book.report(100, "echo", [A, B], [], room=10) == []
    assert book.pins("echo") == {A: (0, 0), B: (0, 0)} and book.pinned("echo") == 2
    book.report(100, "echo", [], [A], room=10)
    assert book.pins("echo") == {B: (0, 0)} and book.done() == []
    book.report(100, "echo", [], [B], room=10)
    assert book.done() == [100]
    assert book.tally["echo"].drained == 2 and book.tally["echo"].cut[Cut.DEADLINE] == 0


def test_what_is_still_held_at_the_deadline_is_cut() -> None:
    book = Book()
    book.hold(100, "echo", (0, 0), deadline=5.0, draining=True)
    book.report(100, "echo", [A, B], [], room=10)
    assert book.next_deadline() == 5.0
    assert book.expire(4.9) == []
    (late,) = book.expire(5.0)
    assert late.pid == 100 and book.pins("echo") == {} and book.done() == [100]
    assert book.tally["echo"].cut[Cut.DEADLINE] == 2


def test_past_the_program_room_new_flows_are_cut_at_once() -> None:
    book = Book()
    book.hold(100, "echo", (0, 0), deadline=60.0, draining=True)
    assert book.report(100, "echo", [A, B, C], [], room=2) == [C]
    assert book.pinned("echo") == 2 and book.tally["echo"].cut[Cut.CAPACITY] == 1


def test_a_holder_that_dies_loses_its_sessions_and_a_scale_counts_moved_flows() -> None:
    book = Book()
    book.hold(100, "echo", (0, 0), deadline=60.0, draining=False)
    book.report(100, "echo", [A, B], [], room=10, moved=True)
    assert book.tally["echo"].moved == 2 and book.done() == []  # not draining
    book.lost(100)
    assert book.pins("echo") == {} and book.tally["echo"].cut[Cut.LOST] == 2
    assert book.holders == {}


def test_a_worker_draining_several_listeners_is_done_when_all_are() -> None:
    book = Book()
    for name in ("a", "b"):
        book.hold(7, name, (1, 1), deadline=60.0, draining=True)
    book.report(7, "a", [], [], room=10)
    assert book.done() == []
    book.report(7, "b", [A], [], room=10)
    assert book.done() == []
    book.report(7, "b", [], [A], room=10)
    assert book.done() == [7]


def test_a_report_in_several_messages_counts_as_said_only_with_its_last() -> None:
    book = Book()
    book.hold(100, "echo", (0, 0), deadline=60.0, draining=True)
    book.report(100, "echo", [], [], room=10, more=True)
    # An empty first part is no "holds nothing": the rest may hold flows.
    assert book.done() == [] and not book.holders[100, "echo"].reported
    book.report(100, "echo", [A], [], room=10)
    assert book.holders[100, "echo"].reported and book.pins("echo") == {A: (0, 0)}
    # Once said, a later report's first part does not take that back.
    book.report(100, "echo", [B], [], room=10, more=True)
    assert book.holders[100, "echo"].reported and book.pinned("echo") == 2
