"""The worker: an I/O shell run in the child right after fork.

Order matters: route logging into our pipe, forget the master's state
(signals, fds), install our own reactor, say hello, build the protocols,
adopt the sockets, say READY. Only this module (imported after fork)
installs a reactor; the master merely preloads Twisted's modules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Final

from . import logs, process, wire
from .apploader import AppError, boot_reason, booting, import_from_cwd, load_app, raised
from .errors import ExitCode, WireError
from .gate import Gate
from .pipewriter import PipeWriter
from .socketset import SlotSocket
from .stats import ListenerStats
from .steering import bucket_of, hash_flow

log = logging.getLogger("shardudp.worker")

#: Bound of one drain: a stopping worker reads at most this many queued datagrams.
DRAIN_LIMIT: Final = 1_000_000
DRAIN_CHUNK: Final = 1024
#: Log records are dropped sooner, so they never crowd out heartbeats.
LOG_BACKLOG: Final = 64 * 1024
#: How long a worker whose master died may take to stop.
ORPHAN_GRACE: Final = 2.0
#: The process-level deadline (SIGALRM) trails the reactor's own by this much.
BACKSTOP_MARGIN: Final = 0.5


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a forked worker needs, decided by the master before fork."""

    slot: int
    incarnation: int
    master_pid: int
    read_fd: int
    write_fd: int
    sockets: list[SlotSocket]
    datapath: str
    metrics_interval: float
    heartbeat_interval: float
    graceful_timeout: float
    #: (uid, gid) to drop to after fork, or None to keep the master's.
    run_as: tuple[int, int] | None = None
    #: The in-flight record shared with the master (``shardudp.inflight``).
    record: Any = None
    #: What the master's services ask of a new worker before it reads a
    #: datagram (quarantined sources, steering counts), as their messages.
    initial: tuple[wire.Message, ...] = ()


class SessionWatch:
    """One session listener's flows as this worker reports them to the master.

    The master asks (``Drain``: all of them; ``Watch``: those in some buckets)
    when the listener's table is about to move on. From then on, each
    ``tick`` reports the flows active within ``idle`` that the master does not
    hold yet, and those of its held ones that went idle.
    """

    def __init__(self, name: str, gate: Gate, idle: float) -> None:
        self.name = name
        self.gate = gate
        self.idle = idle
        #: None: nothing asked; "all": draining; else the watched buckets.
        self.watch: frozenset[int] | str | None = None
        self.seed = 0
        self.reported: set[tuple[str, int]] = set()
        #: When idle flows are next forgotten (a scan of all of them).
        self.next_forget = 0.0
        self._asked = False
        self._buckets: dict[tuple[str, int], int] = {}

    def drain(self) -> None:
        self.watch, self._asked = "all", True

    def watch_buckets(self, seed: int, buckets: list[int]) -> None:
        self.seed, self._buckets = seed, {}
        self.watch = frozenset(buckets) or None
        self._asked = self.watch is not None
        if self.watch is None:
            self.reported.clear()

    def tick(self, now: float) -> list[wire.Sessions]:
        flows = self.gate.flows
        if self.watch is None or flows is None:
            return []
        horizon = now - self.idle
        active = {a: seen for a, seen in flows.items() if seen > horizon}
        if self.watch != "all":
            active = {f: seen for f, seen in active.items() if self._bucket(f) in self.watch}
        # Most recently heard first: what the master cuts for want of room is the rest.
        new = sorted(active.keys() - self.reported, key=active.__getitem__, reverse=True)
        ended = sorted(self.reported - active.keys())
        if not (new or ended or self._asked):
            return []
        self._asked = False
        self.reported = set(active)
        return wire.sessions_report(self.name, [wire.flow_text(*f) for f in new],
                                    [wire.flow_text(*f) for f in ended])

    def forget_idle(self, now: float) -> None:
        """Now and then, drop flows idle for twice ``idle`` (long enough to report
        their end first): it scans them all, so not every tick."""
        if now >= self.next_forget:
            self.gate.forget_idle(now - 2 * self.idle)
            self.next_forget = now + max(SESSION_TICK, self.idle / 4)

    def _bucket(self, flow: tuple[str, int]) -> int:
        b = self._buckets.get(flow)
        if b is None:
            if len(self._buckets) >= max(self.gate.cap, 1024):
                self._buckets.clear()
            b = self._buckets[flow] = bucket_of(hash_flow(flow[0], flow[1], self.seed))
        return b


#: How often a worker with session listeners advances its flow clock, forgets
#: idle flows and reports what the master asked for.
SESSION_TICK: Final = 0.1


class Worker:
    """One worker process's state: its ports, counters and pipe to the master.

    Built by ``run`` in the child after fork; the reactor calls ``doRead`` for
    the master's frames, and its LoopingCalls call ``heartbeat`` and ``report``.
    """

    def __init__(self, spec: WorkerSpec, reactor: Any, out: PipeWriter) -> None:
        self.spec = spec
        self.reactor = reactor
        self.out = out
        out.on_error = self._pipe_failed
        self.decoder = wire.Decoder()
        self.ports: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        self.stats: dict[str, ListenerStats] = {}
        self.gates: dict[str, Gate] = {}
        self.sessions: dict[str, SessionWatch] = {}
        self.stopping = False
        self.hb_seq = 0
        self.metrics_seq = 0

    # -- the master pipe, as a Twisted reader

    def fileno(self) -> int:
        return self.spec.read_fd

    def logPrefix(self) -> str:
        return "shardudp-pipe"

    def doRead(self) -> None:
        try:
            data = os.read(self.spec.read_fd, 65536)
        except BlockingIOError:
            return
        if not data:
            self.reactor.removeReader(self)
            log.warning("master went away; stopping")
            self.stop(min(ORPHAN_GRACE, self.spec.graceful_timeout), drain=False)
            return
        decoded = self.decoder.feed(data)
        for msg in decoded.messages:
            self.on_message(msg)
        if decoded.error is not None:
            log.error("bad frame from the master (%s); stopping", decoded.error)
            self.reactor.removeReader(self)
            self.stop(self.spec.graceful_timeout, drain=False)

    def on_message(self, msg: wire.Message) -> None:
        """Carry out one of the master's messages."""
        match msg:
            case wire.Stop():
                self.stop(msg.timeout, drain=msg.drain)
            case wire.Activate():
                self.activate(msg.listener, msg.active)
            case wire.Refuse():
                try:
                    sources = [wire.parse_flow_untrusted(t, "refuse") for t in msg.sources]
                except WireError as exc:
                    log.error("%s from the master; ignored", exc)
                    return
                self._gate(msg.listener, lambda g: g.refuse(sources))
            case wire.Cover():
                self._gate(msg.listener, lambda g: g.cover(msg.seed, msg.buckets))
            case wire.Drain():
                self._hand_over(msg.listeners)
            case wire.Watch():
                watch = self.sessions.get(msg.listener)
                if watch is not None:
                    watch.watch_buckets(msg.seed, msg.buckets)
            case _:
                log.error("unexpected %s message from the master; ignored", msg.TAG)

    def _hand_over(self, names: list[str]) -> None:
        """A new worker serves our slot: keep serving (and report) the sessions of
        ``names``; stop reading every other listener, which the new one reads."""
        for name, port in self.ports.items():
            watch = self.sessions.get(name)
            if name in names and watch is not None:
                watch.drain()
            else:
                port.close_quietly()
        log.info("draining: serving held sessions of %s only",
                 ", ".join(n for n in names if n in self.sessions) or "no listener")
        self.session_tick()

    def session_tick(self) -> None:
        """Advance the flows' clock, forget idle flows, report what the master asked for."""
        now = time.monotonic()
        for watch in self.sessions.values():
            watch.gate.now = now
            for msg in watch.tick(now):
                self.out.send(msg)
            watch.forget_idle(now)

    def _gate(self, name: str, change: Callable[[Gate], None]) -> None:
        gate, port = self.gates.get(name), self.ports.get(name)
        if gate is None or port is None:
            return
        change(gate)
        port.set_gate(gate if gate.active else None)

    def connectionLost(self, reason: object) -> None:
        pass

    def _pipe_failed(self, exc: OSError) -> None:
        if exc.errno == errno.EPIPE:
            return  # the master is gone: the EOF on our reader stops us
        # Nothing reaches the master any more, not even this line's log record.
        with contextlib.suppress(OSError):
            os.write(2, f"shardudp: worker slot={self.spec.slot} pid={os.getpid()}: "
                        f"pipe to the master failed: {exc}; stopping\n".encode())
        self.reactor.callFromThread(self.stop, min(ORPHAN_GRACE, self.spec.graceful_timeout),
                                    drain=False)

    # -- lifecycle

    def boot(self) -> None:
        """Import every listener's APP, then build and start each; AppError if one fails."""
        from .port import port_class

        factories = {}
        for ss in self.spec.sockets:
            with booting(ss.listener):
                factories[ss.listener.name] = load_app(ss.listener.app)
        cls = port_class(self.spec.datapath)
        counting = self.spec.metrics_interval > 0
        for number, ss in enumerate(self.spec.sockets):
            name = ss.listener.name
            stats = ListenerStats() if counting else None
            if stats is not None:
                self.stats[name] = stats
            with booting(ss.listener):
                proto = factories[name]()
            port: Any = cls.adopt(ss.sock, proto, self.reactor, stats=stats, shared=ss.shared,
                                  max_packet_size=ss.listener.max_packet_size,
                                  multicast_interface=ss.listener.multicast_interface or "")
            if self.spec.record is not None:
                port.set_record(self.spec.record, number)
            self.ports[name] = port
            gate = self.gates[name] = Gate(proto, stats)
            if ss.listener.sessions:
                gate.track(ss.listener.session_table)
                gate.now = time.monotonic()
                port.track_flows(gate)
                self.sessions[name] = SessionWatch(name, gate, ss.listener.session_idle)
                port.set_gate(gate if gate.active else None)
            # Before the port reads anything: a quarantined source's datagram
            # may be the first one queued.
            for msg in self.spec.initial:
                if getattr(msg, "listener", None) == name:
                    self.on_message(msg)
            with booting(ss.listener):
                try:
                    port.startListening()  # runs the APP's startProtocol
                except BaseException as exc:  # SystemExit from startProtocol too
                    raise raised("startProtocol", exc) from None
            if ss.kind == "single":
                port.stopReading()  # standby until the master names us leader
            port.on_closed = functools.partial(self._left, name)
            self.kinds[name] = ss.kind
            # The port holds its own dup; ours would keep the file open twice.
            ss.sock.close()

    def _left(self, name: str, call: str) -> None:
        """The APP closed our port of listener ``name``: the master must know, so that
        the slot's flows go elsewhere and this worker is replaced."""
        log.warning("the APP called %s() on listener %s: this worker no longer reads it; "
                    "the master will replace it", call, name)
        self.out.send(wire.Left(listener=name, call=call))

    def activate(self, name: str, active: bool) -> None:
        port = self.ports.get(name)
        if port is None or self.stopping:
            return
        if active:
            port.startReading()
        else:
            port.stopReading()

    def heartbeat(self) -> None:
        self.hb_seq += 1
        self.out.send(wire.Heartbeat(seq=self.hb_seq), droppable=True)

    def report(self, *, final: bool = False) -> None:
        if not self.stats:
            return
        self.metrics_seq += 1
        msg = wire.MetricsReport(
            slot=self.spec.slot, incarnation=self.spec.incarnation, seq=self.metrics_seq,
            listeners={name: st.snapshot() for name, st in self.stats.items()})
        self.out.send(msg, droppable=not final)

    def stop(self, timeout: float, *, drain: bool) -> None:
        if self.stopping:
            return
        self.stopping = True
        # Our own deadline too: the master may be gone and cannot KILL us.
        self.reactor.callLater(timeout, self._hard_exit)
        process.arm_backstop(timeout + BACKSTOP_MARGIN)
        if drain:
            # Half the deadline at most: stopProtocol and the last report need time too.
            self._drain(time.monotonic() + timeout / 2)
        from twisted.internet import defer

        waits = [d for d in (port.close_quietly() for port in self.ports.values()) if d]
        defer.DeferredList(waits).addBoth(lambda _: self.reactor.stop())

    def _drain(self, deadline: float) -> None:
        """Answer what is queued in our sockets (the master took them out of their groups)."""
        for name, port in self.ports.items():
            if self.kinds[name] == "single":
                continue  # shared with the next leader, which reads it
            total = 0
            for _ in range(DRAIN_LIMIT // DRAIN_CHUNK):
                n = port.drain(DRAIN_CHUNK)
                total += n
                if n < DRAIN_CHUNK or time.monotonic() >= deadline:
                    break
            if total:
                log.info("drained %d queued datagrams from %s", total, name)

    def _hard_exit(self) -> None:
        log.error("graceful stop took longer than its deadline; exiting")
        self._finish()
        os._exit(ExitCode.ERROR)

    def _finish(self) -> None:
        self.report(final=True)
        self.out.flush_blocking(1.0)


def _install_signals(worker: Worker) -> None:
    def on_term(signum: int, frame: object) -> None:
        timeout = worker.spec.graceful_timeout
        if os.getppid() != worker.spec.master_pid:  # PDEATHSIG: nobody waits for us
            timeout = min(ORPHAN_GRACE, timeout)
        # Armed here, not in stop(): a reactor stuck in user code never runs stop().
        process.arm_backstop(timeout + BACKSTOP_MARGIN)
        worker.reactor.callFromThread(worker.stop, timeout, drain=False)

    signal.signal(signal.SIGTERM, on_term)
    process.ignore_group_signals()


def run(spec: WorkerSpec) -> int:
    """Run one worker to completion; returns its exit status."""
    out = PipeWriter(spec.write_fd)
    logs.setup_worker(spec.slot, lambda m: out.send(m, droppable=True, backlog=LOG_BACKLOG))
    # print() in a protocol should show up now, not when a buffer fills, and
    # as one write per line: every worker shares the master's stdout, and
    # with PYTHONUNBUFFERED (write_through) print() writes the text and its
    # newline separately, so two workers' lines would interleave mid-line.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(line_buffering=True, write_through=False)  # type: ignore[union-attr]
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL)
    process.ignore_group_signals()
    keep = {0, 1, 2, spec.read_fd, spec.write_fd}
    keep |= {ss.sock.fileno() for ss in spec.sockets}
    # Before dropping privileges: after setuid /proc/self/fd is not ours to list.
    process.close_foreign_fds(keep)
    os.set_blocking(spec.read_fd, False)

    # Our own code (the reactor, Twisted) loads with the master's rights; the
    # APP, which is user code, only after dropping them.
    from twisted.internet import task  # noqa: F401
    from twisted.internet.protocol import DatagramProtocol  # noqa: F401
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    from . import reactor as shard_reactor

    reactor: Any = shard_reactor.install(spec.datapath)
    process.drop_privileges(spec.run_as)
    process.die_with_master(spec.master_pid)
    # Only now, with the workers' rights: the APP may live in the current directory.
    import_from_cwd()
    observer: Any = STDLibLogObserver()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    worker = Worker(spec, reactor, out)
    worker.out.send(wire.Hello(slot=spec.slot, incarnation=spec.incarnation, pid=os.getpid()))

    try:
        worker.boot()
    except AppError as exc:
        reason = boot_reason(exc, spec.run_as)
        if exc.cause is not None:
            log.debug("boot failure detail:\n%s",
                      "".join(traceback.format_exception(exc.cause)))
        return _boot_failed(worker, reason)

    from twisted.internet.task import LoopingCall

    reactor.addReader(worker)
    LoopingCall(worker.heartbeat).start(spec.heartbeat_interval, now=False)
    if worker.sessions:
        LoopingCall(worker.session_tick).start(SESSION_TICK, now=False)
    if spec.metrics_interval > 0:
        LoopingCall(worker.report).start(spec.metrics_interval, now=False)
    worker.out.send(wire.Ready(pid=os.getpid(), listeners=sorted(worker.ports)))
    reactor.callWhenRunning(_install_signals, worker)
    reactor.run(installSignalHandlers=True)
    worker._finish()
    return ExitCode.OK


def _boot_failed(worker: Worker, reason: str) -> int:
    worker.out.send(wire.BootFailed.bounded(reason))
    worker.out.flush_blocking(1.0)
    return ExitCode.BOOT
