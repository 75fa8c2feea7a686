"""The server: the master plus what hangs off it (metrics, control socket).

The master loop stays the only writer of every piece of state; the metrics
HTTP thread reads an immutable view the loop republishes when it changed.
"""

from __future__ import annotations

import logging
from typing import Any

from . import supervision, wire
from .config import ServerConfig
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

    # -- master hooks

    def before_spawn(self) -> None:
        self.publish()
        if self.cfg.metrics is not None:
            addr = self.cfg.metrics
            self.http, self.metrics_port = start_http(addr.host, addr.port, self.view,
                                                      self.healthy_view)
            host = f"[{addr.host}]" if ":" in addr.host else addr.host
            log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)

    def after_loop(self) -> None:
        if self._dirty:
            self.publish()

    def before_close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

    def on_metrics(self, child: Child, msg: wire.MetricsReport, now: float) -> None:
        try:
            self.book.report(msg.slot, msg.incarnation, msg.seq, msg.listeners, now)
        except MalformedReport as exc:
            raise wire.WireError(f"metrics report: {exc}") from None
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
            for index, slot in self.sup.slots.items():
                if slot.retiring:
                    continue
                w = self.sup.workers.get(slot.current) if slot.current is not None else None
                workers[index] = WorkerState(
                    pid=w.pid if w is not None else None,
                    ready=w is not None and w.state is WState.READY)
        socks = tuple((slot, ss.listener.name, ss.sock) for slot, ss in self.sockets.all_sockets())
        self.view.view = ExportView(book=self.book.snapshot(), workers=workers, sockets=socks,
                                    master_pid=self.pid)
        self._dirty = False
