"""The supervisor as a pure state machine, driven by plain numbers."""

from __future__ import annotations

import pytest

from shardudp.errors import ExitCode
from shardudp.supervision import (
    AllReady,
    CloseSlot,
    DetachSlot,
    Exit,
    Kill,
    Lead,
    Policy,
    Retired,
    SendStop,
    Spawn,
    Supervisor,
    backoff_delay,
)

POLICY = Policy(timeout=10.0, graceful_timeout=5.0, backoff_max=8.0)


class Harness:
    """Plays the master: turns Spawn actions into pids."""

    def __init__(self, workers: int = 2) -> None:
        self.now = 0.0
        self.next_pid = 100
        self.sup = Supervisor(workers, POLICY, self.now)
        self.actions: list[object] = []
        self.feed(self.sup.start())

    def feed(self, actions: list[object]) -> list[object]:
        out = []
        for a in actions:
            out.append(a)
            if isinstance(a, Spawn):
                self.next_pid += 1
                out += self.feed(self.sup.spawned(a.slot, a.incarnation, self.next_pid, self.now))
        self.actions += out
        return out

    def pids(self) -> dict[int, int]:
        return {s.index: s.current for s in self.sup.slots.values() if s.current}

    def ready_all(self) -> list[object]:
        out = []
        for pid, w in list(self.sup.workers.items()):
            if w.state.value == "booting":
                out += self.feed(self.sup.ready(pid, self.now))
        return out

    def of(self, kind: type) -> list[object]:
        return [a for a in self.actions if isinstance(a, kind)]


def test_start_spawns_every_slot_and_all_ready_fires_once() -> None:
    h = Harness(3)
    assert [a.slot for a in h.of(Spawn)] == [0, 1, 2]
    assert len({a.incarnation for a in h.of(Spawn)}) == 3
    assert not h.sup.healthy()
    out = h.ready_all()
    assert sum(isinstance(a, AllReady) for a in out) == 1
    assert h.sup.healthy()
    assert h.feed(h.sup.heartbeat(101, 1.0)) == []


def test_crash_is_replaced_in_the_same_slot_immediately_then_with_backoff() -> None:
    h = Harness(2)
    h.ready_all()
    pid = h.pids()[1]
    out = h.feed(h.sup.exited(pid, None, 9, h.now))
    spawns = [a for a in out if isinstance(a, Spawn)]
    assert [s.slot for s in spawns] == [1]
    assert [a.reason for a in out if isinstance(a, Retired)] == ["signal"]
    assert not h.sup.healthy()
    # Second crash while booting: delayed by the backoff.
    pid2 = h.pids()[1]
    out = h.feed(h.sup.exited(pid2, 1, None, h.now))
    assert not any(isinstance(a, Spawn) for a in out)
    assert h.sup.next_deadline() == pytest.approx(h.now + backoff_delay(2, 8.0))
    h.now += backoff_delay(2, 8.0)
    out = h.feed(h.sup.tick(h.now))
    assert [a.slot for a in out if isinstance(a, Spawn)] == [1]


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(n, 8.0) for n in range(1, 8)] == [0, 0.5, 1, 2, 4, 8, 8]


def test_stable_worker_resets_the_crash_count() -> None:
    h = Harness(1)
    h.ready_all()
    for _ in range(3):
        pid = h.pids()[0]
        h.now += 100  # READY long enough to count as recovered
        out = h.feed(h.sup.exited(pid, 1, None, h.now))
        assert any(isinstance(a, Spawn) for a in out)
        h.ready_all()


def test_boot_failure_before_first_ready_halts_with_boot_code() -> None:
    h = Harness(2)
    pid = h.pids()[0]
    h.feed(h.sup.boot_failed(pid, "cannot import 'x'"))
    out = h.feed(h.sup.exited(pid, int(ExitCode.BOOT), None, h.now))
    assert not any(isinstance(a, Spawn) for a in out)
    stops = [a for a in out if isinstance(a, SendStop)]
    assert [s.pid for s in stops] == [h.pids()[1]]
    out = h.feed(h.sup.exited(h.pids()[1], 0, None, h.now))
    assert out[-1] == Exit(ExitCode.BOOT, "cannot import 'x'")


def test_boot_failure_after_service_started_is_a_crash_not_a_halt() -> None:
    h = Harness(1)
    h.ready_all()
    h.feed(h.sup.exited(h.pids()[0], 9, None, h.now))
    pid = h.pids()[0]
    out = h.feed(h.sup.exited(pid, int(ExitCode.BOOT), None, h.now))
    assert not any(isinstance(a, Exit) for a in out)
    assert h.sup.next_deadline() is not None


def test_missed_heartbeat_is_termed_then_killed_then_replaced() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.now = 11.0
    out = h.feed(h.sup.tick(h.now))
    assert Kill(pid, "TERM") in out
    h.now += POLICY.kill_grace
    out = h.feed(h.sup.tick(h.now))
    assert Kill(pid, "KILL") in out
    out = h.feed(h.sup.exited(pid, None, 9, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == ["timeout"]
    assert any(isinstance(a, Spawn) for a in out)


def test_heartbeats_keep_a_worker_alive() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    for t in range(1, 50):
        h.now = float(t)
        h.feed(h.sup.heartbeat(pid, h.now))
        assert not any(isinstance(a, Kill) for a in h.feed(h.sup.tick(h.now)))


def test_wire_fault_replaces_the_worker() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    out = h.feed(h.sup.wire_fault(pid, "garbage", h.now))
    assert Kill(pid, "TERM") in out
    out = h.feed(h.sup.exited(pid, None, 15, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == ["wire"]
    assert any(isinstance(a, Spawn) for a in out)


def test_rolling_reload_one_slot_at_a_time_waiting_for_ready() -> None:
    h = Harness(2)
    h.ready_all()
    old = h.pids()
    out = h.feed(h.sup.reload(h.now))
    assert [a.slot for a in out if isinstance(a, Spawn)] == [0]
    new0 = h.sup.slots[0].incoming
    out = h.feed(h.sup.ready(new0, h.now))
    assert SendStop(old[0], POLICY.graceful_timeout, False) in out
    assert h.sup.slots[0].current == new0
    out = h.feed(h.sup.exited(old[0], 0, None, h.now))
    assert [a.slot for a in out if isinstance(a, Spawn)] == [1]
    new1 = h.sup.slots[1].incoming
    h.feed(h.sup.ready(new1, h.now))
    out = h.feed(h.sup.exited(old[1], 0, None, h.now))
    assert any(getattr(a, "message", "") == "reload complete" for a in out)
    assert not any(isinstance(a, Spawn) for a in out)
    assert h.sup.healthy()


def test_reload_with_broken_new_code_aborts_and_keeps_old_workers() -> None:
    h = Harness(2)
    h.ready_all()
    old = h.pids()
    h.feed(h.sup.reload(h.now))
    new0 = h.sup.slots[0].incoming
    h.feed(h.sup.boot_failed(new0, "SyntaxError"))
    out = h.feed(h.sup.exited(new0, int(ExitCode.BOOT), None, h.now))
    assert any("reload aborted" in getattr(a, "message", "") for a in out)
    assert not any(isinstance(a, (Spawn, Exit)) for a in out)
    assert h.pids() == old


def test_scale_up_and_down_drains_the_removed_slot() -> None:
    h = Harness(2)
    h.ready_all()
    out = h.feed(h.sup.scale(3, h.now))
    assert [a.slot for a in out if isinstance(a, Spawn)] == [2]
    h.ready_all()
    assert h.sup.size == 3
    pid2 = h.pids()[2]
    out = h.feed(h.sup.scale(2, h.now))
    assert DetachSlot(2) in out
    assert SendStop(pid2, POLICY.graceful_timeout, True) in out
    out = h.feed(h.sup.exited(pid2, 0, None, h.now))
    assert CloseSlot(2) in out
    assert not any(isinstance(a, Spawn) for a in out)
    assert sorted(h.sup.slots) == [0, 1]
    assert h.sup.healthy()
    assert any("refused" in getattr(a, "message", "") for a in h.sup.scale(0, h.now))


def test_shutdown_stops_everyone_then_exits_ok_and_kills_laggards() -> None:
    h = Harness(2)
    h.ready_all()
    pids = h.pids()
    out = h.feed(h.sup.shutdown(ExitCode.OK, "SIGTERM received", h.now))
    assert {a.pid for a in out if isinstance(a, SendStop)} == set(pids.values())
    h.now += POLICY.graceful_timeout
    out = h.feed(h.sup.tick(h.now))
    assert {a.pid for a in out if isinstance(a, Kill)} == set(pids.values())
    h.feed(h.sup.exited(pids[0], 0, None, h.now))
    out = h.feed(h.sup.exited(pids[1], None, 9, h.now))
    assert out[-1] == Exit(ExitCode.OK, "SIGTERM received")
    assert not any(isinstance(a, Spawn) for a in h.actions[-5:])


def test_leader_moves_when_it_dies() -> None:
    h = Harness(3)
    out = h.ready_all()
    leads = [a.pid for a in out if isinstance(a, Lead)]
    assert len(leads) == 1
    out = h.feed(h.sup.exited(leads[0], None, 9, h.now))
    new = [a.pid for a in out if isinstance(a, Lead)]
    assert len(new) == 1 and new[0] != leads[0] and new[0] in h.sup.workers
