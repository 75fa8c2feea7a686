"""The server: the master plus what hangs off it (metrics, control socket).

The master loop stays the only writer of every piece of state; the metrics
HTTP thread reads an immutable view the loop republishes when it changed.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import logging
import os
import pwd
from pathlib import Path
from typing import Any

from . import control, logs, sockstats, supervision, wire
from .config import ServerConfig
from .errors import StartupError, WireError
from .exporter import ExportView, LatestView, MetricsServer, WorkerState, start_http
from .master import Child, Master
from .metrics import MalformedReport, MetricsBook
from .supervision import WState

log = logging.getLogger("shardudp.master")


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
        self._pid_file_written = False
        self.started_at = self.clock()
        #: (time, {slot: datagrams received}) samples for status rates.
        self._rx_samples: collections.deque[tuple[float, dict[int, int]]] = \
            collections.deque(maxlen=16)

    # -- before binding

    def preflight(self) -> None:
        self.run_as = _resolve_user(self.cfg.user, self.cfg.group)
        if self.cfg.pid_file:
            _check_pid_file(self.cfg.pid_file)

    # -- master hooks

    def before_spawn(self) -> None:
        if self.cfg.pid_file:
            _write_pid_file(self.cfg.pid_file, self.pid)
            self._pid_file_written = True
        path = control.resolve_path(self.cfg.control)
        if path is not None:
            self.control = control.ControlServer(path, self.handle_control, self.selector,
                                                 self.clock)
            if self.run_as is not None:
                self.control.chown(*self.run_as)
            log.info("control socket %s", path)
        self.publish()
        if self.cfg.metrics is not None:
            addr = self.cfg.metrics
            self.http, self.metrics_port = start_http(addr.host, addr.port, self.view,
                                                      self.healthy_view)
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    def after_loop(self) -> None:
        if self.control is not None:
            self.control.expire()
        now = self.clock()
        if not self._rx_samples or now - self._rx_samples[-1][0] >= 1.0:
            self._rx_samples.append((now, self._rx_by_slot()))
        if self._dirty:
            self.publish()

    def before_close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if self.control is not None:
            self.control.close()
            self.control = None
        if self._pid_file_written and self.cfg.pid_file:
            with contextlib.suppress(OSError):
                if Path(self.cfg.pid_file).read_text().strip() == str(self.pid):
                    os.unlink(self.cfg.pid_file)

    # -- the control socket

    def handle_control(self, req: control.Request) -> Any:
        assert self.sup is not None
        now = self.clock()
        if req.cmd == "status":
            return self.status()
        if req.cmd == "scale":
            n = req.args["n"]
            if not 1 <= n <= 1024:
                raise control.ControlError(f"scale: n must be between 1 and 1024, got {n}")
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

    def status(self) -> dict[str, Any]:
        assert self.sup is not None
        now = self.clock()
        book = self.book.snapshot()
        rx = self._rx_by_slot()
        tx: dict[int, int] = collections.defaultdict(int)
        for series in book.listeners:
            tx[series.slot] += series.counts.tx_datagrams
        old = next((s for s in self._rx_samples if now - s[0] >= 1.0), None)
        drops: dict[int, int] = collections.defaultdict(int)
        for slot, ss in self.sockets.all_sockets():
            st = sockstats.read_sockets([ss.sock])[0]
            if st is not None:
                drops[slot] += st.drops
        slots = []
        for index, sl in sorted(self.sup.slots.items()):
            w = self.sup.workers.get(sl.current) if sl.current is not None else None
            rate = None
            if old is not None:
                rate = (rx.get(index, 0) - old[1].get(index, 0)) / max(now - old[0], 1e-9)
            slots.append({
                "slot": index,
                "pid": w.pid if w else None,
                "state": w.state.value if w else "down",
                "age": round(now - w.started, 3) if w else None,
                "rx": rx.get(index, 0),
                "tx": tx.get(index, 0),
                "rx_rate": None if rate is None else round(max(rate, 0.0), 1),
                "drops": drops.get(index, 0),
                "heartbeat_age": round(now - w.last_seen, 3) if w else None,
                "retiring": sl.retiring,
            })
        return {
            "master_pid": self.pid,
            "uptime": round(now - self.started_at, 3),
            "workers": self.sup.size,
            "healthy": self.sup.healthy(),
            "stopping": self.sup.stopping,
            "listeners": [lst.name for lst in self.cfg.listeners],
            "metrics_port": self.metrics_port,
            "slots": slots,
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

    def healthy_view(self) -> bool:
        view = self.view()
        return bool(view.workers) and not view.not_ready()

    def publish(self) -> None:
        workers: dict[int, WorkerState] = {}
        if self.sup is not None:
            for index, sl in self.sup.slots.items():
                if sl.retiring:
                    continue
                w = self.sup.workers.get(sl.current) if sl.current is not None else None
                workers[index] = WorkerState(
                    pid=w.pid if w is not None else None,
                    ready=w is not None and w.state is WState.READY)
        socks = tuple((slot, ss.listener.name, ss.sock) for slot, ss in self.sockets.all_sockets())
        self.view.view = ExportView(book=self.book.snapshot(), workers=workers, sockets=socks,
                                    master_pid=self.pid)
        self._dirty = False


def _resolve_user(user: str | None, group: str | None) -> tuple[int, int] | None:
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


def _check_pid_file(path: str) -> None:
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
    if not text.isdigit():
        return  # garbage: overwritten below
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass  # alive, owned by someone else
    raise StartupError(f"--pid-file {path}: process {pid} is still running")


def _write_pid_file(path: str, pid: int) -> None:
    tmp = f"{path}.{pid}.tmp"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(tmp).write_text(f"{pid}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
