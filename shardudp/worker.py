"""The worker: an I/O shell run in the child right after fork.

Order matters: route logging into our pipe, forget the master's state
(signals, fds), install our own reactor, say hello, build the protocols,
adopt the sockets, say READY. Only this module (imported after fork)
installs a reactor; the master merely preloads Twisted's modules.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import importlib
import logging
import os
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Final

import twisted

from . import logs, wire
from .config import Listener
from .errors import ExitCode
from .socketset import SlotSocket
from .stats import ListenerStats

log = logging.getLogger("shardudp.worker")

PR_SET_PDEATHSIG: Final = 1
#: Bound of one drain: a stopping worker reads at most this many queued datagrams.
DRAIN_LIMIT: Final = 1_000_000
DRAIN_CHUNK: Final = 1024
#: Pending pipe bytes past which periodic frames are dropped, not queued:
#: they are cumulative, so the next one supersedes a lost one.
PIPE_BACKLOG: Final = 256 * 1024
#: Log records are dropped sooner, so they never crowd out heartbeats.
LOG_BACKLOG: Final = 64 * 1024
#: How long a worker whose master died may take to stop.
ORPHAN_GRACE: Final = 2.0
#: The process-level deadline (SIGALRM) trails the reactor's own by this much.
BACKSTOP_MARGIN: Final = 0.5


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
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


#: Where code that is not the user's lives (computed before dropping privileges).
_NOT_USER: Final = ("<", os.path.dirname(__file__) + os.sep,
                    os.path.dirname(twisted.__file__) + os.sep)
_STDLIB: Final = tuple({sysconfig.get_path(k) + os.sep for k in ("stdlib", "platstdlib")})


class AppError(Exception):
    """The APP cannot be imported, built or started.

    The text reads after the APP's name ("APP 'm:P' failed in import at
    ..."); ``cause`` is what the APP raised, if it raised.
    """

    def __init__(self, problem: str, cause: BaseException | None = None) -> None:
        super().__init__(problem)
        self.cause = cause


def _raised(phase: str, exc: BaseException) -> AppError:
    where = _user_frame(exc)
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return AppError(f"failed in {phase}{f' at {where}' if where else ''}: {what}", exc)


def _user_frame(exc: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``exc`` in the user's code.

    That is any frame outside shardudp, Twisted, importlib and the standard
    library (a library installed in site-packages counts as the user's).
    """
    if isinstance(exc, SyntaxError) and exc.filename:  # raised by the compiler: no frame
        return f"{exc.filename}:{exc.lineno}"
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if path.startswith(_NOT_USER) or (path.startswith(_STDLIB) and "-packages" not in path):
            continue
        where = f"{path}:{lineno}"
    return where


def _unreadable(exc: BaseException | None) -> bool:
    """Whether ``exc`` or an exception in its cause chain says a file could not be read.

    An APP directory the worker's user may not list shows up as
    ModuleNotFoundError, an unreadable file as PermissionError.
    """
    for _ in range(16):  # a cause chain may loop
        if exc is None:
            return False
        if isinstance(exc, ImportError) or (isinstance(exc, OSError)
                                            and exc.errno in (errno.EACCES, errno.EPERM)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_app(spec: str) -> Callable[[], Any]:
    """Resolve ``module:attr`` to a zero-argument protocol factory."""
    from twisted.internet.protocol import AbstractDatagramProtocol

    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except BaseException as exc:  # an APP calling sys.exit() at import still gets a reason
        raise _raised("import", exc) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppError(f"names nothing: module {module_name!r} has no attribute {attr!r}") \
                from None
    if isinstance(obj, type) and not issubclass(obj, AbstractDatagramProtocol):
        raise AppError("is a class but not a DatagramProtocol subclass")
    if not callable(obj):
        raise AppError("is neither a DatagramProtocol subclass nor a callable")

    def build() -> Any:
        try:
            proto = obj()
        except BaseException as exc:
            raise _raised("build", exc) from None
        if not isinstance(proto, AbstractDatagramProtocol):
            raise AppError(f"returned {type(proto).__name__}, not a DatagramProtocol instance")
        return proto

    return build


@contextlib.contextmanager
def _booting(listener: Listener) -> Iterator[None]:
    """Name the APP and the listener in an AppError raised inside."""
    try:
        yield
    except AppError as exc:
        raise AppError(f"APP {listener.app!r} (listener {listener.name}) {exc}",
                       exc.cause) from None


def _close_foreign_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _die_with_master(master_pid: int) -> None:
    """SIGTERM us when the master dies, even by kill -9.

    Called after dropping privileges: a credential change clears the setting.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the pipe EOF still tells us
    if os.getppid() != master_pid:
        os._exit(ExitCode.ERROR)


def _arm_backstop(seconds: float) -> None:
    """Die by SIGALRM in ``seconds`` unless an earlier deadline is already armed.

    The graceful stop runs in the reactor; a reactor blocked in user code
    never gets there, and an orphan has nobody to KILL it. The kernel timer
    needs no Python code to run.
    """
    left = signal.getitimer(signal.ITIMER_REAL)[0]
    if left == 0 or left > seconds:
        signal.setitimer(signal.ITIMER_REAL, seconds)


class PipeWriter:
    """Non-blocking frames to the master; never wedges the reactor.

    Thread-safe: log records may come from any thread. ``on_error`` hears of
    a write error other than EAGAIN once; the writer is dead afterwards.

    A finalizer (Twisted's "Unhandled error in Deferred") or a signal handler
    may log, and so call ``send`` again, while this thread is inside it. Frames
    are therefore encoded before any lock is taken, and queued without one;
    a re-entrant ``flush`` leaves the writing to the call it interrupted,
    instead of waiting forever for the lock that call holds.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.broken = False
        self.on_error: Callable[[OSError], None] | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._inside = threading.local()
        os.set_blocking(fd, False)

    def send(self, msg: wire.Message, *, droppable: bool = False,
             backlog: int = PIPE_BACKLOG) -> bool:
        """Queue and try to write ``msg``; False if it was dropped."""
        if self.broken or (droppable and len(self.buf) > backlog):
            return False  # before encoding: a log flood must not pay for what it drops
        self._queue.append(wire.encode(msg))
        self.flush()
        return True

    def flush(self) -> None:
        if getattr(self._inside, "flushing", False):
            return  # re-entered on this thread: the flush it interrupted (or the next) writes
        # Set before taking the lock: a handler running while we wait for it
        # must not wait too.
        self._inside.flushing = True
        try:
            with self._lock:
                error = self._flush_locked()
        finally:
            self._inside.flushing = False
        if error is not None and self.on_error is not None:
            self.on_error(error)

    def _flush_locked(self) -> OSError | None:
        while not self.broken:
            while self._queue:
                self.buf += self._queue.popleft()
            if not self.buf:
                return None
            try:
                n = os.write(self.fd, self.buf)
            except BlockingIOError:
                return None
            except OSError as exc:
                self.broken = True
                self.buf.clear()
                self._queue.clear()
                return exc
            del self.buf[:n]
        return None

    def flush_blocking(self, timeout: float) -> None:
        import select

        deadline_polls = max(1, int(timeout / 0.05))
        for _ in range(deadline_polls):
            self.flush()
            if not (self.buf or self._queue) or self.broken:
                return
            select.select([], [self.fd], [], 0.05)


class Worker:
    def __init__(self, spec: WorkerSpec, reactor: Any, out: PipeWriter) -> None:
        self.spec = spec
        self.reactor = reactor
        self.out = out
        out.on_error = self._pipe_failed
        self.decoder = wire.Decoder()
        self.ports: dict[str, Any] = {}
        self.kinds: dict[str, str] = {}
        self.stats: dict[str, ListenerStats] = {}
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
            if isinstance(msg, wire.Stop):
                self.stop(msg.timeout, drain=msg.drain)
            elif isinstance(msg, wire.Activate):
                self.activate(msg.listener, msg.active)
        if decoded.error is not None:
            log.error("bad frame from the master (%s); stopping", decoded.error)
            self.reactor.removeReader(self)
            self.stop(self.spec.graceful_timeout, drain=False)

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
            with _booting(ss.listener):
                factories[ss.listener.name] = load_app(ss.listener.app)
        cls = port_class(self.spec.datapath)
        counting = self.spec.metrics_interval > 0
        for ss in self.spec.sockets:
            name = ss.listener.name
            stats = ListenerStats() if counting else None
            if stats is not None:
                self.stats[name] = stats
            with _booting(ss.listener):
                proto = factories[name]()
            port: Any = cls.adopt(ss.sock, proto, self.reactor, stats=stats, shared=ss.shared,
                                  max_packet_size=ss.listener.max_packet_size,
                                  multicast_interface=ss.listener.multicast_interface or "")
            with _booting(ss.listener):
                try:
                    port.startListening()  # runs the APP's startProtocol
                except BaseException as exc:  # SystemExit from startProtocol too
                    raise _raised("startProtocol", exc) from None
            if ss.kind == "single":
                port.stopReading()  # standby until the master names us leader
            self.ports[name] = port
            self.kinds[name] = ss.kind
            # The port holds its own dup; ours would keep the file open twice.
            ss.sock.close()

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
        _arm_backstop(timeout + BACKSTOP_MARGIN)
        if drain:
            # Half the deadline at most: stopProtocol and the last report need time too.
            self._drain(time.monotonic() + timeout / 2)
        from twisted.internet import defer

        waits = [d for d in (port.stopListening() for port in self.ports.values()) if d]
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
        _arm_backstop(timeout + BACKSTOP_MARGIN)
        worker.reactor.callFromThread(worker.stop, timeout, drain=False)

    signal.signal(signal.SIGTERM, on_term)
    _ignore_group_signals()


def _ignore_group_signals() -> None:
    # A terminal (or `timeout`) signals the whole process group; the master
    # alone decides what Ctrl-C, hangup and TTIN/TTOU mean.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)


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
    _ignore_group_signals()
    keep = {0, 1, 2, spec.read_fd, spec.write_fd}
    keep |= {ss.sock.fileno() for ss in spec.sockets}
    # Before dropping privileges: after setuid /proc/self/fd is not ours to list.
    _close_foreign_fds(keep)
    os.set_blocking(spec.read_fd, False)

    # Our own code (the reactor, Twisted) loads with the master's rights; the
    # APP, which is user code, only after dropping them.
    from twisted.internet import task  # noqa: F401
    from twisted.internet.protocol import DatagramProtocol  # noqa: F401
    from twisted.logger import STDLibLogObserver, globalLogBeginner

    from . import reactor as shard_reactor

    reactor: Any = shard_reactor.install(spec.datapath)
    if spec.run_as is not None:
        uid, gid = spec.run_as
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    _die_with_master(spec.master_pid)
    observer: Any = STDLibLogObserver()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    worker = Worker(spec, reactor, out)
    worker.out.send(wire.Hello(slot=spec.slot, incarnation=spec.incarnation, pid=os.getpid()))

    try:
        worker.boot()
    except AppError as exc:
        reason = str(exc)
        if spec.run_as is not None and _unreadable(exc.cause):
            reason += (f" (the worker runs as uid {spec.run_as[0]}: are the Python installation "
                       "and the APP readable by that user?)")
        if exc.cause is not None:
            log.debug("boot failure detail:\n%s",
                      "".join(traceback.format_exception(exc.cause)))
        return _boot_failed(worker, reason)

    from twisted.internet.task import LoopingCall

    reactor.addReader(worker)
    LoopingCall(worker.heartbeat).start(spec.heartbeat_interval, now=False)
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
