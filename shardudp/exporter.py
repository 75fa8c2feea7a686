"""Prometheus exposition: a custom collector over the master's state, and its HTTP routes.

The master's loop owns every mutable thing. It publishes an immutable
``ExportView`` by one attribute assignment (see ``LatestView``); a scrape
only ever reads whole views. The routes are served by ``httpd.HttpEndpoint``
from the master's own selector: no thread. Kernel socket stats and /proc are
read at scrape time, here, so drops are counted even while a worker is down
or stopped: the master holds the sockets.

The master never imports twisted; neither does this module (its version comes
from package metadata).
"""

from __future__ import annotations

import math
import platform
import selectors
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from types import MappingProxyType
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from shardudp import sockstats
from shardudp.drops import SHARED
from shardudp.httpd import HttpEndpoint, Response, Route, plain
from shardudp.metrics import (
    RESTART_REASONS,
    ZERO,
    BookSnapshot,
    ListenerSeries,
)
from shardudp.stats import SAMPLE_EVERY

DEFAULT_HOST: Final = "127.0.0.1"
_SL: Final = ("slot", "listener")


@dataclass(frozen=True, slots=True)
class BuildInfo:
    """Versions exported as ``shardudp_build_info``."""

    version: str
    python: str
    twisted: str


def _dist_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


@cache
def build_info() -> BuildInfo:
    """Versions from package metadata: importing twisted here is forbidden."""
    version = _dist_version("shardudp")
    if version == "unknown":  # running from a source tree, not installed
        from shardudp import __version__ as version
    return BuildInfo(
        version=version,
        python=platform.python_version(),
        twisted=_dist_version("twisted"),
    )


@dataclass(frozen=True, slots=True)
class SlotWorker:
    """What the master knows about the process currently serving one slot.

    ``last_report_at`` is on the collector's clock (``time.monotonic`` unless
    told otherwise); None means "take it from the book", which is stamped with
    the ``now`` the master passed to ``MetricsBook.report``. ``started_at`` is
    Unix time, used for the start-time metric only when /proc cannot say.
    ``silent`` means READY but not heard from lately (stopped, wedged): not healthy.
    """

    pid: int | None
    ready: bool
    started_at: float | None = None
    last_report_at: float | None = None
    silent: bool = False


@dataclass(frozen=True, slots=True)
class MasterState:
    """What the master's services decided, as /metrics and /healthz show it.

    ``not_serving`` maps (slot, listener) to why no worker reads it;
    ``steered`` are those whose flows go to other slots now; ``quarantined``
    counts sources in quarantine per listener; ``log_dropped`` is how many
    log records the master's output could not take.
    """

    listeners: tuple[str, ...] = ()
    not_serving: Mapping[tuple[int, str], str] = field(
        default_factory=lambda: MappingProxyType({}))
    steered: frozenset[tuple[int, str]] = frozenset()
    quarantined: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    log_dropped: int = 0
    #: Session keeping, per listener: (held now, drained, {cut reason: n}, moved by scaling).
    sessions: Mapping[str, tuple[int, int, Mapping[str, int], int]] = field(
        default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class ExportView:
    """Everything one scrape needs, frozen. Build a new one to change anything.

    ``sockets`` lists each kernel socket the master holds as (slot, listener,
    socket); a socket shared by several slots may be listed under each.
    ``kernel`` reads those sockets' drops, queues and buffers at scrape time
    (``SocketSet.kernel_stats``, the one source of truth ``status`` uses too),
    so drops count even while a worker is down or stopped. ``counting`` is False
    when workers count nothing (--metrics-interval 0): the traffic and handler
    series are then left out rather than exported as zeros that read as no traffic.
    """

    book: BookSnapshot = field(default_factory=BookSnapshot)
    workers: Mapping[int, SlotWorker] = field(default_factory=lambda: MappingProxyType({}))
    sockets: tuple[tuple[int, str, socket.socket], ...] = ()
    master_pid: int | None = None
    kernel: Callable[[], sockstats.KernelStats] | None = None
    build: BuildInfo = field(default_factory=build_info)
    counting: bool = True
    # (--datapath as configured, what the workers run): which port the data
    # path is on, so a deploy that fell back to a slower one can be alerted on.
    datapath: tuple[str, str] | None = None
    master: MasterState = field(default_factory=MasterState)

    def __post_init__(self) -> None:
        # A view is what was published, however its builder goes on to change
        # the dict or list it passed in.
        object.__setattr__(self, "workers", MappingProxyType(dict(self.workers)))
        object.__setattr__(self, "sockets", tuple(self.sockets))

    def not_ready(self) -> list[int]:
        return sorted(s for s, w in self.workers.items() if w.pid is None or not w.ready)

    def silent(self) -> list[int]:
        return sorted(s for s, w in self.workers.items() if w.ready and w.silent)

    def not_serving(self) -> Mapping[tuple[int, str], str]:
        """(slot, listener) -> why nobody reads it, for current slots only.

        Current by construction: the monitor builds ``workers`` and
        ``master.not_serving`` from the same turn's slots, and
        ``Supervisor.serving`` skips the retiring ones ``workers`` leaves out.
        """
        return self.master.not_serving


class LatestView:
    """The routes' source: the master's loop publishes a view by assigning ``view``.

    Routes hold this object, not a view, so each scrape reads the latest one.
    """

    def __init__(self, view: ExportView | None = None) -> None:
        self.view = view if view is not None else ExportView()

    def __call__(self) -> ExportView:
        return self.view


def _counter(name: str, doc: str, labels: Sequence[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: Sequence[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


# (family name, HELP, Counts attribute) of the per-listener traffic counters.
_TRAFFIC: Final = (
    ("shardudp_datagrams_received_total", "Datagrams handed to the protocol.", "rx_datagrams"),
    ("shardudp_datagrams_sent_total", "Datagrams the protocol sent.", "tx_datagrams"),
    ("shardudp_bytes_received_total", "Payload bytes received.", "rx_bytes"),
    ("shardudp_bytes_sent_total", "Payload bytes sent.", "tx_bytes"),
    ("shardudp_send_errors_total", "Sends that failed (e.g. EAGAIN, ECONNREFUSED).", "tx_errors"),
    ("shardudp_datagrams_steered_total",
     "Datagrams this slot served for flows whose home slot was not read (steered to it).",
     "steered"),
    ("shardudp_quarantine_dropped_total",
     "Datagrams dropped before the handler: their source killed workers and is in quarantine.",
     "refused"),
    ("shardudp_datagrams_truncated_total",
     "Datagrams longer than max_packet_size, cut to it before the handler.", "truncated"),
    ("shardudp_flow_table_evictions_total",
     "Session keeping: senders a worker forgot to stay within session_table.", "evicted"),
)

_DURATION_HELP: Final = (
    "Time spent in datagramReceived, sampled: one datagram in "
    f"{SAMPLE_EVERY} is timed, so _count is about 1/{SAMPLE_EVERY} of datagrams received."
)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


class ShardCollector:
    """A prometheus_client collector reading one ``ExportView`` per scrape.

    Cost per scrape grows with slots * listeners (plus one /proc read per
    process); it never looks at per-datagram or per-peer data.
    """

    def __init__(
        self, source: Callable[[], ExportView], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._source = source
        self._clock = clock

    def describe(self) -> list[Metric]:
        # Registering must not call source() (the master may not have a view yet).
        return []

    def collect(self) -> Iterator[Metric]:
        view = self._source()
        slots = self._slots(view)
        if view.counting:
            yield from self._traffic(view)
        yield from self._socket_stats(view)
        yield from self._workers(view, slots)
        yield from self._processes(view)
        info = _gauge(
            "shardudp_build_info",
            "Build versions; the value is always 1.",
            ("version", "python", "twisted"),
        )
        info.add_metric((view.build.version, view.build.python, view.build.twisted), 1)
        yield info
        if view.datapath is not None:
            dp = _gauge("shardudp_datapath_info",
                        "The workers' UDP data path; the value is always 1.",
                        ("datapath", "configured"))
            dp.add_metric((view.datapath[1], view.datapath[0]), 1)
            yield dp
        yield from self._master(view)

    @staticmethod
    def _master(view: ExportView) -> Iterator[Metric]:
        state = view.master
        serving = _gauge(
            "shardudp_slot_serving",
            "1 while a READY worker reads the slot's sockets of the listener; 0 while none "
            "does (its flows go to other slots after steer_grace); current slots only.",
            _SL)
        why = _gauge(
            "shardudp_slot_not_serving",
            "1 for each (slot, listener) nobody reads, with why: no worker, booting, "
            "stopping, not responding, closed by the APP.", (*_SL, "reason"))
        steered = _gauge(
            "shardudp_slot_steered",
            "1 while the slot's flows of the listener are steered to other slots.", _SL)
        not_serving = view.not_serving()
        for slot in sorted(view.workers):
            for name in state.listeners:
                reason = not_serving.get((slot, name))
                serving.add_metric((str(slot), name), 0 if reason else 1)
                steered.add_metric((str(slot), name), 1 if (slot, name) in state.steered else 0)
                if reason:
                    why.add_metric((str(slot), name, reason), 1)
        yield serving
        yield why
        yield steered
        quarantined = _gauge("shardudp_quarantined_sources",
                             "Sources in quarantine now (their datagrams killed workers).",
                             ("listener",))
        for name, n in sorted(state.quarantined.items()):
            quarantined.add_metric((name,), n)
        yield quarantined
        dropped = _counter("shardudp_log_records_dropped",
                           "Log records the master could not write: its output was not "
                           "draining.", ())
        dropped.add_metric((), state.log_dropped)
        yield dropped
        held = _gauge("shardudp_sessions_draining",
                      "Sessions held by a worker that no longer owns their flow's bucket (a "
                      "reload or scale under way), until they go idle.", ("listener",))
        drained = _counter("shardudp_sessions_drained",
                           "Held sessions that went idle and were released.", ("listener",))
        cut = _counter("shardudp_sessions_cut",
                       "Held sessions cut before they went idle: drain_timeout passed "
                       "(deadline), the program had no room (capacity), or their worker died "
                       "(lost).", ("listener", "reason"))
        moved = _counter("shardudp_flows_moved",
                         "Active flows whose slot changed by a scale (held until idle).",
                         ("listener",))
        for name, (now, done, cuts, shifted) in sorted(state.sessions.items()):
            held.add_metric((name,), now)
            drained.add_metric((name,), done)
            for reason, n in sorted(cuts.items()):
                cut.add_metric((name, reason), n)
            moved.add_metric((name,), shifted)
        yield held
        yield drained
        yield cut
        yield moved

    @staticmethod
    def _slots(view: ExportView) -> list[int]:
        known = set(view.workers) | {s for s, _, _ in view.sockets}
        known |= {s.slot for s in view.book.listeners} | set(view.book.last_report_at)
        known |= {slot for slot, _ in view.book.restarts}
        return sorted(known)

    @staticmethod
    def _series(view: ExportView) -> list[ListenerSeries]:
        # Listeners with sockets but no report yet export zeros, so a series
        # exists from the start and rate() has a first point.
        have = {(s.slot, s.listener) for s in view.book.listeners}
        extra = {(slot, name) for slot, name, _ in view.sockets} - have
        series = list(view.book.listeners) + [ListenerSeries(s, n, ZERO) for s, n in extra]
        return sorted(series, key=lambda s: (s.slot, s.listener))

    def _traffic(self, view: ExportView) -> Iterator[Metric]:
        series = self._series(view)
        for name, doc, attr in _TRAFFIC:
            fam = _counter(name, doc, _SL)
            for s in series:
                fam.add_metric((str(s.slot), s.listener), getattr(s.counts, attr))
            yield fam

        errors = _counter(
            "shardudp_handler_errors_total",
            "Exceptions raised by the protocol's datagramReceived, by kind.",
            (*_SL, "error"),
        )
        hist = HistogramMetricFamily(
            "shardudp_handler_duration_seconds", _DURATION_HELP, labels=_SL
        )
        for s in series:
            labels = (str(s.slot), s.listener)
            for kind, n in s.errors:
                errors.add_metric((*labels, kind), n)
            buckets = [(_le(le), float(n)) for le, n in s.histogram]
            hist.add_metric(labels, buckets, s.duration_sum_seconds)
        yield errors
        yield hist

    def _socket_stats(self, view: ExportView) -> Iterator[Metric]:
        drops = _counter(
            "shardudp_socket_drops_total",
            "Datagrams the kernel dropped on the listener's sockets (receive buffer full, bad "
            "checksum), counted by the kernel, so also while no worker reads. "
            f'slot="{SHARED}" holds drops of the listener as a whole: its single-mode socket, '
            "and shard-mode overflow (which member overflowed is unknowable). "
            "sum by (listener) is the listener's loss, for every kind.",
            _SL,
        )
        queue = _gauge(
            "shardudp_socket_receive_queue_bytes",
            "Bytes (truesize) waiting in the socket's receive queue.",
            _SL,
        )
        rcvbuf = _gauge(
            "shardudp_socket_receive_buffer_bytes",
            "The socket's effective receive buffer (SO_RCVBUF as the kernel stores it).",
            _SL,
        )
        if view.kernel is not None:
            stats = view.kernel()
            for labels, n in sorted(stats.drops.items()):
                drops.add_metric(labels, n)
            for labels, (q, b) in sorted(stats.queues.items()):
                queue.add_metric(labels, q)
                rcvbuf.add_metric(labels, b)
        yield drops
        yield queue
        yield rcvbuf

    def _workers(self, view: ExportView, slots: list[int]) -> Iterator[Metric]:
        # Gauges describe current slots only: a slot removed by scaling down
        # would otherwise read as a worker down forever. Its counters stay,
        # at their last value, because a counter must never go backwards.
        up = _gauge(
            "shardudp_worker_up",
            "1 if the slot has a live worker that reported ready; current slots only.",
            ("slot",),
        )
        restarts = _counter(
            "shardudp_worker_restarts_total",
            "Workers replaced, by why the previous one went away.",
            ("slot", "reason"),
        )
        age = _gauge(
            "shardudp_worker_last_report_age_seconds",
            "Seconds since the slot's worker last sent metrics (its heartbeat when "
            "metrics_interval is 0); current slots only.",
            ("slot",),
        )
        now = self._clock()
        for slot in slots:
            label = str(slot)
            for reason in RESTART_REASONS:
                restarts.add_metric((label, reason), view.book.restarts.get((slot, reason), 0))
        for slot, w in sorted(view.workers.items()):
            label = str(slot)
            up.add_metric((label,), 1 if w.pid is not None and w.ready else 0)
            last = w.last_report_at
            if last is None:
                last = view.book.last_report_at.get(slot)
            if last is not None:
                age.add_metric((label,), max(0.0, now - last))
        yield up
        yield restarts
        yield age

    def _processes(self, view: ExportView) -> Iterator[Metric]:
        labels = ("role", "slot")
        cpu = _counter("shardudp_process_cpu_seconds_total", "User and system CPU time.", labels)
        rss = _gauge("shardudp_process_resident_memory_bytes", "Resident set size.", labels)
        fds = _gauge("shardudp_process_open_fds", "Open file descriptors.", labels)
        start = _gauge("shardudp_process_start_time_seconds", "Process start, Unix time.", labels)
        procs: list[tuple[tuple[str, str], int, float | None]] = []
        if view.master_pid is not None:
            procs.append((("master", ""), view.master_pid, None))
        for slot, w in sorted(view.workers.items()):
            if w.pid is not None:
                procs.append((("worker", str(slot)), w.pid, w.started_at))
        for lab, pid, started_at in procs:
            st = sockstats.read_process(pid)
            if st is None:
                if started_at is not None:
                    start.add_metric(lab, started_at)
                continue
            cpu.add_metric(lab, st.cpu_seconds)
            rss.add_metric(lab, st.resident_bytes)
            if st.open_fds is not None:
                fds.add_metric(lab, st.open_fds)
            start.add_metric(lab, st.start_time)
        yield cpu
        yield rss
        yield fds
        yield start


#: A burst of scrapes (several Prometheus servers, a probe, an operator's
#: curl) within this long costs one render on the master's loop.
METRICS_MAX_AGE: Final = 0.5


def health_answer(source: Callable[[], ExportView], healthy: Callable[[], bool]) -> Response:
    """/healthz: 200 when every slot has a READY, responsive worker; else 503 naming the slots.

    A ``healthy`` or ``source`` that raises is left to the endpoint: it answers
    500 and logs the failure without flooding the log at every probe.
    """
    ok = healthy()
    view = source()
    waiting, silent = view.not_ready(), view.silent()
    if ok:
        return plain(200, "ok")
    problems = [f"slots {what}: {', '.join(map(str, slots))}"
                for what, slots in (("not ready", waiting), ("not responding", silent))
                if slots]
    named = set(waiting) | set(silent)
    problems += [f"slot {slot} not serving {name}: {reason}"
                 for (slot, name), reason in sorted(view.not_serving().items())
                 if slot not in named]
    return plain(503, "; ".join(problems) or "not ready")


def routes(source: Callable[[], ExportView], healthy: Callable[[], bool], *,
           clock: Callable[[], float] = time.monotonic,
           max_age: float = METRICS_MAX_AGE) -> dict[str, Route]:
    """The endpoint's routes: /metrics (a render reused for ``max_age``) and /healthz (never
    cached). ``clock`` ages worker reports (``shardudp_worker_last_report_age_seconds``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ShardCollector(source, clock))

    def metrics() -> Response:
        return Response(200, CONTENT_TYPE_LATEST, generate_latest(registry))

    return {"/metrics": Route(metrics, max_age=max_age),
            "/healthz": Route(lambda: health_answer(source, healthy))}


def serve(host: str, port: int, paths: Mapping[str, Route], selector: selectors.BaseSelector,
          *, clock: Callable[[], float] = time.monotonic) -> HttpEndpoint:
    """Serve ``paths`` (see ``routes``) on ``host:port`` from ``selector`` (port 0 picks one).

    Raises StartupError naming the address if it cannot listen.
    """
    return HttpEndpoint(host, port, paths, selector, clock=clock)
