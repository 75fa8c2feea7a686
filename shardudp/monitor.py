"""The master's monitoring service: worker reports in, the view /metrics and /healthz serve out.

The master loop stays the only writer of every piece of state; the HTTP
endpoint reads an immutable ``ExportView`` that this service republishes
whenever something changed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Mapping
from types import MappingProxyType

from . import exporter, httpd, logs, sessions, supervision, wire
from .config import Address
from .errors import WireError
from .exporter import ExportView, LatestView, MasterState, SlotWorker
from .httpd import HttpEndpoint
from .master import Child
from .metrics import MalformedReport, MetricsBook
from .poison import Poison
from .services import Service
from .steerer import Steerer
from .supervision import WorkerState

log = logging.getLogger("shardudp.master")



@dataclasses.dataclass(frozen=True)
class SlotTraffic:
    """What one slot's workers counted, for ``status``: None where nothing counts."""

    rx: int | None
    tx: int | None
    rx_rate: float | None


class Monitor(Service):
    """Owns the metrics book (worker reports, restarts), the published view and the
    HTTP endpoint serving it; answers ``status`` its traffic numbers and health.
    """

    def __init__(self, metrics: bool = True) -> None:
        #: The HTTP endpoint's descriptors, if it serves one.
        self.fds = httpd.FDS_USED if metrics else 0
        self.book = MetricsBook()
        self.view = LatestView()
        self.http: HttpEndpoint | None = None
        self.metrics_port: int | None = None
        self._dirty = True
        #: (time, {slot: datagrams received}) samples for status rates, one a
        #: second: the newest one at least 1 s old is among the last two.
        self._rx_samples: collections.deque[tuple[float, dict[int, int]]] = \
            collections.deque(maxlen=4)
        #: Slots whose READY worker has not been heard from for SILENT_AFTER.
        self.silent: frozenset[int] = frozenset()
        self._state = MasterState()
        #: Listeners whose truncated datagrams were reported in the log already.
        self._truncation_said: set[str] = set()

    # -- hooks

    def started(self) -> None:
        self.publish()
        addr = self.master.cfg.metrics
        if addr is not None:
            paths = exporter.routes(self.view, self.healthy_view, clock=self.master.clock)
            self.http = exporter.serve(addr.host, addr.port, paths, self.master.selector,
                                       clock=self.master.clock)
            self.metrics_port = self.http.port
            log.info("metrics on http://%s/metrics", Address(addr.host, self.metrics_port))

    def after_action(self, action: supervision.Action) -> None:
        if isinstance(action, supervision.Retired):
            self.book.retire(action.slot, action.incarnation)
            if action.reason is not None:
                self.book.restart(action.slot, action.reason)
        if isinstance(action, supervision.AllReady):
            # Published now, not at the end of the turn: the announcement of
            # READY that follows must find /healthz at 200.
            self.publish()
        else:
            self._dirty = True

    def on_message(self, child: Child, msg: wire.Message, now: float) -> bool:
        if not isinstance(msg, wire.MetricsReport):
            return False
        if (msg.slot, msg.incarnation) != (child.slot, child.incarnation):
            raise WireError("metrics report names another worker")
        try:
            self.book.report(msg.slot, msg.incarnation, msg.seq, msg.listeners, now)
        except MalformedReport as exc:
            raise WireError(f"metrics report: {exc}") from None
        self._note_truncation(msg)
        self._dirty = True
        return True

    def _note_truncation(self, msg: wire.MetricsReport) -> None:
        """Say once per listener that datagrams were cut, and what would fit them."""
        for lst in self.master.cfg.listeners:
            raw = msg.listeners.get(lst.name)
            if lst.name in self._truncation_said or not isinstance(raw, dict) \
                    or not raw.get("truncated"):
                continue
            self._truncation_said.add(lst.name)
            longest = raw.get("truncated_max")
            fit = (f"the longest was {longest} bytes: set max_packet_size to at least {longest}"
                   if isinstance(longest, int) and longest > 0
                   else "raise max_packet_size (this data path cannot tell by how much)")
            log.warning("listener %s: datagrams longer than max_packet_size (%d bytes) were "
                        "cut; %s", lst.name, lst.max_packet_size, fit)

    def after_turn(self, now: float) -> None:
        if self.http is not None:
            self.http.expire(now)
        if not self._rx_samples or now - self._rx_samples[-1][0] >= 1.0:
            self._rx_samples.append((now, self._rx_by_slot()))
            # Nothing reports without counting: the ages are the heartbeats', kept fresh.
            self._dirty |= not self.counting
        silent = self._silent_slots(now)
        if silent != self.silent:
            self.silent = silent
            self._dirty = True
        state = self._master_state()
        if state != self._state:
            self._dirty = True
        if self._dirty:
            self.publish(state)

    def deadline(self) -> float | None:
        return self.http.next_deadline() if self.http is not None else None

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None

    # -- queries

    @property
    def counting(self) -> bool:
        """Whether workers count traffic (--metrics-interval 0 turns it off)."""
        return self.master.cfg.metrics_interval > 0

    def traffic(self, now: float) -> dict[int, SlotTraffic]:
        """Per slot: datagrams received and sent, and the current receive rate."""
        rx = self._rx_by_slot()
        tx: dict[int, int] = collections.defaultdict(int)
        for series in self.book.snapshot().listeners:
            tx[series.slot] += series.counts.tx_datagrams
        # The newest sample at least 1 s old: a current rate, not a trailing average.
        old = next((s for s in reversed(self._rx_samples) if now - s[0] >= 1.0), None)
        slots = set(rx) | set(tx) | set(self.master.sup.slots if self.master.sup else ())
        out = {}
        for slot in slots:
            rate = None
            if old is not None and self.counting:
                rate = round(max((rx.get(slot, 0) - old[1].get(slot, 0))
                                 / max(now - old[0], 1e-9), 0.0), 1)
            out[slot] = SlotTraffic(rx.get(slot, 0) if self.counting else None,
                                    tx.get(slot, 0) if self.counting else None, rate)
        return out

    def healthy_view(self) -> bool:
        view = self.view()
        return (bool(view.workers) and not view.not_ready() and not view.silent()
                and not view.not_serving())

    # -- internals

    def _rx_by_slot(self) -> dict[int, int]:
        out: dict[int, int] = collections.defaultdict(int)
        for series in self.book.snapshot().listeners:
            out[series.slot] += series.counts.rx_datagrams
        return dict(out)

    def _silent_slots(self, now: float) -> frozenset[int]:
        sup = self.master.sup
        if sup is None:
            return frozenset()
        silent = set()
        for index, sl in sup.slots.items():
            w = sup.workers.get(sl.current) if sl.current is not None else None
            if w is not None and sup.silent(w, now):
                silent.add(index)
        return frozenset(silent)

    def _master_state(self) -> MasterState:
        master = self.master
        steerer, poison = master.service(Steerer), master.service(Poison)
        return MasterState(
            listeners=tuple(lst.name for lst in master.cfg.listeners),
            not_serving=MappingProxyType({k: v.value for k, v in steerer.not_serving().items()})
            if steerer is not None else MappingProxyType({}),
            steered=frozenset(steerer.steered()) if steerer is not None else frozenset(),
            quarantined=MappingProxyType(poison.counts() if poison is not None else {}),
            log_dropped=logs.dropped(),
            sessions=MappingProxyType(self._sessions(steerer)))

    def _sessions(self, steerer: Steerer | None
                  ) -> dict[str, tuple[int, int, Mapping[str, int], int]]:
        if steerer is None:
            return {}
        out: dict[str, tuple[int, int, Mapping[str, int], int]] = {}
        for lst in self.master.cfg.listeners:
            if not lst.sessions:
                continue
            t = steerer.book.tally.get(lst.name) or sessions.Tally()
            out[lst.name] = (steerer.book.pinned(lst.name), t.drained,
                             MappingProxyType({c.value: n for c, n in t.cut.items()}), t.moved)
        return out

    def publish(self, state: MasterState | None = None) -> None:
        """Replace the view the HTTP endpoint serves with one of the current state.

        ``state``: the services' state, if the caller just built it (building it
        asks every listener's slots whether they are served).
        """
        master = self.master
        workers: dict[int, SlotWorker] = {}
        if master.sup is not None:
            for index, sl in master.sup.slots.items():
                if sl.retiring:
                    continue
                w = master.sup.workers.get(sl.current) if sl.current is not None else None
                workers[index] = SlotWorker(
                    pid=w.pid if w is not None else None,
                    ready=w is not None and w.state is WorkerState.READY,
                    # Without counting its last report is its heartbeat.
                    last_report_at=None if self.counting or w is None else w.last_seen,
                    silent=index in self.silent)
        socks = tuple((slot, ss.listener.name, ss.sock)
                      for slot, ss in master.sockets.all_sockets())
        dp = None if master.datapath is None else (master.cfg.datapath, master.datapath)
        self._state = state if state is not None else self._master_state()
        self.view.view = ExportView(book=self.book.snapshot(), workers=workers, sockets=socks,
                                    master_pid=master.pid, kernel=master.sockets.kernel_stats,
                                    counting=self.counting, datapath=dp, master=self._state)
        self._dirty = False
