"""The server: the master plus what hangs off it (metrics, control socket).

The master loop stays the only writer of every piece of state; the metrics
HTTP thread reads an immutable view the loop republishes when it changed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import grp
import logging
import os
import pwd
from pathlib import Path
from typing import Any, Final

from . import control, logs, supervision, wire
from .config import BY_KEY, ServerConfig
from .errors import ExitCode, StartupError, WireError
from .exporter import ExportView, LatestView, MetricsServer, WorkerState, start_http
from .master import Child, Master
from .metrics import MalformedReport, MetricsBook
from .supervision import WState

log = logging.getLogger("shardudp.master")

#: /healthz fails for a READY worker silent this long, or for --timeout if
#: shorter. Workers heartbeat at least once a second (master.py), so this is
#: three missed heartbeats or more; the supervisor kills it at --timeout.
SILENT_AFTER: Final = 3.0


class Server(Master):
    def __init__(self, cfg: ServerConfig, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.book = MetricsBook()
        self.view = LatestView()
        self.http: MetricsServer | None = None
        self.metrics_port: int | None = None
        self._dirty = True
        self.hooks.append(self._on_action)
        self.control: control.ControlServer | None = None
        self._pid_fd: int | None = None
        self.started_at = self.clock()
        #: (time, {slot: datagrams received}) samples for status rates, one a
        #: second: the newest one at least 1 s old is among the last two.
        self._rx_samples: collections.deque[tuple[float, dict[int, int]]] = \
            collections.deque(maxlen=4)
        #: Slots whose READY worker has not been heard from for SILENT_AFTER.
        self._silent: frozenset[int] = frozenset()

    # -- before binding

    def run(self) -> ExitCode:
        try:
            return super().run()
        except BaseException:
            self.before_close()  # (idempotent) what preflight claimed, if startup failed
            raise

    def preflight(self) -> None:
        """Claim the pid file and the control socket before any UDP socket is bound.

        A second server that clashes on either is refused having bound nothing.
        """
        self.run_as = resolve_user(self.cfg.user, self.cfg.group)
        if self.cfg.pid_file:
            self._pid_fd = _claim_pid_file(self.cfg.pid_file, self.pid)
        path = control.resolve_path(self.cfg.control)
        if path is not None:
            self.control = control.ControlServer(path, self.handle_control, self.selector,
                                                 self.clock)
            log.info("control socket %s", path)

    # -- master hooks

    def before_spawn(self) -> None:
        self.publish()
        if self.cfg.metrics is not None:
            addr = self.cfg.metrics
            self.http, self.metrics_port = start_http(addr.host, addr.port, self.view,
                                                      self.healthy_view)
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    def _apply_one(self, a: supervision.Action) -> None:
        if isinstance(a, supervision.AllReady):
            # Before "all N workers ready" and READY=1 go out: whoever acts on
            # them (a test, systemd, a deploy script) must find /healthz at 200.
            self.publish()
        super()._apply_one(a)

    def after_loop(self) -> None:
        if self.control is not None:
            self.control.expire()
        now = self.clock()
        if not self._rx_samples or now - self._rx_samples[-1][0] >= 1.0:
            self._rx_samples.append((now, self._rx_by_slot()))
        silent = self._silent_slots(now)
        if silent != self._silent:
            self._silent = silent
            self._dirty = True
        if self._dirty:
            self.publish()

    def before_close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._pid_fd is not None and self.cfg.pid_file:
            _release_pid_file(self.cfg.pid_file, self._pid_fd)
            self._pid_fd = None

    # -- the control socket

    def handle_control(self, req: control.Request) -> Any:
        assert self.sup is not None
        now = self.clock()
        if req.cmd == "status":
            return self.status()
        if req.cmd == "scale":
            try:
                n = BY_KEY["workers"].parse(req.args["n"])
            except ValueError as exc:
                raise control.ControlError(f"scale: {exc}") from None
            self.apply(self.sup.scale(n, now))
            return {"workers": n}
        if req.cmd == "reload":
            self.apply(self.sup.reload(now))
            return "reloading"
        if req.cmd == "stop":
            self.shutdown("stop requested on the control socket")
            return "stopping"
        if req.cmd == "reopen-logs":
            return "reopened" if logs.reopen() else "logging to stderr: nothing to reopen"
        raise control.ControlError(f"unhandled command {req.cmd!r}")

    def _rx_by_slot(self) -> dict[int, int]:
        out: dict[int, int] = collections.defaultdict(int)
        for series in self.book.snapshot().listeners:
            out[series.slot] += series.counts.rx_datagrams
        return dict(out)

    @property
    def counting(self) -> bool:
        """Whether workers count traffic (--metrics-interval 0 turns it off)."""
        return self.cfg.metrics_interval > 0

    def status(self) -> dict[str, Any]:
        assert self.sup is not None
        now = self.clock()
        book = self.book.snapshot()
        rx = self._rx_by_slot()
        tx: dict[int, int] = collections.defaultdict(int)
        for series in book.listeners:
            tx[series.slot] += series.counts.tx_datagrams
        # The newest sample at least 1 s old: a current rate, not a trailing average.
        old = next((s for s in reversed(self._rx_samples) if now - s[0] >= 1.0), None)
        # The exporter's numbers: per slot what its own sockets dropped; the
        # listener total adds what belongs to no one slot (single, shard).
        drops: dict[int, int] = collections.defaultdict(int)
        listener_drops: dict[str, int] = collections.defaultdict(int)
        for (label, name), n in self.sockets.kernel_stats().drops.items():
            listener_drops[name] += n
            if label.isdigit():
                drops[int(label)] += n
        slots = []
        for index, sl in sorted(self.sup.slots.items()):
            w = self.sup.workers.get(sl.current) if sl.current is not None else None
            rate = None
            if old is not None and self.counting:
                rate = (rx.get(index, 0) - old[1].get(index, 0)) / max(now - old[0], 1e-9)
            slots.append({
                "slot": index,
                "pid": w.pid if w else None,
                "state": w.state.value if w else "down",
                "age": round(now - w.started, 3) if w else None,
                # None, not 0, when nothing counts: zero would read as no traffic.
                "rx": rx.get(index, 0) if self.counting else None,
                "tx": tx.get(index, 0) if self.counting else None,
                "rx_rate": None if rate is None else round(max(rate, 0.0), 1),
                "drops": drops.get(index, 0),
                "heartbeat_age": round(now - w.last_seen, 3) if w else None,
                "retiring": sl.retiring,
            })
        return {
            "master_pid": self.pid,
            "uptime": round(now - self.started_at, 3),
            "workers": self.sup.size,
            "healthy": self.sup.healthy() and not self._silent,
            "silent_slots": sorted(self._silent),
            "counting": self.counting,
            "stopping": self.sup.stopping,
            "listeners": [lst.name for lst in self.cfg.listeners],
            "metrics_port": self.metrics_port,
            "slots": slots,
            "listener_drops": dict(listener_drops),
        }

    def on_metrics(self, child: Child, msg: wire.MetricsReport, now: float) -> None:
        try:
            self.book.report(msg.slot, msg.incarnation, msg.seq, msg.listeners, now)
        except MalformedReport as exc:
            raise WireError(f"metrics report: {exc}") from None
        self._dirty = True

    def _on_action(self, a: supervision.Action) -> None:
        if isinstance(a, supervision.Retired):
            self.book.retire(a.slot, a.incarnation)
            if a.reason:
                self.book.restart(a.slot, a.reason)
        self._dirty = True

    # -- the view

    def _silent_slots(self, now: float) -> frozenset[int]:
        assert self.sup is not None
        bound = min(self.cfg.timeout, SILENT_AFTER)
        silent = set()
        for index, sl in self.sup.slots.items():
            w = self.sup.workers.get(sl.current) if sl.current is not None else None
            if w is not None and w.state is WState.READY and now - w.last_seen > bound:
                silent.add(index)
        return frozenset(silent)

    def healthy_view(self) -> bool:
        view = self.view()
        return bool(view.workers) and not view.not_ready() and not view.silent()

    def publish(self) -> None:
        workers: dict[int, WorkerState] = {}
        if self.sup is not None:
            for index, sl in self.sup.slots.items():
                if sl.retiring:
                    continue
                w = self.sup.workers.get(sl.current) if sl.current is not None else None
                workers[index] = WorkerState(
                    pid=w.pid if w is not None else None,
                    ready=w is not None and w.state is WState.READY,
                    silent=index in self._silent)
        socks = tuple((slot, ss.listener.name, ss.sock) for slot, ss in self.sockets.all_sockets())
        dp = None if self.datapath is None else (self.cfg.datapath, self.datapath)
        self.view.view = ExportView(book=self.book.snapshot(), workers=workers, sockets=socks,
                                    master_pid=self.pid, kernel=self.sockets.kernel_stats,
                                    counting=self.counting, datapath=dp)
        self._dirty = False


def resolve_user(user: str | None, group: str | None) -> tuple[int, int] | None:
    if user is None and group is None:
        return None
    if os.geteuid() != 0:
        raise StartupError("--user/--group need the master to start as root")
    try:
        pw = pwd.getpwnam(user) if user is not None else pwd.getpwuid(0)
    except KeyError:
        raise StartupError(f"--user: no such user {user!r}") from None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartupError(f"--group: no such group {group!r}") from None
    return pw.pw_uid, gid


def _claim_pid_file(path: str, pid: int) -> int:
    """Write ``pid`` to ``path`` and lock it for the master's life; return the fd.

    The lock makes check-and-write one step: of two servers started together
    one gets it, the other is refused. A file nobody locks is stale (its server
    is gone) and is taken over, unless it names a live process.
    """
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
    for _ in range(3):  # a server exiting may unlink the file between open and lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StartupError(f"--pid-file {path}: process {holder or '(starting)'} is still "
                               "running") from None
        if not _same_file(fd, path):
            os.close(fd)
            continue
        holder = _read_pid(fd)
        if holder is not None and holder != pid and _alive(holder):
            os.close(fd)  # e.g. a server from before pid files were locked
            raise StartupError(f"--pid-file {path}: process {holder} is still running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)
        return fd
    raise StartupError(f"--pid-file {path}: replaced while we claimed it; is another server "
                       "starting?")


def _release_pid_file(path: str, fd: int) -> None:
    if _same_file(fd, path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    os.close(fd)  # drops the lock


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    return True
