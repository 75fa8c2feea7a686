"""Supervision decisions. Pure: events in (with ``now``), actions out.

The master feeds this what happened (a worker was spawned, said READY,
heartbeated, exited; a signal or control command arrived; time passed) and
carries out the actions it returns. No clock, no processes: the tests drive it
with plain numbers.

Rules:

1. Everything that decides when a worker starts, stops or is replaced lives
   here; the master only carries out actions and reports events.
2. States and reasons are enums, never strings: ``WorkerState``,
   ``StopReason``, ``RestartReason``, ``Sig``.
3. An event the supervisor cannot act on (a pid it no longer knows, a state
   that cannot have it: a report that raced with an exit or a stop) is
   ignored: the call returns no action. What a worker does wrong is a fault of
   that worker (``wire_fault``), never an exception here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Final

from .config import Address
from .errors import ExitCode

#: A worker that stayed READY this long has recovered: its slot's crash
#: count (and so its backoff) starts again from zero.
STABLE_AFTER: Final = 10.0
BACKOFF_BASE: Final = 0.5
#: A worker's pipe reaches EOF a moment before the worker can be reaped, so
#: an EOF is a fault only if the worker is still there this much later.
PIPE_EOF_GRACE: Final = 1.0
#: A READY worker not heard from for this long (or half of --timeout if
#: shorter) does not count as reading its sockets: its flows are steered to
#: other slots and /healthz fails. Workers heartbeat at least once a second
#: (and four times per --timeout), so this is two missed heartbeats or more;
#: the supervisor kills it at --timeout.
SILENT_AFTER: Final = 3.0
#: Deaths attributed to a source (a worker died in its handler) restart the
#: slot at once, without backoff, while they come from at most this many
#: distinct sources within STABLE_AFTER: a poison datagram is its sender's
#: fault (and the sender ends up in quarantine), but a handler that dies on
#: every sender still backs off.
POISON_RESTARTS: Final = 3
#: A rolling reload tries this many new workers for a slot (the replacement
#: killed, timed out or sent bad frames before READY) before giving up.
RELOAD_TRIES: Final = 3
#: File descriptors the master needs besides its slots' sockets and pipes and
#: what its services declare (control clients, the HTTP endpoint): standard
#: streams, epoll, the signal wake-up pair, the log and pid files, and what
#: reading /proc and importing modules open for a moment.
FD_RESERVE: Final = 32


class WorkerState(enum.Enum):
    """Where one worker process is in its life, as the supervisor sees it."""

    BOOTING = "booting"
    READY = "ready"
    #: Handed its slot over (a reload, a scale-down) but keeps serving the
    #: sessions it holds until they go idle or its drain deadline.
    DRAINING = "draining"
    STOPPING = "stopping"


class StopReason(enum.Enum):
    """Why the supervisor asked a worker to stop (or killed it)."""

    #: Planned: a rolling reload replaced it (its successor is READY).
    RELOAD = "reload"
    #: Planned: its slot was scaled away.
    SCALE = "scale"
    #: Planned: the server is stopping.
    SHUTDOWN = "shutdown"
    #: A fault: it missed its heartbeat.
    TIMEOUT = "timeout"
    #: A fault: it sent a bad frame, or closed its pipe.
    WIRE = "wire"
    #: The APP closed one of the worker's listener ports (stopListening).
    CLOSED = "closed"
    #: Over the memory limit: replaced once its successor is READY (planned:
    #: nothing to respawn, but counted as a restart).
    MEMORY = "memory"

    @property
    def planned(self) -> bool:
        """True for a stop that is not the worker's fault (not a restart to count)."""
        return self in _PLANNED


_PLANNED: Final = frozenset({StopReason.RELOAD, StopReason.SCALE, StopReason.SHUTDOWN,
                             StopReason.MEMORY})


class RestartReason(enum.Enum):
    """Why a slot's worker had to be replaced: the ``reason`` label of restart counters."""

    EXIT = "exit"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    WIRE = "wire"
    BOOT = "boot"
    CLOSED = "closed"
    MEMORY = "memory"


class Sig(enum.Enum):
    """The two signals the supervisor sends: a request to stop, and no choice."""

    TERM = "TERM"
    KILL = "KILL"


class NotServing(enum.Enum):
    """Why a slot's sockets (of one listener) have no worker reading them."""

    DOWN = "no worker"
    BOOTING = "booting"
    STOPPING = "stopping"
    UNRESPONSIVE = "not responding"
    CLOSED = "closed by the APP"


# -- actions -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spawn:
    """Fork a worker for ``slot``, then report ``spawned`` or ``spawn_failed``.

    ``beside``: a worker of the slot still serves (a reload); with session
    keeping the new one reads the slot's other socket generation.
    """

    slot: int
    incarnation: int
    beside: bool = False


@dataclasses.dataclass(frozen=True)
class Drain:
    """Worker ``pid`` hands ``slot`` over: it keeps serving the sessions it holds (and
    reports them), stops reading every listener without session keeping, and is
    stopped once ``drained`` says it holds nothing more."""

    pid: int
    slot: int


@dataclasses.dataclass(frozen=True)
class SendStop:
    """Ask worker ``pid`` to stop within ``timeout`` (draining its queue first if ``drain``)."""

    pid: int
    timeout: float
    drain: bool = False


@dataclasses.dataclass(frozen=True)
class Kill:
    """Send ``sig`` to worker ``pid`` (if it was not reaped yet)."""

    pid: int
    sig: Sig


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
    """Close the slot's sockets: its worker drained them, or it never had one."""

    slot: int


@dataclasses.dataclass(frozen=True)
class Lead:
    """Make ``pid`` the one worker reading single-mode listeners."""

    pid: int


@dataclasses.dataclass(frozen=True)
class AllReady:
    """Every slot has a READY worker (edge-triggered)."""


@dataclasses.dataclass(frozen=True)
class Stopping:
    """The server began to stop, for ``code`` (edge-triggered)."""

    code: ExitCode


@dataclasses.dataclass(frozen=True)
class Retired:
    """A worker process is gone; its last metrics fold into retired totals.

    ``reason`` is None for a planned exit, else why the slot needs a new worker.
    """

    slot: int
    incarnation: int
    reason: RestartReason | None
    #: (listener, host, port) of the datagram its handler was on when it died
    #: unexpectedly, if the master could tell.
    culprit: tuple[str, str, int] | None = None
    pid: int = 0


@dataclasses.dataclass(frozen=True)
class Say:
    """Log ``message`` at ``level`` (a ``logging`` level name in lower case)."""

    level: str
    message: str


@dataclasses.dataclass(frozen=True)
class Exit:
    """Every worker is gone: the master exits with ``code``."""

    code: ExitCode
    reason: str


Action = (Spawn | Drain | SendStop | Kill | OpenSlot | DetachSlot | CloseSlot | Lead | AllReady
          | Stopping | Retired | Say | Exit)


# -- state ---------------------------------------------------------------------


@dataclasses.dataclass
class WorkerRecord:
    """What the supervisor knows of one worker process (not the process itself:
    that is ``shardudp.worker.Worker``)."""

    pid: int
    slot: int
    incarnation: int
    started: float
    last_seen: float
    state: WorkerState = WorkerState.BOOTING
    ready_at: float | None = None
    #: Why we asked it to stop; None while it should be running.
    stop_reason: StopReason | None = None
    kill_at: float | None = None
    boot_error: str | None = None
    #: When its pipe to us reached EOF while it should be running.
    pipe_closed_at: float | None = None
    #: Listeners whose port the APP closed, and the call that closed it.
    left: dict[str, str] = dataclasses.field(default_factory=dict)
    #: While DRAINING: when it is stopped whatever it still holds.
    drain_until: float | None = None


@dataclasses.dataclass
class Slot:
    """One worker slot: its current worker, a reload's incoming one, and its crash history."""

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
    #: Added by a scale-up and no worker was ever forked for it.
    fresh: bool = False
    #: Why its current worker is being replaced by the incoming one, when that
    #: is not a reload (over the memory limit).
    renew: StopReason | None = None
    #: Recent deaths blamed on a poison source: (when, which source).
    poison_deaths: list[tuple[float, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Policy:
    """The supervisor's timing settings (from the server's configuration)."""

    timeout: float
    graceful_timeout: float
    backoff_max: float
    #: Some listener keeps sessions: a replaced worker drains before it stops.
    sessions: bool = False
    #: The longest drain_timeout of those listeners.
    drain_timeout: float = 0.0

    @property
    def silent_after(self) -> float:
        """How long a READY worker may be silent and still count as reading its sockets."""
        return min(self.timeout / 2, SILENT_AFTER)

    @property
    def kill_grace(self) -> float:
        """TERM to KILL for a worker that is wedged, not merely slow to stop."""
        return min(self.graceful_timeout, 5.0)


#: What a fault stop counts as when the worker then exits.
_RESTART_FOR_STOP: Final[dict[StopReason | None, RestartReason]] = {
    StopReason.TIMEOUT: RestartReason.TIMEOUT,
    StopReason.WIRE: RestartReason.WIRE,
    StopReason.CLOSED: RestartReason.CLOSED,
    StopReason.MEMORY: RestartReason.MEMORY,
}


def backoff_delay(crashes: int, cap: float) -> float:
    """Restart delay after the ``crashes``-th consecutive crash of a slot.

    The first restart is immediate (the socket queues meanwhile); then it
    doubles from BACKOFF_BASE up to ``cap``.
    """
    if crashes <= 1:
        return 0.0
    return float(min(cap, BACKOFF_BASE * 2 ** (crashes - 2)))


def fds_needed(workers: int, slot_sockets: int, shared_sockets: int, services: int = 0) -> int:
    """About how many file descriptors the master of ``workers`` slots needs.

    Each slot has ``slot_sockets`` sockets and its worker's two pipe ends;
    while a worker is forked, or a reload runs a slot's old and new workers
    side by side, four more pipe ends are open. ``shared_sockets`` belong to
    no slot (single-mode sockets, shard tallies). ``services`` is what the
    services may hold at most (each bounds its own).
    """
    return workers * (slot_sockets + 2) + shared_sockets + 4 + services + FD_RESERVE


def describe_exit(code: int | None, signal: int | None) -> tuple[RestartReason, str]:
    """(restart reason, human text) for a wait status."""
    if signal is not None:
        return RestartReason.SIGNAL, f"killed by signal {signal}"
    if code == ExitCode.BOOT:
        return RestartReason.BOOT, "failed to boot"
    return RestartReason.EXIT, f"exited with code {code}"


class Supervisor:
    """Decides, for every slot, which worker serves it and when to start, stop or kill one.

    Owned by the master, which feeds it events (``spawned``, ``ready``,
    ``heartbeat``, ``exited``, ``tick``, commands) with the current time and
    carries out the actions each call returns.
    """

    def __init__(self, workers: int, policy: Policy, now: float) -> None:
        self.policy = policy
        self.slots: dict[int, Slot] = {}
        self.workers: dict[int, WorkerRecord] = {}
        self._incarnation = 0
        self._ever_ready = False
        self._all_ready = False
        self._stopping: ExitCode | None = None
        #: A stop that had to kill a worker (past its deadline, or asked twice).
        self._forced = False
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
        live = [s for s in self.slots.values() if not s.retiring]
        return bool(live) and all(
            s.current is not None and self.workers[s.current].state is WorkerState.READY
            for s in live
        )

    def silent(self, w: WorkerRecord, now: float) -> bool:
        """Whether READY worker ``w`` has been quiet too long to count as reading its
        sockets (``Policy.silent_after``): its flows are steered away and it is not healthy,
        well before ``tick`` kills it at the timeout."""
        return w.state is WorkerState.READY and now - w.last_seen > self.policy.silent_after

    # -- events

    def start(self) -> list[Action]:
        out, self._start_actions = self._start_actions, []
        return out

    def spawned(self, slot: int, incarnation: int, pid: int, now: float) -> list[Action]:
        s = self.slots.get(slot)
        w = WorkerRecord(pid, slot, incarnation, started=now, last_seen=now)
        self.workers[pid] = w
        if s is None:  # slot removed while forking: nothing to serve
            return self._request_stop(w, StopReason.SCALE, now, drain=False)
        s.spawning = False
        s.fresh = False
        if s.current is None:
            s.current = pid
        else:
            s.incoming = pid
        if self._stopping is not None:
            return self._request_stop(w, StopReason.SHUTDOWN, now, drain=False)
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
        if s.fresh:
            # A scale-up that cannot fork (no fds, no memory) stops here: a
            # slot that never had a worker must not keep sockets in a group.
            return self._cancel_scale_up(f"cannot start a worker for new slot {slot}: {reason}")
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
        return self._cancel_scale_up(f"cannot open sockets for new slot {slot}: {reason}")

    def _cancel_scale_up(self, why: str) -> list[Action]:
        """Drop every slot of the scale-up under way that never had a worker.

        Those whose sockets are open are closed: the newest first, so each is
        the last member of its reuseport group and no other socket moves.
        """
        out: list[Action] = []
        for i in sorted((i for i, s in self.slots.items() if s.fresh), reverse=True):
            s = self.slots.pop(i)
            if not s.opening:
                out.append(CloseSlot(i))
        self._reload = [i for i in self._reload if i in self.slots]
        return [Say("error", f"{why}; scale-up stopped at {self.size} workers"), *out,
                *self._check_all_ready()]

    def heartbeat(self, pid: int, now: float) -> list[Action]:
        w = self.workers.get(pid)
        if w is not None:
            w.last_seen = now
        return []

    def ready(self, pid: int, now: float) -> list[Action]:
        w = self.workers.get(pid)
        if w is None or w.state is not WorkerState.BOOTING:
            return []
        w.state, w.ready_at, w.last_seen = WorkerState.READY, now, now
        out: list[Action] = [Say("info", f"worker slot={w.slot} pid={pid} ready")]
        s = self.slots.get(w.slot)
        if s is not None:
            s.reload_failures = 0
        if s is not None and s.incoming == pid and s.current is not None:
            # Rolling reload: the new worker serves, so the old one may go,
            # once it has served its sessions if it keeps any.
            old = self.workers[s.current]
            s.current, s.incoming = pid, None
            why, s.renew = s.renew or StopReason.RELOAD, None
            if self.policy.sessions and old.state is WorkerState.READY:
                # The reload moves on while it drains: it serves only its sessions.
                out += self._drain(old, why, now)
                out += self._check_all_ready()
                return out + self._advance_reload(now)
            else:
                out += self._request_stop(old, why, now, drain=False)
        if self._leader is None or self._leader not in self.workers:
            self._leader = pid
            out.append(Lead(pid))
        return out + self._check_all_ready()

    def drained(self, pid: int, now: float) -> list[Action]:
        """A DRAINING worker holds no session any more (or its time is up): stop it."""
        w = self.workers.get(pid)
        if w is None or w.state is not WorkerState.DRAINING:
            return []
        out: list[Action] = [Say("info", f"worker slot={w.slot} pid={pid} drained its sessions")]
        s = self.slots.get(w.slot)
        w.state, w.drain_until = WorkerState.READY, None
        if s is not None and s.retiring:
            # Now nothing may reach the slot: out of its groups, then the queue.
            return [*out, DetachSlot(w.slot),
                    *self._request_stop(w, StopReason.SCALE, now, drain=True)]
        return out + self._request_stop(w, w.stop_reason or StopReason.RELOAD, now, drain=False)

    def _drain(self, w: WorkerRecord, why: StopReason, now: float) -> list[Action]:
        w.state, w.stop_reason = WorkerState.DRAINING, why
        w.drain_until = now + self.policy.drain_timeout + self.policy.graceful_timeout
        out: list[Action] = [Drain(w.pid, w.slot)]
        if self._leader == w.pid:  # it stops reading single-mode listeners now
            self._leader = self._pick_leader()
            if self._leader is not None:
                out.append(Lead(self._leader))
        return out

    def boot_failed(self, pid: int, reason: str) -> list[Action]:
        w = self.workers.get(pid)
        if w is not None:
            w.boot_error = reason
        return []

    def left(self, pid: int, listener: str, call: str, now: float) -> list[Action]:
        """The APP closed worker ``pid``'s port of ``listener`` (``call``: how).

        Nobody reads that listener's sockets of the slot any more: the slot
        stops counting as serving it (its flows are steered elsewhere) and the
        worker is replaced, its queue kept for the next one.
        """
        w = self.workers.get(pid)
        if w is None or listener in w.left:
            return []
        w.left[listener] = call
        if w.stop_reason is not None:
            return []
        return self._replace(w, StopReason.CLOSED,
                             f"worker slot={w.slot} pid={pid}: the APP called {call}() on "
                             f"listener {listener}; its flows go to other slots", now)

    def serving(self, now: float, listener: str) -> dict[int, NotServing | None]:
        """Every current slot (not retiring, sockets open): None if a worker reads its
        sockets of ``listener``, else why not."""
        out: dict[int, NotServing | None] = {}
        for i, s in self.slots.items():
            if s.retiring or s.opening:
                continue
            w = self.workers.get(s.current) if s.current is not None else None
            if w is None:
                out[i] = NotServing.DOWN
            elif listener in w.left:
                out[i] = NotServing.CLOSED
            elif w.state is WorkerState.BOOTING:
                out[i] = NotServing.BOOTING
            elif w.state is WorkerState.STOPPING:
                out[i] = NotServing.STOPPING
            elif self.silent(w, now):
                out[i] = NotServing.UNRESPONSIVE
            else:
                out[i] = None
        return out

    def resumed(self, stalled: float, now: float) -> list[Action]:
        """The master itself did not run for ``stalled`` seconds (SIGSTOP, a paused VM).

        Its workers' silence over that time says nothing about them: every
        deadline moves by the stall, so nobody is killed for the master's nap.
        """
        for w in self.workers.values():
            w.last_seen = min(now, w.last_seen + stalled)
            if w.kill_at is not None:
                w.kill_at += stalled
            if w.pipe_closed_at is not None:
                w.pipe_closed_at += stalled
        return [Say("warning", f"the master did not run for {stalled:.1f}s; workers' "
                               "heartbeat deadlines restart from now")] if self.workers else []

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
        return self._replace(w, StopReason.WIRE,
                             f"worker slot={w.slot} pid={pid}: bad frame: {reason}", now)

    def exited(self, pid: int, code: int | None, signal: int | None, now: float, *,
               culprit: tuple[str, str, int] | None = None) -> list[Action]:
        """Worker ``pid`` is gone (reaped). ``culprit`` is (listener, host, port) of the
        datagram its handler was on when it died, if the master could tell
        (``shardudp.inflight``): an unexpected death there restarts without backoff."""
        w = self.workers.pop(pid, None)
        if w is None:
            return []
        s = self.slots.get(w.slot)
        label, text = describe_exit(code, signal)
        expected = w.stop_reason is not None and w.stop_reason.planned
        reason = (_RESTART_FOR_STOP.get(w.stop_reason) if expected
                  else _RESTART_FOR_STOP.get(w.stop_reason, label))
        if expected or self._stopping is not None or (code == 0 and signal is None):
            culprit = None
        out: list[Action] = [Retired(w.slot, w.incarnation, reason, culprit, pid)]
        poison = None
        if culprit is not None:
            listener, host, port = culprit
            poison = f"{Address(host, port)} on {listener}"
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
        if w.state is WorkerState.BOOTING and not self._ever_ready and (
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
        if w.stop_reason is not None:
            msg += f" after {w.stop_reason.value}"
        if was_incoming and s.renew is not None:  # a renewal's replacement died first
            s.renew = None
            return [*out, Say("warning", f"{msg}; slot {s.index} keeps worker pid={s.current}")]
        if was_incoming:  # the old worker still serves the slot
            boot = w.boot_error is not None or (code == ExitCode.BOOT and signal is None)
            return out + self._retry_replacement(s, msg, boot, now)
        if w.ready_at is not None and now - w.ready_at >= STABLE_AFTER:
            s.crashes = 0
        out += self._check_all_ready()
        s.poison_deaths = [(t, src) for t, src in s.poison_deaths if now - t < STABLE_AFTER]
        if poison is not None:
            s.poison_deaths.append((now, poison))
        if s.current is not None:  # mid-reload: the old worker died, its replacement boots
            out.append(Say("warning", f"{msg}; slot {s.index} keeps worker pid={s.current}"))
        elif poison is not None and len({src for _, src in s.poison_deaths}) <= POISON_RESTARTS:
            # The sender's fault, not the slot's: no backoff, so its flows
            # are back before anything is steered away.
            self._reload = [i for i in self._reload if i != s.index]
            out += [Say("warning", f"{msg}; restarting at once: it died handling a datagram "
                                   f"from {poison}"), *self._spawn(s)]
        else:
            out += self._restart_later(s, msg, now)
        return out + self._advance_reload(now)

    def tick(self, now: float) -> list[Action]:
        out = self._spawn_due(now)
        for w in list(self.workers.values()):
            if (w.pipe_closed_at is not None and w.stop_reason is None
                    and now >= w.pipe_closed_at + PIPE_EOF_GRACE):
                out += self._replace(w, StopReason.WIRE, f"worker slot={w.slot} pid={w.pid} "
                                                         "closed its pipe to the master", now)
                out += self._check_all_ready()
            elif w.state is WorkerState.DRAINING and w.drain_until is not None \
                    and now >= w.drain_until:
                out += self.drained(w.pid, now)
            elif w.state is WorkerState.STOPPING:
                if w.kill_at is not None and now >= w.kill_at:
                    w.kill_at = None
                    if self._stopping is not None:
                        self._forced = True
                    out += [Say("warning", f"worker slot={w.slot} pid={w.pid} did not stop in "
                                           "time; killing"), Kill(w.pid, Sig.KILL)]
            elif now - w.last_seen > self.policy.timeout:
                # KILL at once: it already failed to answer, and its slot's
                # flows wait (steered away) until a new worker reads them.
                out += self._replace(w, StopReason.TIMEOUT,
                                     f"worker slot={w.slot} pid={w.pid} missed its heartbeat for "
                                     f"{now - w.last_seen:.1f}s", now, sig=Sig.KILL)
                out += self._check_all_ready()
        return out

    def next_deadline(self) -> float | None:
        """The earliest ``now`` at which ``tick`` has something to do."""
        times = [s.spawn_at for s in self.slots.values() if s.spawn_at is not None]
        for w in self.workers.values():
            if w.state is WorkerState.STOPPING:
                if w.kill_at is not None:
                    times.append(w.kill_at)
            else:
                times.append(w.last_seen + self.policy.timeout)
                if w.pipe_closed_at is not None:
                    times.append(w.pipe_closed_at + PIPE_EOF_GRACE)
                if w.drain_until is not None:
                    times.append(w.drain_until)
        return min(times) if times else None

    # -- commands (signals and the control socket)

    def shutdown(self, code: ExitCode, reason: str, now: float) -> list[Action]:
        if self._stopping is not None:
            return []
        self._stopping, self._stop_reason = code, reason
        self._reload = []
        # A failure's reason is said once, by whoever reports the Exit.
        out: list[Action] = [Stopping(code),
                             Say("info", f"stopping: {reason}") if code == ExitCode.OK else
                             Say("warning", f"stopping: {code.name.lower()} failure, "
                                            f"exit code {int(code)}")]
        # Nothing new arrives from here on, and what is queued gets answered.
        out += [DetachSlot(i) for i, s in sorted(self.slots.items())
                if not s.retiring and not s.opening]
        for w in list(self.workers.values()):
            out += self._request_stop(w, StopReason.SHUTDOWN, now, drain=True)
        return out + self._maybe_exit()

    def renew(self, slot: int, why: StopReason, text: str, now: float) -> list[Action]:
        """Replace the slot's READY worker gracefully: its successor first, then it stops
        (or drains its sessions), with nothing lost. Ignored while the slot is busy."""
        s = self.slots.get(slot)
        if (self._stopping is not None or s is None or s.retiring or s.opening
                or s.incoming is not None or s.spawning or s.current is None
                or self.workers[s.current].state is not WorkerState.READY):
            return []
        s.renew = why
        return [Say("warning", f"{text}; replacing it (its successor first)"), *self._spawn(s)]

    def reload(self, now: float) -> list[Action]:
        if self._stopping is not None:
            return []
        if self._reloading:
            return [Say("warning", "reload already in progress; ignored")]
        for s in self.slots.values():
            if s.spawn_at is not None:
                # Down and waiting out its backoff: the new code deserves a
                # fresh start now, not after the old code's crash count.
                s.crashes, s.spawn_at = 0, now
        self._reload = sorted(i for i, s in self.slots.items()
                              if s.current is not None and not s.retiring)
        self._reloading = True
        return [Say("info", f"rolling reload of {self.size} slots"), *self._spawn_due(now),
                *self._advance_reload(now)]

    def scale(self, n: int, now: float) -> list[Action]:
        if self._stopping is not None:
            return []
        if n < 1:
            return [Say("warning", f"scale to {n} refused: at least one worker is needed")]
        live = sorted(i for i, s in self.slots.items() if not s.retiring)
        out: list[Action] = []
        if n > len(live):
            nxt = max(self.slots, default=-1) + 1
            out.append(Say("info", f"scaling up from {len(live)} to {n} workers"))
            busy = any(s.opening for s in self.slots.values())
            for i in range(nxt, nxt + n - len(live)):
                self.slots[i] = Slot(i, opening=True, fresh=True)
            if not busy:  # else the chain under way reaches the new ones
                out += self._open_next()
            self._all_ready = False
        elif n < len(live):
            out.append(Say("info", f"scaling down from {len(live)} to {n} workers"))
            for i in reversed(live[n:]):
                s = self.slots[i]
                s.retiring, s.spawn_at = True, None
                pids = [p for p in (s.current, s.incoming) if p is not None]
                current = self.workers.get(s.current) if s.current is not None else None
                if (self.policy.sessions and current is not None
                        and current.state is WorkerState.READY):
                    # Its sessions first: the slot stays in its groups (only
                    # its pinned flows reach it) until they are drained.
                    out += self._drain(current, StopReason.SCALE, now)
                    stop = [p for p in pids if p != current.pid]
                else:
                    out.append(DetachSlot(i))
                    stop = pids
                for pid in stop:
                    out += self._request_stop(self.workers[pid], StopReason.SCALE, now, drain=True)
                if not pids and not s.spawning:
                    del self.slots[i]
                    if not s.opening:
                        out.append(Say("warning", f"slot {i} had no worker to drain its queue"))
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
        out: list[Action] = [Say("warning" if delay == 0 else "error",
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
        return [Say("warning", f"{what}; slot {s.index} keeps worker pid={s.current}; starting "
                               f"another new worker in {delay:.1f}s")]

    def _abort_reload(self, why: str) -> list[Action]:
        self._reload, self._reloading = [], False
        for s in self.slots.values():
            s.reload_failures = 0
        return [Say("error", f"reload aborted: {why}; old workers keep serving"),
                *self._check_all_ready()]

    def _replace(self, w: WorkerRecord, why: StopReason, text: str, now: float, *,
                 sig: Sig = Sig.TERM) -> list[Action]:
        """Signal a faulty worker (TERM, then KILL after the grace); ``exited`` replaces it."""
        w.stop_reason, w.state = why, WorkerState.STOPPING
        w.kill_at = now + self.policy.kill_grace if sig is Sig.TERM else None
        level = "warning" if why is StopReason.CLOSED else "error"
        return [Say(level, f"{text}; replacing it"), Kill(w.pid, sig)]

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
        return [Spawn(s.index, self._incarnation, beside=s.current is not None)]

    def _request_stop(self, w: WorkerRecord, why: StopReason, now: float, *,
                      drain: bool) -> list[Action]:
        if w.state is WorkerState.STOPPING and w.stop_reason is not None \
                and w.stop_reason.planned:
            return []
        w.drain_until = None
        w.state, w.stop_reason = WorkerState.STOPPING, why
        w.kill_at = now + self.policy.graceful_timeout
        return [SendStop(w.pid, self.policy.graceful_timeout, drain)]

    def _advance_reload(self, now: float) -> list[Action]:
        # One slot at a time: wait while a replacement boots (or is due to be
        # started again) or an old worker of a reloaded slot is still draining.
        if any(s.incoming is not None or s.spawning
               or (s.current is not None and s.spawn_at is not None)
               for s in self.slots.values()):
            return []
        if any(w.stop_reason is StopReason.RELOAD and w.state is WorkerState.STOPPING
               for w in self.workers.values()):
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
            return [Say("info", "reload complete"), *self._check_all_ready()]
        return []

    def _pick_leader(self) -> int | None:
        ready = [w for w in self.workers.values()
                 if w.state is WorkerState.READY and w.stop_reason is None]
        return min(ready, key=lambda w: w.started).pid if ready else None

    def _check_all_ready(self) -> list[Action]:
        healthy = self.healthy()
        if healthy:
            self._ever_ready = True
        # Not between a rolling reload's ready lines: once it is complete (or aborted).
        if healthy and not self._all_ready and not self._reloading:
            self._all_ready = True
            return [AllReady()]
        if not healthy:
            self._all_ready = False
        return []

    def force(self) -> list[Action]:
        """The operator asked again (a second TERM/INT): every worker is killed now."""
        if self._stopping is None:
            return []
        self._forced = True
        return [Kill(pid, Sig.KILL) for pid in sorted(self.workers)]

    def _maybe_exit(self) -> list[Action]:
        if self._stopping is None or self.workers or self._exited:
            return []
        self._exited = True
        if self._forced and self._stopping is ExitCode.OK:
            # Stopped, but not gracefully: some stopProtocol may not have run.
            return [Exit(ExitCode.FORCED, f"{self._stop_reason}; workers had to be killed")]
        return [Exit(self._stopping, self._stop_reason)]
