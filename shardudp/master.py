"""The master: an I/O shell around the supervisor.

Signal handlers only enqueue; the loop wakes on the signal fd, the worker
pipes, the services' sockets and the earliest deadline, and carries out
whatever the supervisor decides. What hangs off the master (pid file,
control socket, metrics, ...) is a list of ``services.Service``; nobody
subclasses ``Master``. The master preloads Twisted's modules (so a
replacement worker boots fast) but never installs a reactor: each worker
installs its own after fork.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import mmap
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar, assert_never

from . import datapaths, inflight, logs, process, sockets, supervision, wire
from .config import ServerConfig
from .errors import ConfigError, ExitCode, StartupError, WireError
from .services import Service
from .socketset import SlotSocket, SocketSet, kind_of
from .supervision import Action, Sig

log = logging.getLogger("shardudp.master")

#: The loop sleeps at most a second; a turn that took this much longer than
#: its sleep means the master itself did not run (SIGSTOP, a paused VM).
STALL_SLACK: Final = 2.0

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU,
           signal.SIGCHLD)


_S = TypeVar("_S", bound=Service)

#: What the supervisor's signal names mean to the kernel.
_SIGNALS: Final = {Sig.TERM: signal.SIGTERM, Sig.KILL: signal.SIGKILL}


@dataclasses.dataclass
class Child:
    """A forked worker as the master holds it: its pid and the two ends of its pipes."""

    pid: int
    slot: int
    incarnation: int
    from_fd: int  # we read the worker's frames here
    to_fd: int  # we write Stop / Activate here
    decoder: wire.Decoder
    #: The page it keeps its in-flight datagram's source in (``shardudp.inflight``).
    record: mmap.mmap | None = None

    def culprit(self, listeners: Sequence[str]) -> tuple[str, str, int] | None:
        """(listener, host, port) of the datagram its handler was on when it died."""
        found = inflight.decode(self.record) if self.record is not None else None
        if found is None or not 0 <= found[0] < len(listeners):
            return None
        return listeners[found[0]], found[1], found[2]


def preload_worker_modules() -> None:
    """Import, once and in the main thread, the code every worker runs.

    A replacement worker then boots in milliseconds instead of spending
    ~100 ms importing Twisted, which is how long its socket must queue
    alone. No reactor is installed here: each worker installs its own. The
    APP is not preloaded, so a rolling reload still picks up its changes.
    """
    import twisted.internet.epollreactor
    import twisted.internet.protocol
    import twisted.internet.task
    import twisted.logger  # noqa: F401

    from . import port, reactor  # noqa: F401


class Master:
    """Holds every listener socket for its whole life, forks the workers, and carries
    out the ``Supervisor``'s decisions; the services hang off it.

    Built by ``server.build`` (the CLI's ``run``), which registers the standard
    services; ``run()`` is called once and returns the exit code.
    """

    def __init__(self, cfg: ServerConfig, services: Sequence[Service] = (), *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        #: What --datapath means on this host (``auto`` resolved); None for one
        #: that cannot run here, which check_host refuses before a master exists.
        self.datapath: str | None
        try:
            self.datapath = datapaths.resolve(cfg.datapath)
        except (RuntimeError, ValueError):
            self.datapath = None
        self.clock = clock
        self.sockets = SocketSet(cfg.listeners)
        self.children: dict[int, Child] = {}
        self.selector = selectors.DefaultSelector()
        self.signals: collections.deque[int] = collections.deque()
        self.exit_code: ExitCode | None = None
        self.exit_reason = ""
        self.pid = os.getpid()
        self.started_at = self.clock()
        #: When the loop last finished a turn: a much later wake-up is a stall.
        self._progress = self.started_at
        #: (uid, gid) the workers run as (--user/--group), resolved by run().
        self.run_as: tuple[int, int] | None = None
        self.sup: supervision.Supervisor | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self.services: list[Service] = []
        for service in services:
            self.add_service(service)

    def add_service(self, service: Service) -> None:
        """Register ``service`` after those already there (its hooks run in that order)."""
        service.attach(self)
        self.services.append(service)

    def service(self, kind: type[_S]) -> _S | None:
        """The registered service of type ``kind``, if any."""
        return next((s for s in self.services if isinstance(s, kind)), None)

    # -- startup

    def open_sockets(self) -> None:
        """Bind everything before forking; raises StartupError."""
        problems = sockets.find_port_conflicts(
            (lst.address for lst in self.cfg.listeners if not lst.multicast),
            sockets.bound_udp_sockets())
        if problems:
            raise StartupError(problems[0])
        for slot in range(self.cfg.workers):
            try:
                self.sockets.open_slot(slot)
            except OSError as exc:  # socket() itself: EMFILE, ENFILE, ENOBUFS
                raise StartupError(f"cannot create the sockets of slot {slot}: "
                                   f"{exc.strerror or exc}") from None

    def _fit_fd_limit(self) -> None:
        """Raise the soft RLIMIT_NOFILE to the hard one; ConfigError if we cannot fit in it.

        Every slot's sockets and its worker's pipes live in the master for its
        whole life: a limit too low for them would only show up as a storm of
        failed worker starts.
        """
        kinds = [kind_of(lst) for lst in self.cfg.listeners]
        need = supervision.fds_needed(self.cfg.workers,
                                      slot_sockets=sum(k != "single" for k in kinds),
                                      shared_sockets=sum(k in ("single", "shard") for k in kinds),
                                      services=sum(s.fds for s in self.services))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):  # an infinite hard limit is over fs.nr_open
                pass
        if need > soft:
            raise ConfigError(f"{self.cfg.label('workers')}: {self.cfg.workers} workers need about "
                              f"{need} file descriptors, but the limit is {soft}: raise it "
                              f"(`ulimit -n {need}` in the shell, LimitNOFILE={need} under "
                              "systemd) or run fewer workers")

    def run(self) -> ExitCode:
        try:
            return self._run()
        except BaseException:
            # What preflight claimed (pid file, control socket), if the start failed.
            self._close_services()
            raise

    def _run(self) -> ExitCode:
        self._fit_fd_limit()
        self.run_as = process.lookup_user(self.cfg.user, self.cfg.group, self.cfg.label)
        for service in self.services:
            service.preflight()
        try:
            preload_worker_modules()
        except OSError as exc:  # e.g. no file descriptor left to read a module
            raise StartupError(f"cannot load Twisted: {exc}") from None
        try:
            self.open_sockets()
        except StartupError:
            self.sockets.close_all()
            raise
        self._install_signals()
        now = self.clock()
        self.sup = supervision.Supervisor(
            self.cfg.workers,
            supervision.Policy(self.cfg.timeout, self.cfg.graceful_timeout,
                               self.cfg.backoff_max,
                               sessions=any(lst.sessions for lst in self.cfg.listeners),
                               drain_timeout=max((lst.drain_timeout for lst in self.cfg.listeners
                                                  if lst.sessions), default=0.0)),
            now)
        log.info("shardudp master pid=%d starting %d workers for %s (datapath %s)", self.pid,
                 self.cfg.workers, ", ".join(f"{lst.name}={lst.app}" for lst in self.cfg.listeners),
                 f"auto = {self.datapath}" if self.cfg.datapath == "auto" else self.cfg.datapath)
        try:
            for service in self.services:
                service.started()
            self.apply(self.sup.start())
            while self.exit_code is None:
                self._loop_once()
                now = self.clock()
                for service in self.services:
                    service.after_turn(now)
        finally:
            self._cleanup()
        return self.exit_code

    def _close_services(self) -> None:
        for service in self.services:
            try:
                service.close()
            except Exception:
                log.exception("closing %s failed", type(service).__name__)

    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            signal.signal(sig, self._enqueue_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def _enqueue_signal(self, signum: int, frame: object) -> None:
        self.signals.append(signum)

    # -- the loop

    def _next_deadline(self) -> float | None:
        assert self.sup is not None
        times = [t for t in (self.sup.next_deadline(), *(s.deadline() for s in self.services))
                 if t is not None]
        return min(times) if times else None

    def _loop_once(self) -> None:
        assert self.sup is not None
        now = self.clock()
        deadline = self._next_deadline()
        timeout = 1.0 if deadline is None else min(1.0, max(0.0, deadline - now))
        events = self.selector.select(timeout)
        woke = self.clock()
        # Before the workers' pipes are read or any deadline judged: their
        # silence while we did not run says nothing about them.
        self._check_stall(woke - self._progress - timeout, woke)
        for key, mask in events:
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
            elif isinstance(key.data, Child):
                self._read_child(key.data)
            else:
                key.data(mask)  # a service's socket (the control socket, the HTTP endpoint)
        while self.signals:
            self._dispatch_signal(self.signals.popleft())
        self._reap()
        now = self.clock()
        self._check_stall(now - woke, now)
        self.apply(self.sup.tick(now))
        self._progress = self.clock()

    def _check_stall(self, stalled: float, now: float) -> None:
        assert self.sup is not None
        if stalled > STALL_SLACK:
            self.apply(self.sup.resumed(stalled, now))

    def _dispatch_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name.removeprefix("SIG").lower()
        handler = getattr(self, f"handle_{name}", None)
        if handler is not None:
            handler()

    def handle_term(self) -> None:
        self.shutdown("SIGTERM received")

    def handle_int(self) -> None:
        self.shutdown("SIGINT received")

    def handle_hup(self) -> None:
        assert self.sup is not None
        self.apply(self.sup.reload(self.clock()))

    def handle_ttin(self) -> None:
        assert self.sup is not None
        self.apply(self.sup.scale(self.sup.size + 1, self.clock()))

    def handle_ttou(self) -> None:
        assert self.sup is not None
        self.apply(self.sup.scale(self.sup.size - 1, self.clock()))

    def handle_chld(self) -> None:
        self._reap()

    def shutdown(self, why: str) -> None:
        """Stop gracefully (signals, the control socket); a second call kills the workers."""
        assert self.sup is not None
        if self.sup.stopping:
            # A second TERM/INT: the operator does not want to wait.
            log.warning("%s again: killing workers now", why.split()[0])
            self.apply(self.sup.force())
            return
        self.apply(self.sup.shutdown(ExitCode.OK, why, self.clock()))

    def _reap(self) -> None:
        assert self.sup is not None
        for _ in range(4096):
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            culprit = None
            if child is not None:
                culprit = child.culprit([lst.name for lst in self.cfg.listeners])
                self._drain_and_close(child)
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            self.apply(self.sup.exited(pid, code, sig, self.clock(), culprit=culprit))

    # -- worker pipes

    def _read_child(self, child: Child) -> None:
        assert self.sup is not None
        try:
            data = os.read(child.from_fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            log.warning("worker pid=%d pipe error: %s", child.pid, exc)
        if not data:
            self._unregister(child)
            self.apply(self.sup.pipe_closed(child.pid, self.clock()))
            return
        self._feed(child, data)

    def _feed(self, child: Child, data: bytes) -> None:
        assert self.sup is not None
        decoded = child.decoder.feed(data)
        error = decoded.error
        for msg in decoded.messages:  # the good frames before a bad one still count
            try:
                self._on_message(child, msg)
            except WireError as exc:
                error = exc
                break
        if error is not None:
            self._unregister(child)
            self.apply(self.sup.wire_fault(child.pid, str(error), self.clock()))

    def _on_message(self, child: Child, msg: wire.Message) -> None:
        assert self.sup is not None
        now = self.clock()
        if isinstance(msg, wire.Log):
            # Not a sign of life: any thread may log while the reactor is wedged.
            logs.emit_worker(child.slot, child.pid, msg)
            return
        self.apply(self.sup.heartbeat(child.pid, now))
        match msg:
            case wire.Hello():
                if (msg.pid, msg.slot, msg.incarnation) != (child.pid, child.slot,
                                                            child.incarnation):
                    raise WireError(f"hello does not match the process: {msg}")
            case wire.Ready():
                self.apply(self.sup.ready(child.pid, now))
            case wire.BootFailed():
                self.apply(self.sup.boot_failed(child.pid, msg.reason))
            case wire.Left():
                if msg.listener not in {lst.name for lst in self.cfg.listeners}:
                    raise WireError(f"left names no listener of ours: {msg.listener!r}")
                self.apply(self.sup.left(child.pid, msg.listener, msg.call, now))
            case wire.Heartbeat():
                pass
            case _:
                if not any(s.on_message(child, msg, now) for s in self.services):
                    raise WireError(f"unexpected {msg.TAG} message from a worker")

    def _drain_and_close(self, child: Child) -> None:
        # A worker's last frames (final metrics) may still sit in the pipe.
        if child.from_fd >= 0:
            for _ in range(64):
                try:
                    data = os.read(child.from_fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                self._feed(child, data)
                if child.from_fd < 0:
                    break
        self._unregister(child)
        if child.to_fd >= 0:
            os.close(child.to_fd)
            child.to_fd = -1
        # Both reaping paths (_reap, _cleanup) end here; _reap reads culprit() first.
        if child.record is not None:
            child.record.close()
            child.record = None

    def _unregister(self, child: Child) -> None:
        if child.from_fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(child.from_fd)
            os.close(child.from_fd)
            child.from_fd = -1

    def send(self, pid: int, msg: wire.Message) -> None:
        """Send ``msg`` to worker ``pid`` if it is ours and alive; never blocks."""
        child = self.children.get(pid)
        if child is None or child.to_fd < 0:
            return
        try:
            os.write(child.to_fd, wire.encode(msg))
        except OSError as exc:
            # A full or broken pipe means a wedged or dead worker: the
            # supervisor's deadlines deal with it. A worker that just exited
            # (EPIPE) is no news.
            log.log(logging.DEBUG if exc.errno == errno.EPIPE else logging.WARNING,
                    "cannot send %s to worker pid=%d: %s", msg.TAG, pid, exc)

    def _kill(self, pid: int, sig: int) -> None:
        # Only a child not yet reaped: a reaped pid may already be another
        # process's (a frame drained after waitpid can still ask for a Kill).
        if pid not in self.children:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    # -- actions

    def apply(self, actions: list[Action]) -> None:
        """Carry out each action, then let every service see it."""
        for action in actions:
            self._carry_out(action)
            for service in self.services:
                service.after_action(action)

    def _carry_out(self, a: Action) -> None:
        assert self.sup is not None
        match a:
            case supervision.Spawn():
                try:
                    pid = self._fork(a.slot, a.incarnation, a.beside)
                except OSError as exc:  # EMFILE, EAGAIN, ENOMEM: the supervisor retries
                    self.apply(self.sup.spawn_failed(a.slot, exc.strerror or str(exc),
                                                     self.clock()))
                else:
                    self.apply(self.sup.spawned(a.slot, a.incarnation, pid, self.clock()))
            case supervision.SendStop():
                self.send(a.pid, wire.Stop(timeout=a.timeout, drain=a.drain))
            case supervision.Drain():
                self.send(a.pid, wire.Drain(
                    listeners=[lst.name for lst in self.cfg.listeners if lst.sessions]))
            case supervision.Kill():
                self._kill(a.pid, _SIGNALS[a.sig])
            case supervision.OpenSlot():
                self._open_slot(a.slot)
            case supervision.DetachSlot():
                self.sockets.detach_slot(a.slot)
            case supervision.CloseSlot():
                self.sockets.close_slot(a.slot)
                log.info("slot %d drained and closed", a.slot)
            case supervision.Lead():
                self._lead(a.pid)
            case supervision.Say():
                log.log(logging.getLevelName(a.level.upper()), "%s", a.message)
            case supervision.Exit():
                self.exit_code = a.code
                self.exit_reason = a.reason
                if a.code != ExitCode.OK and logs.to_file():
                    # On stderr the command line prints the reason; say it once.
                    log.error("%s", a.reason)
            case supervision.AllReady() | supervision.Stopping() | supervision.Retired():
                pass  # news for the services, nothing for the master itself to do
            case _:
                assert_never(a)

    def _open_slot(self, slot: int) -> None:
        assert self.sup is not None
        try:
            self.sockets.open_slot(slot)
        except (StartupError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.apply(self.sup.slot_open_failed(slot, reason))
        else:
            self.apply(self.sup.slot_opened(slot))

    def _lead(self, pid: int) -> None:
        single = [lst.name for lst in self.cfg.listeners
                  if lst.multicast and lst.multicast_mode == "single"]
        for name in single:
            self.send(pid, wire.Activate(listener=name, active=True))
        if single:
            log.info("worker pid=%d now reads single-mode listeners %s", pid, ", ".join(single))

    def _fork(self, slot: int, incarnation: int, beside: bool = False) -> int:
        if "twisted.internet.reactor" in sys.modules:
            # A reactor in the master would be inherited by every worker.
            log.error("BUG: a Twisted reactor was installed in the master before fork")
        slot_socks = self.sockets.for_slot(slot, beside)
        made: list[int] = []
        record: mmap.mmap | None = None
        try:
            from_r, from_w = os.pipe()
            made += (from_r, from_w)
            to_r, to_w = os.pipe()
            made += (to_r, to_w)
            record = inflight.new_record()
            initial = [m for s in self.services for m in s.for_new_worker(slot)]
            pid = os.fork()
        except OSError:
            for fd in made:
                os.close(fd)
            if record is not None:
                record.close()
            raise
        if pid == 0:  # pragma: no cover - runs in the child
            self._become_worker(slot, incarnation, slot_socks, to_r, from_w, record, initial)
        os.close(from_w)
        os.close(to_r)
        os.set_blocking(from_r, False)
        os.set_blocking(to_w, False)
        child = Child(pid, slot, incarnation, from_r, to_w, wire.Decoder(), record)
        self.children[pid] = child
        self.selector.register(from_r, selectors.EVENT_READ, child)
        return pid

    def _become_worker(self, slot: int, incarnation: int, slot_socks: list[SlotSocket],
                       read_fd: int, write_fd: int, record: mmap.mmap,
                       initial: list[wire.Message]) -> None:
        code: int = ExitCode.ERROR
        try:
            fds = [ss.sock.fileno() for ss in slot_socks]
            self.sockets.forget_in_child()
            own = [SlotSocket(ss.listener, socket.socket(fileno=fd), ss.kind, ss.gen)
                   for ss, fd in zip(slot_socks, fds, strict=True)]
            from . import worker

            spec = worker.WorkerSpec(
                slot=slot, incarnation=incarnation, master_pid=self.pid,
                read_fd=read_fd, write_fd=write_fd, sockets=own,
                datapath=self.datapath or self.cfg.datapath,
                metrics_interval=self.cfg.metrics_interval,
                heartbeat_interval=min(1.0, self.cfg.timeout / 4),
                graceful_timeout=self.cfg.graceful_timeout, run_as=self.run_as,
                record=record, initial=tuple(initial))
            code = worker.run(spec)
        except BaseException as exc:
            # One line, straight to stderr: logging itself may be what broke.
            # The master's exit line follows; the traceback is for debugging.
            with contextlib.suppress(Exception):
                os.write(2, f"shardudp: worker slot={slot} crashed: {type(exc).__name__}: "
                            f"{exc}\n".encode(errors="backslashreplace"))
            log.debug("worker slot=%d crashed", slot, exc_info=True)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _cleanup(self) -> None:
        for pid in list(self.children):
            self._kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while self.children and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            child = self.children.pop(pid, None)
            if child is not None:
                self._drain_and_close(child)
        self._close_services()
        self.sockets.close_all()
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

