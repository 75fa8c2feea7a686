"""Supervision decisions. Pure: events in (with ``now``), actions out.

The master feeds this what happened (a worker was spawned, said READY,
heartbeated, exited; a signal or control command arrived; time passed) and
carries out the actions it returns. No clock, no processes: the tests drive it
with plain numbers.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

from .errors import ExitCode

#: A worker that stayed READY this long has recovered: its slot's crash
#: count (and so its backoff) starts again from zero.
STABLE_AFTER: Final = 10.0
BACKOFF_BASE: Final = 0.5
#: A worker's pipe reaches EOF a moment before the worker can be reaped, so
#: an EOF is a fault only if the worker is still there this much later.
PIPE_EOF_GRACE: Final = 1.0
#: A rolling reload tries this many new workers for a slot (the replacement
#: killed, timed out or sent bad frames before READY) before giving up.
RELOAD_TRIES: Final = 3
#: File descriptors the master needs besides its slots' sockets and pipes:
#: standard streams, epoll, the signal wake-up pair, the control socket and
#: its clients (64 at most), the metrics server's connections, the log and
#: pid files, and what reading /proc and importing modules open for a moment.
FD_RESERVE: Final = 128


class WState(enum.Enum):
    BOOTING = "booting"
    READY = "ready"
    STOPPING = "stopping"


# -- actions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spawn:
    slot: int
    incarnation: int


@dataclasses.dataclass(frozen=True)
class SendStop:
    pid: int
    timeout: float
    drain: bool = False


@dataclasses.dataclass(frozen=True)
class Kill:
    pid: int
    signal: str  # "TERM" or "KILL"


@dataclasses.dataclass(frozen=True)
class OpenSlot:
    """Create the slot's sockets, then report ``slot_opened`` or ``slot_open_failed``."""

    slot: int


@dataclasses.dataclass(frozen=True)
class DetachSlot:
    """Take the slot's sockets out of their reuseport groups (before a drain)."""

    slot: int


@dataclasses.dataclass(frozen=True)
class CloseSlot:
    slot: int


@dataclasses.dataclass(frozen=True)
class Lead:
    """Make ``pid`` the one worker reading single-mode listeners."""

    pid: int


@dataclasses.dataclass(frozen=True)
class AllReady:
    """Every slot has a READY worker (edge-triggered)."""


@dataclasses.dataclass(frozen=True)
class Retired:
    """A worker process is gone; its last metrics fold into retired totals."""

    slot: int
    incarnation: int
    reason: str  # "" for an expected exit, else exit|signal|timeout|wire|boot


@dataclasses.dataclass(frozen=True)
class Log:
    level: str
    message: str


@dataclasses.dataclass(frozen=True)
class Exit:
    code: ExitCode
    reason: str


Action = (Spawn | SendStop | Kill | OpenSlot | DetachSlot | CloseSlot | Lead | AllReady | Retired
          | Log | Exit)


# -- state ---------------------------------------------------------------------


@dataclasses.dataclass
class Worker:
    pid: int
    slot: int
    incarnation: int
    started: float
    last_seen: float
    state: WState = WState.BOOTING
    ready_at: float | None = None
    #: Why we asked it to stop; None while it should be running.
    stop_reason: str | None = None
    kill_at: float | None = None
    boot_error: str | None = None
    #: When its pipe to us reached EOF while it should be running.
    pipe_closed_at: float | None = None


@dataclasses.dataclass
class Slot:
    index: int
    current: int | None = None  # pid serving the slot
    incoming: int | None = None  # pid replacing it during a rolling reload
    crashes: int = 0
    spawn_at: float | None = None  # a scheduled (re)spawn
    spawning: bool = False  # a Spawn was emitted, its pid not yet known
    retiring: bool = False
    opening: bool = False  # added by a scale-up; its sockets are not open yet
    #: New workers of the current reload that died before READY.
    reload_failures: int = 0


@dataclasses.dataclass(frozen=True)
class Policy:
    timeout: float
    graceful_timeout: float
    backoff_max: float

    @property
    def kill_grace(self) -> float:
        """TERM to KILL for a worker that is wedged, not merely slow to stop."""
        return min(self.graceful_timeout, 5.0)


def backoff_delay(crashes: int, cap: float) -> float:
    """Restart delay after the ``crashes``-th consecutive crash of a slot.

    The first restart is immediate (the socket queues meanwhile); then it
    doubles from BACKOFF_BASE up to ``cap``.
    """
    if crashes <= 1:
        return 0.0
    return float(min(cap, BACKOFF_BASE * 2 ** (crashes - 2)))


def fds_needed(workers: int, slot_sockets: int, shared_sockets: int) -> int:
    """About how many file descriptors the master of ``workers`` slots needs.

    Each slot has ``slot_sockets`` sockets and its worker's two pipe ends;
    while a worker is forked, or a reload runs a slot's old and new workers
    side by side, four more pipe ends are open. ``shared_sockets`` belong to
    no slot (single-mode sockets, shard tallies).
    """
    return workers * (slot_sockets + 2) + shared_sockets + 4 + FD_RESERVE


def describe_exit(code: int | None, signal: int | None) -> tuple[str, str]:
    """(reason label, human text) for a wait status."""
    if signal is not None:
        return "signal", f"killed by signal {signal}"
    if code == ExitCode.BOOT:
        return "boot", "failed to boot"
    return "exit", f"exited with code {code}"


class Supervisor:
    def __init__(self, workers: int, policy: Policy, now: float) -> None:
        self.policy = policy
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, Worker] = {}
        self._incarnation = 0
        self._ever_ready = False
        self._all_ready = False
        self._stopping: ExitCode | None = None
        self._stop_reason = ""
        self._reload: list[int] = []
        self._reloading = False
        self._leader: int | None = None
        self._exited = False
        self._start_actions: list[Action] = []
        for i in range(workers):
            self.slots[i] = Slot(i)
            self._start_actions += self._spawn(self.slots[i])

    # -- queries

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    def healthy(self) -> bool:
        return bool(self.slots) and all(
            s.current is not None and self.workers[s.current].state is WState.READY
            for s in self.slots.values()
        )

    @property
    def leader(self) -> int | None:
        return self._leader

    # -- events

    def start(self) -> list[Action]:
        out, self._start_actions = self._start_actions, []
        return out

    def spawned(self, slot: int, incarnation: int, pid: int, now: float) -> list[Action]:
        s = self.slots.get(slot)
        w = Worker(pid, slot, incarnation, started=now, last_seen=now)
        self.workers[pid] = w
        if s is None:  # slot removed while forking: nothing to serve
            return self._request_stop(w, "scale", now, drain=False)
        s.spawning = False
        if s.current is None:
            s.current = pid
        else:
            s.incoming = pid
        if self._stopping is not None:
            return self._request_stop(w, "shutdown", now, drain=False)
        return self._advance_reload(now)

    def spawn_failed(self, slot: int, reason: str, now: float) -> list[Action]:
        """A Spawn could not be carried out (no fds, no memory): a crash of that slot."""
        s = self.slots.get(slot)
        if s is None:
            return []
        s.spawning = False
        if self._stopping is not None:
            return self._maybe_exit()
        if s.retiring:
            return self._close_if_empty(s)
        if s.current is not None:  # the replacement of a rolling reload
            return self._abort_reload(f"cannot start a new worker for slot {slot}: {reason}")
        return self._restart_later(s, f"cannot start a worker for slot={slot}: {reason}", now,
                                   at_once=False)

    def slot_opened(self, slot: int) -> list[Action]:
        s = self.slots.get(slot)
        if s is None or s.retiring:  # removed while its sockets were being made
            return [CloseSlot(slot), *self._open_next()]
        s.opening = False
        out = [] if self._stopping is not None else self._spawn(s)
        return out + self._open_next()

    def slot_open_failed(self, slot: int, reason: str) -> list[Action]:
        """A scale-up could not create a new slot's sockets: it stops there.

        The failed slot and every later one of the scale-up are dropped (the
        next ones would fail alike); the operator can ask again later.
        """
        cancelled = [i for i, s in self.slots.items() if s.opening]
        for i in cancelled:
            del self.slots[i]
        self._reload = [i for i in self._reload if i in self.slots]
        return [Log("error", f"cannot open sockets for new slot {slot}: {reason}; "
                             f"scale-up stopped at {self.size} workers"),
                *self._check_all_ready()]

    def heartbeat(self, pid: int, now: float) -> list[Action]:
        w = self.workers.get(pid)
        if w is not None:
            w.last_seen = now
        return []

    def ready(self, pid: int, now: float) -> list[Action]:
        w = self.workers.get(pid)
        if w is None or w.state is not WState.BOOTING:
            return []
        w.state, w.ready_at, w.last_seen = WState.READY, now, now
        out: list[Action] = [Log("info", f"worker slot={w.slot} pid={pid} ready")]
        s = self.slots.get(w.slot)
        if s is not None:
            s.reload_failures = 0
        if s is not None and s.incoming == pid and s.current is not None:
            # Rolling reload: the new worker serves, so the old one may go.
            old = self.workers[s.current]
            s.current, s.incoming = pid, None
            out += self._request_stop(old, "reload", now, drain=False)
        if self._leader is None or self._leader not in self.workers:
            self._leader = pid
            out.append(Lead(pid))
        return out + self._check_all_ready()

    def boot_failed(self, pid: int, reason: str) -> list[Action]:
        w = self.workers.get(pid)
        if w is not None:
            w.boot_error = reason
        return []

    def pipe_closed(self, pid: int, now: float) -> list[Action]:
        """EOF on the worker's pipe: it can no longer heartbeat or report.

        Normally the worker is exiting and ``exited`` follows at once; one
        still there after PIPE_EOF_GRACE is replaced by ``tick``.
        """
        w = self.workers.get(pid)
        if w is not None and w.stop_reason is None and w.pipe_closed_at is None:
            w.pipe_closed_at = now
        return []

    def wire_fault(self, pid: int, reason: str, now: float) -> list[Action]:
        w = self.workers.get(pid)
        if w is None or w.stop_reason is not None:
            return []
        return self._replace(w, "wire", f"worker slot={w.slot} pid={pid}: bad frame: {reason}",
                             now)

    def exited(self, pid: int, code: int | None, signal: int | None, now: float) -> list[Action]:
        w = self.workers.pop(pid, None)
        if w is None:
            return []
        s = self.slots.get(w.slot)
        label, text = describe_exit(code, signal)
        expected = w.stop_reason in ("reload", "scale", "shutdown")
        reason = "" if expected else (w.stop_reason or label)
        out: list[Action] = [Retired(w.slot, w.incarnation, reason)]
        was_incoming = s is not None and s.incoming == pid
        if s is not None:
            if s.current == pid:
                s.current, s.incoming = s.incoming, None
            elif s.incoming == pid:
                s.incoming = None
        if self._leader == pid:
            self._leader = self._pick_leader()
            if self._leader is not None:
                out.append(Lead(self._leader))

        if self._stopping is not None:
            return out + self._maybe_exit()

        if w.boot_error is not None:
            text = f"failed to boot: {w.boot_error}"
        own_exit = signal is None and code != 0 and w.stop_reason is None
        if w.state is WState.BOOTING and not self._ever_ready and (
                w.boot_error is not None or own_exit):
            # Before the server ever served, a worker that failed to boot (it
            # said so, or exited by itself) means a bad APP or environment:
            # halt with a distinct code instead of looping. A death by signal
            # while booting is a crash like any other.
            cause = w.boot_error or (f"worker slot={w.slot} exited with status {code} while "
                                     "booting the APP")
            return out + self.shutdown(ExitCode.BOOT, cause, now)
        if s is None:
            return out
        if s.retiring:
            return out + self._close_if_empty(s)
        if expected:
            # The old worker of a reloaded slot: its replacement serves (or
            # crashed, and its respawn is already scheduled). Never a crash.
            return out + self._advance_reload(now)
        # Unexpected: a crash, kill -9, timeout or bad frames.
        msg = f"worker slot={w.slot} pid={pid} {text}"
        if w.stop_reason in ("timeout", "wire"):
            msg += f" after {w.stop_reason}"
        if was_incoming:  # the old worker still serves the slot
            boot = w.boot_error is not None or (code == ExitCode.BOOT and signal is None)
            return out + self._retry_replacement(s, msg, boot, now)
        if w.ready_at is not None and now - w.ready_at >= STABLE_AFTER:
            s.crashes = 0
        out += self._check_all_ready()
        if s.current is not None:  # mid-reload: the old worker died, its replacement boots
            out.append(Log("warning", f"{msg}; slot {s.index} keeps worker pid={s.current}"))
        else:
            out += self._restart_later(s, msg, now)
        return out + self._advance_reload(now)

    def tick(self, now: float) -> list[Action]:
        out = self._spawn_due(now)
        for w in list(self.workers.values()):
            if (w.pipe_closed_at is not None and w.stop_reason is None
                    and now >= w.pipe_closed_at + PIPE_EOF_GRACE):
                out += self._replace(w, "wire", f"worker slot={w.slot} pid={w.pid} closed its "
                                                "pipe to the master", now)
                out += self._check_all_ready()
            elif w.state is WState.STOPPING:
                if w.kill_at is not None and now >= w.kill_at:
                    w.kill_at = None
                    out += [Log("warning", f"worker slot={w.slot} pid={w.pid} did not stop in "
                                           "time; killing"), Kill(w.pid, "KILL")]
            elif now - w.last_seen > self.policy.timeout:
                out += self._replace(w, "timeout", f"worker slot={w.slot} pid={w.pid} missed its "
                                                   f"heartbeat for {now - w.last_seen:.1f}s", now)
                out += self._check_all_ready()
        return out

    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which ``tick`` has something to do."""
        times = [s.spawn_at for s in self.slots.values() if s.spawn_at is not None]
        for w in self.workers.values():
            if w.state is WState.STOPPING:
                if w.kill_at is not None:
                    times.append(w.kill_at)
            else:
                times.append(w.last_seen + self.policy.timeout)
                if w.pipe_closed_at is not None:
                    times.append(w.pipe_closed_at + PIPE_EOF_GRACE)
        return min(times) if times else None

    # -- commands (signals and the control socket)

    def shutdown(self, code: ExitCode, reason: str, now: float) -> list[Action]:
        if self._stopping is not None:
            return []
        self._stopping, self._stop_reason = code, reason
        self._reload = []
        # A failure's reason is said once, by whoever reports the Exit.
        out: list[Action] = [Log("info", f"stopping: {reason}") if code == ExitCode.OK else
                             Log("warning", f"stopping: {code.name.lower()} failure, "
                                                f"exit code {int(code)}")]
        # Nothing new arrives from here on, and what is queued gets answered.
        out += [DetachSlot(i) for i, s in sorted(self.slots.items())
                if not s.retiring and not s.opening]
        for w in list(self.workers.values()):
            out += self._request_stop(w, "shutdown", now, drain=True)
        return out + self._maybe_exit()

    def reload(self, now: float) -> list[Action]:
        if self._stopping is not None:
            return []
        if self._reloading:
            return [Log("warning", "reload already in progress; ignored")]
        for s in self.slots.values():
            if s.spawn_at is not None:
                # Down and waiting out its backoff: the new code deserves a
                # fresh start now, not after the old code's crash count.
                s.crashes, s.spawn_at = 0, now
        self._reload = sorted(i for i, s in self.slots.items()
                              if s.current is not None and not s.retiring)
        self._reloading = True
        return [Log("info", f"rolling reload of {self.size} slots"), *self._spawn_due(now),
                *self._advance_reload(now)]

    def scale(self, n: int, now: float) -> list[Action]:
        if self._stopping is not None:
            return []
        if n < 1:
            return [Log("warning", f"scale to {n} refused: at least one worker is needed")]
        live = sorted(i for i, s in self.slots.items() if not s.retiring)
        out: list[Action] = []
        if n > len(live):
            nxt = max(self.slots, default=-1) + 1
            out.append(Log("info", f"scaling up from {len(live)} to {n} workers"))
            busy = any(s.opening for s in self.slots.values())
            for i in range(nxt, nxt + n - len(live)):
                self.slots[i] = Slot(i, opening=True)
            if not busy:  # else the chain under way reaches the new ones
                out += self._open_next()
            self._all_ready = False
        elif n < len(live):
            out.append(Log("info", f"scaling down from {len(live)} to {n} workers"))
            for i in reversed(live[n:]):
                s = self.slots[i]
                s.retiring, s.spawn_at = True, None
                out.append(DetachSlot(i))
                pids = [p for p in (s.current, s.incoming) if p is not None]
                for pid in pids:
                    out += self._request_stop(self.workers[pid], "scale", now, drain=True)
                if not pids and not s.spawning:
                    del self.slots[i]
                    if not s.opening:
                        out.append(Log("warning", f"slot {i} had no worker to drain its queue"))
                    out.append(CloseSlot(i))
        self._reload = [i for i in self._reload if i in self.slots and not self.slots[i].retiring]
        return out + self._check_all_ready()

    @property
    def size(self) -> int:
        return sum(1 for s in self.slots.values() if not s.retiring)

    # -- internals

    def _spawn_due(self, now: float) -> list[Action]:
        out: list[Action] = []
        for s in list(self.slots.values()):
            if (s.spawn_at is not None and now >= s.spawn_at and self._stopping is None
                    and not s.retiring):
                s.spawn_at = None
                out += self._spawn(s)
        return out

    def _restart_later(self, s: Slot, what: str, now: float, *, at_once: bool = True
                       ) -> list[Action]:
        """Count a crash of ``s`` and schedule its respawn after the backoff.

        ``at_once=False`` skips the immediate first retry, even with a zero
        cap: what failed to fork (fds, memory) rarely frees up on the spot.
        """
        s.crashes += 1
        delay = backoff_delay(s.crashes if at_once else s.crashes + 1, self.policy.backoff_max)
        if not at_once:
            delay = max(delay, BACKOFF_BASE)
        out: list[Action] = [Log("warning" if delay == 0 else "error",
                                 f"{what}; restarting" + (f" in {delay:.1f}s" if delay else ""))]
        s.spawn_at = now + delay
        # A reload need not replace it again: the respawn loads the new code.
        self._reload = [i for i in self._reload if i != s.index]
        return out + self._spawn_due(now)

    def _retry_replacement(self, s: Slot, what: str, boot: bool, now: float) -> list[Action]:
        """A rolling reload's new worker for ``s`` died before READY.

        New code that fails to boot aborts the reload at once. Anything else
        (killed, timed out, bad frames) is retried after a backoff, up to
        RELOAD_TRIES new workers, so that "reload complete" means every slot
        runs the new code.
        """
        s.reload_failures += 1
        if boot:
            return self._abort_reload(f"new {what}")
        if s.reload_failures >= RELOAD_TRIES:
            return self._abort_reload(f"new {what}; {RELOAD_TRIES} new workers for slot "
                                      f"{s.index} died before READY")
        delay = backoff_delay(s.reload_failures + 1, self.policy.backoff_max)
        s.spawn_at = now + delay
        return [Log("warning", f"{what}; slot {s.index} keeps worker pid={s.current}; starting "
                               f"another new worker in {delay:.1f}s")]

    def _abort_reload(self, why: str) -> list[Action]:
        self._reload, self._reloading = [], False
        for s in self.slots.values():
            s.reload_failures = 0
        return [Log("error", f"reload aborted: {why}; old workers keep serving")]

    def _replace(self, w: Worker, why: str, text: str, now: float) -> list[Action]:
        """TERM a faulty worker (KILL after the grace); ``exited`` replaces it."""
        w.stop_reason, w.state, w.kill_at = why, WState.STOPPING, now + self.policy.kill_grace
        return [Log("error", f"{text}; replacing it"), Kill(w.pid, "TERM")]

    def _close_if_empty(self, s: Slot) -> list[Action]:
        if s.current is None and s.incoming is None and not s.spawning:
            del self.slots[s.index]
            return [CloseSlot(s.index)]
        return []

    def _open_next(self) -> list[Action]:
        pending = [i for i, s in self.slots.items() if s.opening]
        return [OpenSlot(min(pending))] if pending else []

    def _spawn(self, s: Slot) -> list[Action]:
        self._incarnation += 1
        s.spawning = True
        return [Spawn(s.index, self._incarnation)]

    def _request_stop(self, w: Worker, why: str, now: float, *, drain: bool) -> list[Action]:
        if w.state is WState.STOPPING and w.stop_reason in ("shutdown", "scale", "reload"):
            return []
        w.state, w.stop_reason = WState.STOPPING, why
        w.kill_at = now + self.policy.graceful_timeout
        return [SendStop(w.pid, self.policy.graceful_timeout, drain)]

    def _advance_reload(self, now: float) -> list[Action]:
        # One slot at a time: wait while a replacement boots (or is due to be
        # started again) or an old worker of a reloaded slot is still draining.
        if any(s.incoming is not None or s.spawning
               or (s.current is not None and s.spawn_at is not None)
               for s in self.slots.values()):
            return []
        if any(w.stop_reason == "reload" for w in self.workers.values()):
            return []
        while self._reload:
            i = self._reload.pop(0)
            s = self.slots.get(i)
            if s is None or s.retiring:
                continue
            if s.current is None:
                continue  # crashed slot: its respawn loads the new code anyway
            return self._spawn(s)
        if self._reloading:
            self._reloading = False
            return [Log("info", "reload complete")]
        return []

    def _pick_leader(self) -> int | None:
        ready = [w for w in self.workers.values()
                 if w.state is WState.READY and w.stop_reason is None]
        return min(ready, key=lambda w: w.started).pid if ready else None

    def _check_all_ready(self) -> list[Action]:
        healthy = self.healthy()
        if healthy and not self._all_ready:
            self._all_ready = self._ever_ready = True
            return [AllReady()]
        if not healthy:
            self._all_ready = False
        return []

    def _maybe_exit(self) -> list[Action]:
        if self._stopping is None or self.workers or self._exited:
            return []
        self._exited = True
        return [Exit(self._stopping, self._stop_reason)]
