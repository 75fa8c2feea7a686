"""The supervisor as a pure state machine, driven by plain numbers."""

from __future__ import annotations

import pytest

from shardudp.errors import ExitCode
from shardudp.supervision import (
    PIPE_EOF_GRACE,
    RELOAD_TRIES,
    AllReady,
    CloseSlot,
    DetachSlot,
    Exit,
    Kill,
    Lead,
    NotServing,
    OpenSlot,
    Policy,
    RestartReason,
    Retired,
    Say,
    SendStop,
    Sig,
    Spawn,
    Supervisor,
    backoff_delay,
    fds_needed,
)

POLICY = Policy(timeout=10.0, graceful_timeout=5.0, backoff_max=8.0)


class Harness:
    """Plays the master: turns Spawn actions into pids, opens slots.

    ``fail_fork`` / ``fail_open`` make the next Spawn / OpenSlot fail.
    """

    def __init__(self, workers: int = 2) -> None:
        self.now = 0.0
        self.next_pid = 100
        self.fail_fork = 0
        self.fail_open = 0
        self.sup = Supervisor(workers, POLICY, self.now)
        self.actions: list[object] = []
        self.feed(self.sup.start())

    def feed(self, actions: list[object]) -> list[object]:
        out = self._carry_out(actions)
        self.actions += out
        return out

    def _carry_out(self, actions: list[object]) -> list[object]:
        out = []
        for a in actions:
            out.append(a)
            if isinstance(a, Spawn) and self.fail_fork:
                self.fail_fork -= 1
                out += self._carry_out(self.sup.spawn_failed(a.slot, "Too many open files",
                                                             self.now))
            elif isinstance(a, Spawn):
                self.next_pid += 1
                out += self._carry_out(self.sup.spawned(a.slot, a.incarnation, self.next_pid,
                                                        self.now))
            elif isinstance(a, OpenSlot) and self.fail_open:
                self.fail_open -= 1
                out += self._carry_out(self.sup.slot_open_failed(a.slot, "Too many open files"))
            elif isinstance(a, OpenSlot):
                out += self._carry_out(self.sup.slot_opened(a.slot))
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


def messages(out: list[object]) -> list[str]:
    return [a.message for a in out if isinstance(a, Say)]


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
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.SIGNAL]
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


def test_missed_heartbeat_is_killed_at_once_then_replaced() -> None:
    """A wedged worker already failed to answer: the TERM grace is for graceful stops."""
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.now = 11.0
    out = h.feed(h.sup.tick(h.now))
    assert Kill(pid, Sig.KILL) in out and Kill(pid, Sig.TERM) not in out
    h.now += POLICY.kill_grace
    assert not any(isinstance(a, Kill) for a in h.feed(h.sup.tick(h.now)))
    out = h.feed(h.sup.exited(pid, None, 9, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.TIMEOUT]
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
    assert Kill(pid, Sig.TERM) in out
    out = h.feed(h.sup.exited(pid, None, 15, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.WIRE]
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


def test_shutdown_stops_everyone_and_a_stop_that_killed_laggards_exits_forced() -> None:
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
    assert out[-1] == Exit(ExitCode.FORCED, "SIGTERM received; workers had to be killed")
    assert not any(isinstance(a, Spawn) for a in h.actions[-5:])


def test_a_graceful_stop_exits_ok_and_a_second_request_kills_and_exits_forced() -> None:
    h = Harness(2)
    h.ready_all()
    pids = h.pids()
    h.feed(h.sup.shutdown(ExitCode.OK, "SIGTERM received", h.now))
    for pid in pids.values():
        out = h.feed(h.sup.exited(pid, 0, None, h.now))
    assert out[-1] == Exit(ExitCode.OK, "SIGTERM received")
    h = Harness(2)
    h.ready_all()
    pids = h.pids()
    assert h.sup.force() == []  # not stopping: nothing to force
    h.feed(h.sup.shutdown(ExitCode.OK, "SIGINT received", h.now))
    out = h.feed(h.sup.force())
    assert {a.pid for a in out if isinstance(a, Kill) and a.sig is Sig.KILL} == set(pids.values())
    for pid in pids.values():
        out = h.feed(h.sup.exited(pid, None, 9, h.now))
    assert out[-1].code is ExitCode.FORCED


def test_leader_moves_when_it_dies() -> None:
    h = Harness(3)
    out = h.ready_all()
    leads = [a.pid for a in out if isinstance(a, Lead)]
    assert len(leads) == 1
    out = h.feed(h.sup.exited(leads[0], None, 9, h.now))
    new = [a.pid for a in out if isinstance(a, Lead)]
    assert len(new) == 1 and new[0] != leads[0] and new[0] in h.sup.workers


def test_kill_9_of_a_booting_worker_before_first_ready_is_a_crash_not_a_boot_failure() -> None:
    h = Harness(2)
    pid = h.pids()[0]
    out = h.feed(h.sup.exited(pid, None, 9, h.now))
    assert not any(isinstance(a, Exit) for a in out)
    assert not h.sup.stopping
    assert [a.slot for a in out if isinstance(a, Spawn)] == [0]
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.SIGNAL]
    # ...while exit status 3 (the worker's own verdict) still halts.
    out = h.feed(h.sup.exited(h.pids()[1], int(ExitCode.BOOT), None, h.now))
    assert h.sup.stopping
    assert not any(isinstance(a, Spawn) for a in out)


def test_failed_boot_after_service_says_why_in_the_restart_message() -> None:
    h = Harness(1)
    h.ready_all()
    h.feed(h.sup.exited(h.pids()[0], None, 9, h.now))
    for _ in range(3):
        pid = h.pids()[0]
        h.feed(h.sup.boot_failed(pid, "cannot import 'app': SyntaxError: invalid syntax"))
        out = h.feed(h.sup.exited(pid, int(ExitCode.BOOT), None, h.now))
        restart = [m for m in messages(out) if "restarting" in m]
        assert len(restart) == 1
        assert "failed to boot: cannot import 'app': SyntaxError" in restart[0]
        h.now = h.sup.next_deadline() or h.now
        h.feed(h.sup.tick(h.now))
    assert "restarting in 1.0s" in " ".join(messages(h.actions))


def _crash_until_backing_off(h: Harness, slot: int) -> None:
    for _ in range(5):
        pid = h.pids().get(slot)
        if pid is None:
            return
        h.feed(h.sup.exited(pid, 1, None, h.now))
    raise AssertionError("slot never went into backoff")


def test_reload_respawns_a_slot_waiting_out_its_backoff_at_once() -> None:
    h = Harness(2)
    h.ready_all()
    _crash_until_backing_off(h, 1)
    assert h.sup.slots[1].spawn_at is not None and h.sup.slots[1].spawn_at > h.now
    out = h.feed(h.sup.reload(h.now))
    # The down slot starts now, not after its backoff.
    assert [a.slot for a in out if isinstance(a, Spawn)][:1] == [1]
    assert h.sup.slots[1].spawn_at is None
    assert h.sup.slots[1].crashes == 0
    h.ready_all()
    # The serving slot is rolled as usual; the reload then completes.
    old0 = next(p for p, w in h.sup.workers.items() if w.slot == 0 and w.stop_reason)
    out = h.feed(h.sup.exited(old0, 0, None, h.now))
    assert "reload complete" in messages(out)
    assert h.sup.healthy()
    assert all(s.spawn_at is None for s in h.sup.slots.values())


def test_a_crash_during_reload_does_not_stall_it() -> None:
    h = Harness(2)
    h.ready_all()
    old = h.pids()
    h.feed(h.sup.reload(h.now))
    h.feed(h.sup.exited(old[1], None, 9, h.now))  # slot 1 dies before its turn
    new0 = h.sup.slots[0].incoming
    h.feed(h.sup.ready(new0, h.now))
    out = h.feed(h.sup.exited(old[0], 0, None, h.now))
    # Slot 1's respawn already runs the new code: it is not replaced again.
    assert not any(isinstance(a, Spawn) for a in out)
    assert "reload complete" in messages(out)
    h.ready_all()
    assert h.sup.healthy()


def test_spawn_failure_is_a_crash_of_the_slot_retried_after_a_backoff() -> None:
    h = Harness(1)
    h.ready_all()
    h.fail_fork = 2
    out = h.feed(h.sup.exited(h.pids()[0], None, 9, h.now))
    failed = [m for m in messages(out) if "cannot start a worker for slot=0" in m]
    assert len(failed) == 1 and "Too many open files" in failed[0]
    # Not retried on the spot: the retry waits at least BACKOFF_BASE.
    assert h.sup.next_deadline() is not None and h.sup.next_deadline() > h.now
    assert not h.sup.slots[0].spawning
    h.now = h.sup.next_deadline() or 0.0
    out = h.feed(h.sup.tick(h.now))
    assert len([m for m in messages(out) if "cannot start a worker" in m]) == 1
    delays = [float(m.rsplit(" in ", 1)[1].rstrip("s")) for m in messages(h.actions)
              if "cannot start a worker" in m]
    assert delays[1] > delays[0] > 0
    h.now = h.sup.next_deadline() or 0.0
    h.feed(h.sup.tick(h.now))
    h.ready_all()
    assert h.sup.healthy()


def test_spawn_failure_of_a_reload_replacement_aborts_the_reload() -> None:
    h = Harness(2)
    h.ready_all()
    old = h.pids()
    h.fail_fork = 1
    out = h.feed(h.sup.reload(h.now))
    assert any("reload aborted: cannot start a new worker for slot 0" in m for m in messages(out))
    assert h.pids() == old
    assert h.sup.next_deadline() == h.now + POLICY.timeout  # nothing scheduled but heartbeats
    assert h.feed(h.sup.reload(h.now))  # a later reload is accepted


def test_spawn_failure_while_stopping_still_exits() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.fail_fork = 1
    h.feed(h.sup.exited(pid, None, 9, h.now))
    h.feed(h.sup.shutdown(ExitCode.OK, "SIGTERM received", h.now))
    assert h.of(Exit) == [Exit(ExitCode.OK, "SIGTERM received")]


def test_scale_up_opens_each_slot_before_spawning_it() -> None:
    h = Harness(1)
    h.ready_all()
    out = h.feed(h.sup.scale(3, h.now))
    kinds = [(type(a).__name__, a.slot) for a in out if isinstance(a, (OpenSlot, Spawn))]
    assert kinds == [("OpenSlot", 1), ("Spawn", 1), ("OpenSlot", 2), ("Spawn", 2)]
    h.ready_all()
    assert h.sup.healthy() and h.sup.size == 3


def test_scale_up_whose_sockets_cannot_be_opened_stops_there_and_spawns_nothing() -> None:
    h = Harness(2)
    h.ready_all()
    h.fail_open = 1
    out = h.feed(h.sup.scale(4, h.now))
    assert not any(isinstance(a, Spawn) for a in out)
    assert [m for m in messages(out) if "cannot open sockets" in m] == [
        "cannot open sockets for new slot 2: Too many open files; scale-up stopped at 2 workers"]
    assert sorted(h.sup.slots) == [0, 1]
    assert h.sup.size == 2
    assert h.sup.healthy()
    assert any(isinstance(a, AllReady) for a in out)
    # Only the second slot fails: the first is kept and served.
    h.fail_open = 0
    h.feed(h.sup.scale(3, h.now))
    h.ready_all()
    assert sorted(h.sup.slots) == [0, 1, 2] and h.sup.healthy()


def test_pipe_eof_of_an_exiting_worker_is_not_a_fault() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.feed(h.sup.pipe_closed(pid, h.now))
    out = h.feed(h.sup.exited(pid, None, 9, h.now + 0.01))
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.SIGNAL]
    assert not any("pipe" in m for m in messages(out))


def test_pipe_eof_of_a_live_worker_gets_it_replaced() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.now = 1.0
    h.feed(h.sup.pipe_closed(pid, h.now))
    assert h.sup.next_deadline() == pytest.approx(h.now + PIPE_EOF_GRACE)
    h.now += PIPE_EOF_GRACE
    out = h.feed(h.sup.tick(h.now))
    assert Kill(pid, Sig.TERM) in out
    assert any("closed its pipe to the master; replacing it" in m for m in messages(out))
    assert not h.sup.healthy()
    out = h.feed(h.sup.exited(pid, None, 15, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.WIRE]
    assert [a.slot for a in out if isinstance(a, Spawn)] == [0]


def test_pipe_eof_of_a_stopping_worker_is_ignored() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.feed(h.sup.shutdown(ExitCode.OK, "SIGTERM received", h.now))
    h.feed(h.sup.pipe_closed(pid, h.now))
    out = h.feed(h.sup.tick(h.now + PIPE_EOF_GRACE))
    assert not any(isinstance(a, Kill) for a in out)


def test_shutdown_detaches_every_slot_and_asks_workers_to_drain() -> None:
    h = Harness(2)
    h.ready_all()
    pids = h.pids()
    out = h.feed(h.sup.shutdown(ExitCode.OK, "SIGTERM received", h.now))
    assert [a.slot for a in out if isinstance(a, DetachSlot)] == [0, 1]
    stops = [a for a in out if isinstance(a, SendStop)]
    assert {a.pid for a in stops} == set(pids.values())
    assert all(a.drain and a.timeout == POLICY.graceful_timeout for a in stops)
    first_stop = next(i for i, a in enumerate(out) if isinstance(a, SendStop))
    assert all(i < first_stop for i, a in enumerate(out) if isinstance(a, DetachSlot))


def test_a_failure_stop_does_not_repeat_its_reason_in_the_log() -> None:
    h = Harness(1)
    pid = h.pids()[0]
    h.feed(h.sup.boot_failed(pid, "cannot import 'x'"))
    out = h.feed(h.sup.exited(pid, int(ExitCode.BOOT), None, h.now))
    assert out[-1] == Exit(ExitCode.BOOT, "cannot import 'x'")
    assert not any("cannot import" in m for m in messages(h.actions))


def _kill_replacement(h: Harness, how: str) -> list[object]:
    """Make the booting new worker of a reload die the way ``how`` says."""
    (slot,) = [s.index for s in h.sup.slots.values() if s.incoming is not None]
    new = h.sup.slots[slot].incoming
    assert new is not None
    if how in ("timeout", "pipe-eof"):
        if how == "pipe-eof":
            h.feed(h.sup.pipe_closed(new, h.now))
        h.now += PIPE_EOF_GRACE if how == "pipe-eof" else POLICY.timeout + 1
        for pid in list(h.sup.workers):
            if pid != new:  # the old workers keep heartbeating
                h.feed(h.sup.heartbeat(pid, h.now))
        assert Kill(new, Sig.KILL if how == "timeout" else Sig.TERM) in h.feed(h.sup.tick(h.now))
    elif how == "wire":
        assert Kill(new, Sig.TERM) in h.feed(h.sup.wire_fault(new, "garbage", h.now))
    return h.feed(h.sup.exited(new, None, 9 if how == "signal" else 15, h.now))


def _run_due_spawns(h: Harness) -> list[object]:
    due = [s.spawn_at for s in h.sup.slots.values() if s.spawn_at is not None]
    assert due, "nothing scheduled"
    h.now = max(h.now, min(due))
    return h.feed(h.sup.tick(h.now))


@pytest.mark.parametrize("how", ["signal", "timeout", "wire", "pipe-eof"])
def test_reload_retries_a_replacement_that_dies_before_ready_so_complete_means_all_new(
        how: str) -> None:
    h = Harness(2)
    h.ready_all()
    old = h.pids()
    h.feed(h.sup.reload(h.now))
    out = _kill_replacement(h, how)
    assert any(f"slot 0 keeps worker pid={old[0]}; starting another new worker in" in m
               for m in messages(out))
    # Slot 1 is not touched while slot 0 still runs the old code.
    assert not any(isinstance(a, Spawn) for a in out)
    assert h.sup.slots[1].incoming is None
    out = _run_due_spawns(h)
    assert [a.slot for a in out if isinstance(a, Spawn)] == [0]
    for slot in (0, 1):
        new = h.sup.slots[slot].incoming
        assert new is not None
        h.feed(h.sup.ready(new, h.now))
        out = h.feed(h.sup.exited(old[slot], 0, None, h.now))
    assert "reload complete" in messages(out)
    assert not set(h.pids().values()) & set(old.values())
    assert h.sup.healthy()
    assert not any("reload complete" in m for m in messages(h.actions[:-len(out)]))


def test_reload_gives_up_after_repeated_replacement_deaths_and_old_workers_keep_serving() -> None:
    h = Harness(2)
    h.ready_all()
    old = h.pids()
    h.feed(h.sup.reload(h.now))
    for attempt in range(RELOAD_TRIES):
        out = _kill_replacement(h, "signal")
        if attempt < RELOAD_TRIES - 1:
            assert [a.slot for a in _run_due_spawns(h) if isinstance(a, Spawn)] == [0]
    assert [m for m in messages(out) if "reload aborted" in m] == [
        f"reload aborted: new worker slot=0 pid={h.next_pid} killed by signal 9; "
        f"{RELOAD_TRIES} new workers for slot 0 died before READY; old workers keep serving"]
    assert h.pids() == old and h.sup.healthy()
    assert all(s.spawn_at is None for s in h.sup.slots.values())
    assert not any("reload complete" in m for m in messages(h.actions))
    # The retries used backoff, and a later reload is accepted.
    delays = [m.rsplit(" in ", 1)[1] for m in messages(h.actions) if "another new worker" in m]
    assert delays == ["0.5s", "1.0s"]
    assert [a.slot for a in h.feed(h.sup.reload(h.now)) if isinstance(a, Spawn)] == [0]


def test_old_workers_expected_exit_during_reload_is_never_a_crash() -> None:
    h = Harness(1)
    h.ready_all()
    h.feed(h.sup.exited(h.pids()[0], None, 9, h.now))  # an earlier crash
    h.ready_all()
    old = h.pids()[0]
    h.now += 1
    h.feed(h.sup.reload(h.now))
    h.ready_all()
    new = h.pids()[0]
    h.now += 0.1
    # The new worker crashes while the old one drains: it waits out a backoff.
    out = h.feed(h.sup.exited(new, None, 9, h.now))
    assert any("restarting in" in m for m in messages(out))
    crashes, spawn_at = h.sup.slots[0].crashes, h.sup.slots[0].spawn_at
    h.now += 0.1
    out = h.feed(h.sup.exited(old, 0, None, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == [None]
    assert not any("exited with code 0" in m or "restarting" in m for m in messages(out))
    assert not any(isinstance(a, Spawn) for a in out)
    assert (h.sup.slots[0].crashes, h.sup.slots[0].spawn_at) == (crashes, spawn_at)


def test_a_worker_exiting_by_itself_while_booting_before_first_ready_is_a_boot_failure() -> None:
    h = Harness(2)
    pids = h.pids()
    out = h.feed(h.sup.exited(pids[0], 7, None, h.now))
    assert not any(isinstance(a, Spawn) for a in out)
    assert h.sup.stopping
    out = h.feed(h.sup.exited(pids[1], 0, None, h.now))
    assert out[-1] == Exit(ExitCode.BOOT,
                           "worker slot=0 exited with status 7 while booting the APP")


def test_a_worker_exiting_by_itself_after_the_server_served_is_a_crash() -> None:
    h = Harness(1)
    h.ready_all()
    h.feed(h.sup.exited(h.pids()[0], None, 9, h.now))
    out = h.feed(h.sup.exited(h.pids()[0], 7, None, h.now))  # still booting
    assert not h.sup.stopping
    assert any("exited with code 7; restarting in" in m for m in messages(out))


def test_fd_estimate_counts_each_slots_sockets_and_pipes_and_the_shared_sockets() -> None:
    one = fds_needed(10, slot_sockets=1, shared_sockets=0)
    # Per slot: its socket and its worker's two pipe ends in the master.
    assert fds_needed(11, slot_sockets=1, shared_sockets=0) - one == 3
    assert fds_needed(10, slot_sockets=2, shared_sockets=0) - one == 10
    assert fds_needed(10, slot_sockets=1, shared_sockets=3) - one == 3
    # The audit's case: 400 workers on one listener do not fit `ulimit -n 1024`.
    assert fds_needed(400, slot_sockets=1, shared_sockets=0) > 1024


# -- serving, steering and poison (no blackholes) -----------------------------


def test_serving_says_why_a_slot_is_not_read() -> None:
    h = Harness(3)
    assert set(h.sup.serving(h.now, "echo").values()) == {NotServing.BOOTING}
    h.ready_all()
    assert set(h.sup.serving(h.now, "echo").values()) == {None}
    pids = h.pids()
    # Slot 0 silent for longer than half the timeout: not responding.
    h.now = POLICY.silent_after + 1
    for slot in (1, 2):
        h.feed(h.sup.heartbeat(pids[slot], h.now))
    assert h.sup.serving(h.now, "echo") == {0: NotServing.UNRESPONSIVE, 1: None, 2: None}
    # Slot 1's APP closes its port of one listener: that listener only.
    out = h.feed(h.sup.left(pids[1], "echo", "stopListening", h.now))
    assert Kill(pids[1], Sig.TERM) in out
    assert h.sup.serving(h.now, "echo")[1] is NotServing.CLOSED
    assert h.sup.serving(h.now, "dns")[1] is NotServing.STOPPING
    out = h.feed(h.sup.exited(pids[1], 0, None, h.now))
    assert [a.reason for a in out if isinstance(a, Retired)] == [RestartReason.CLOSED]
    assert h.sup.serving(h.now, "echo")[1] is NotServing.BOOTING  # its replacement


def test_a_stalled_master_gives_its_workers_a_fresh_deadline() -> None:
    h = Harness(2)
    h.ready_all()
    h.now = 2 * POLICY.timeout  # the master was stopped all that time
    out = h.feed(h.sup.resumed(2 * POLICY.timeout, h.now))
    assert any("did not run" in m for m in messages(out))
    assert not any(isinstance(a, Kill) for a in h.feed(h.sup.tick(h.now)))
    h.now += POLICY.timeout + 1  # then silent for real
    assert any(isinstance(a, Kill) for a in h.feed(h.sup.tick(h.now)))


def test_a_scale_up_that_cannot_fork_stops_and_closes_the_slots_without_workers() -> None:
    h = Harness(2)
    h.ready_all()
    h.fail_fork = 1
    out = h.feed(h.sup.scale(5, h.now))
    assert any("scale-up stopped at" in m for m in messages(out))
    # The slot whose fork failed never had a worker: its sockets are closed, and
    # the slots after it are never opened.
    closed = [a.slot for a in out if isinstance(a, CloseSlot)]
    assert 2 in closed and 4 not in closed  # slot 3's open was already under way
    assert sorted(h.sup.slots) == [0, 1] and h.sup.size == 2


def test_deaths_blamed_on_a_source_restart_at_once_until_many_sources_do_it() -> None:
    h = Harness(1)
    h.ready_all()
    for i in range(6):  # one source, six times: never a backoff
        out = h.feed(h.sup.exited(h.pids()[0], 7, None, h.now,
                                  culprit=("echo", "10.0.0.1", 4000)))
        assert any(isinstance(a, Spawn) for a in out), i
        assert [a.culprit for a in out if isinstance(a, Retired)] == [
            ("echo", "10.0.0.1", 4000)]
        h.ready_all()
        h.now += 0.5
    backoff = []
    for port in range(1, 6):  # many sources: the handler dies on everything
        out = h.feed(h.sup.exited(h.pids()[0], 7, None, h.now,
                                  culprit=("echo", "10.0.0.1", port)))
        backoff += [m for m in messages(out) if "restarting in" in m]
        if any(s.spawn_at is not None for s in h.sup.slots.values()):
            _run_due_spawns(h)
        h.ready_all()
        h.now += 0.1
    assert backoff


def test_a_planned_stop_names_no_culprit() -> None:
    h = Harness(1)
    h.ready_all()
    pid = h.pids()[0]
    h.feed(h.sup.shutdown(ExitCode.OK, "test", h.now))
    out = h.feed(h.sup.exited(pid, 0, None, h.now, culprit=("echo", "10.0.0.1", 1)))
    assert [a.culprit for a in out if isinstance(a, Retired)] == [None]
