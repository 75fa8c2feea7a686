"""Drop accounting arithmetic (shardudp.drops), fed simulated kernel counters.

The simulation follows the kernel: every datagram reaching a shard listener
is seen by every joined member and by the tally; a member that refuses it
(its filter) counts a drop, a member that keeps it counts a drop only when
its buffer is full.
"""

from __future__ import annotations

import random

from shardudp.drops import SHARED, DropBook, Reading, shard_overflow

U32 = 1 << 32


class ShardSim:
    """Raw u32 sk_drops of a shard listener's members and tally."""

    def __init__(self, members: int, start: int = 0) -> None:
        self.drops = {f"m{i}": start for i in range(members)}
        self.tally = start
        self.accepting = {f"m{i}": True for i in range(members)}
        self.real = 0  # overflow drops, the truth

    def datagram(self, owner: str, overflow: bool = False, dup: str | None = None) -> None:
        self.tally = (self.tally + 1) % U32
        for key in self.drops:
            kept = self.accepting[key] and key in (owner, dup)
            if not kept or (key == owner and overflow):
                self.drops[key] = (self.drops[key] + 1) % U32
        self.real += overflow

    def join(self, key: str) -> None:
        """A new member: it refuses everything until it gets a share."""
        self.drops[key] = 0
        self.accepting[key] = False

    def readings(self, listener: str = "mc") -> list[Reading]:
        out = [Reading(k, listener, "0", "member", v) for k, v in self.drops.items()]
        return [*out, Reading("tally", listener, SHARED, "tally", self.tally)]


def test_overflow_formula() -> None:
    assert shard_overflow([], 100) == 0
    assert shard_overflow([200, 200, 200], 300) == 0  # 3 members, 300 datagrams, none lost
    assert shard_overflow([205, 200, 207], 300) == 12
    assert shard_overflow([50], 50) == 50  # one member: every drop is real


def test_shard_listener_reports_real_overflow_only() -> None:
    sim, book = ShardSim(3), DropBook()
    book.update(sim.readings())
    rng = random.Random(1)
    for i in range(3000):
        sim.datagram(f"m{i % 3}", overflow=rng.random() < 0.01)
    book.update(sim.readings())
    assert sim.real > 0
    assert book.totals()[(SHARED, "mc")] == sim.real
    # Members are never exported per slot: their raw counts are mostly refusals.
    assert set(book.totals()) == {(SHARED, "mc")}


def test_shard_counters_wrapping_past_u32() -> None:
    sim, book = ShardSim(3, start=U32 - 50), DropBook()
    book.update(sim.readings())
    for i in range(300):
        sim.datagram(f"m{i % 3}", overflow=i % 100 == 0)
    book.update(sim.readings())
    assert book.totals()[(SHARED, "mc")] == 3


def test_scale_up_and_down_keeps_shard_overflow_exact() -> None:
    """Samples taken as the SocketSet takes them: right after a member joins
    (still refusing everything) and right before one closes."""
    sim, book = ShardSim(2), DropBook()
    book.update(sim.readings())
    for i in range(100):
        sim.datagram(f"m{i % 2}", overflow=i == 7)
    sim.join("m2")
    for i in range(20):  # before the sample: the new member refuses all
        sim.datagram(f"m{i % 2}")
    book.update(sim.readings())
    sim.accepting["m2"] = True
    for i in range(300):
        sim.datagram(f"m{i % 3}", overflow=i in (5, 6))
    # Scale down: m0 refuses all (detached), the others share its sources.
    sim.accepting["m0"] = False
    for i in range(200):
        sim.datagram(f"m{1 + i % 2}", overflow=i == 9)
    book.update(sim.readings())  # the last sample before m0 closes
    book.forget(["m0"])
    del sim.drops["m0"], sim.accepting["m0"]
    for i in range(100):
        sim.datagram(f"m{1 + i % 2}", overflow=i == 50)
    book.update(sim.readings())
    assert sim.real == 5
    assert book.totals()[(SHARED, "mc")] == 5


def test_duplicates_while_filters_change_only_ever_undercount() -> None:
    sim, book = ShardSim(3), DropBook()
    book.update(sim.readings())
    for i in range(30):
        sim.datagram(f"m{i % 3}", overflow=i < 4, dup="m1" if i % 5 == 0 else None)
    book.update(sim.readings())
    assert 0 <= book.totals()[(SHARED, "mc")] <= sim.real


def test_exported_shard_total_never_decreases_when_reads_race() -> None:
    """Reads that catch a datagram counted by the members but not yet by the
    tally would make the total jump up and fall back; it is clamped instead."""
    sim, book = ShardSim(3), DropBook()
    book.update(sim.readings())
    seen = []
    for i in range(10):
        before = sim.readings()[-1]
        sim.datagram(f"m{i % 3}")
        # Members read after the datagram, the tally before it.
        book.update([*sim.readings()[:-1], before])
        seen.append(book.totals()[(SHARED, "mc")])
    book.update(sim.readings())
    seen.append(book.totals()[(SHARED, "mc")])
    assert seen == sorted(seen)
    assert seen[-1] <= 2


def test_unreadable_socket_leaves_the_shard_interval_open() -> None:
    sim, book = ShardSim(2), DropBook()
    book.update(sim.readings())
    for i in range(10):
        sim.datagram(f"m{i % 2}", overflow=i == 3)
    broken = sim.readings()
    broken[0] = Reading("m0", "mc", "0", "member", None)
    book.update(broken)
    assert book.totals()[(SHARED, "mc")] == 0
    book.update(sim.readings())
    assert book.totals()[(SHARED, "mc")] == 1


def test_slot_total_survives_its_socket_closing_and_a_new_one() -> None:
    book = DropBook()
    book.update([Reading("a", "echo", "1", "socket", 7)])
    book.update([Reading("a", "echo", "1", "socket", 9)])
    book.forget(["a"])  # scaled down
    assert book.totals()[("1", "echo")] == 9
    book.update([])
    book.update([Reading("b", "echo", "1", "socket", 0)])  # scaled back up
    book.update([Reading("b", "echo", "1", "socket", 4)])
    assert book.totals()[("1", "echo")] == 13


def test_socket_drops_unwrap_and_skip_unreadable() -> None:
    book = DropBook()
    book.update([Reading("s", "mc", SHARED, "socket", U32 - 10)])
    book.update([Reading("s", "mc", SHARED, "socket", None)])
    book.update([Reading("s", "mc", SHARED, "socket", 5)])
    assert book.totals() == {(SHARED, "mc"): U32 + 5}
