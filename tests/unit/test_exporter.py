"""The Prometheus endpoint: a real HTTP server on loopback, scraped and parsed."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from types import MappingProxyType

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shardudp import commands, config, exporter, server, sockstats
from shardudp.drops import SHARED
from shardudp.errors import StartupError
from shardudp.exporter import (
    ExportView,
    LatestView,
    MasterState,
    ShardCollector,
    SlotWorker,
)
from shardudp.master import Master
from shardudp.metrics import RESTART_REASONS, MetricsBook
from shardudp.monitor import Monitor
from shardudp.sockstats import KernelStats
from shardudp.stats import SAMPLE_EVERY, ListenerStats
from shardudp.supervision import Policy, RestartReason, Spawn, Supervisor

REPO = Path(__file__).resolve().parents[2]


class Endpoint:
    """``exporter.serve`` on a selector that a thread drives, as the master's loop does."""

    def __init__(self, host: str, port: int, source: Callable[[], ExportView],
                 healthy: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
                 ) -> None:
        self.selector = selectors.DefaultSelector()
        paths = exporter.routes(source, healthy, clock=clock, max_age=0)
        self.ep = exporter.serve(host, port, paths, self.selector)
        self.port = self.ep.port
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, mask in self.selector.select(0.05):
                key.data(mask)
            self.ep.expire()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.ep.close()
        self.selector.close()


def start_http(host: str, port: int, source: Callable[[], ExportView],
               healthy: Callable[[], bool], clock: Callable[[], float] = time.monotonic,
               ) -> tuple[Endpoint, int]:
    e = Endpoint(host, port, source, healthy, clock)
    return e, e.port
DASHBOARD = REPO / "deploy" / "grafana" / "shardudp.json"


def _body(rx: int, durations_ns: tuple[int, ...] = (), errors: int = 0) -> dict[str, object]:
    st = ListenerStats()
    st.rx_datagrams, st.rx_bytes, st.tx_datagrams, st.tx_bytes = rx, rx * 10, rx, rx * 10
    for ns in durations_ns:
        st.observe_ns(ns)
    for _ in range(errors):
        st.count_error(KeyError())
    return st.snapshot()


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    yield s
    s.close()


@pytest.fixture
def book() -> MetricsBook:
    b = MetricsBook()
    b.report(0, 1, 1, {"echo": _body(10, (3_000, 2_000_000), errors=2)}, now=100.0)
    b.report(1, 2, 1, {"echo": _body(5)}, now=101.0)
    b.restart(1, RestartReason.SIGNAL)
    return b


def kernel_of(udp: socket.socket) -> Callable[[], KernelStats]:
    """A kernel source over one socket of slot 0 (the master's is SocketSet.kernel_stats)."""

    def read() -> KernelStats:
        (st,) = sockstats.read_sockets([udp])
        if st is None:
            return KernelStats(drops={}, queues={})
        key = ("0", "echo")
        return KernelStats(drops={key: st.drops},
                           queues={key: (st.rx_queue_bytes, st.rcvbuf_bytes)})

    return read


@pytest.fixture
def view(book: MetricsBook, udp: socket.socket) -> LatestView:
    workers = {
        0: SlotWorker(pid=os.getpid(), ready=True),
        1: SlotWorker(pid=None, ready=False),
    }
    return LatestView(
        ExportView(
            book=book.snapshot(),
            workers=MappingProxyType(workers),
            sockets=((0, "echo", udp),),
            master_pid=os.getpid(),
            kernel=kernel_of(udp),
            datapath=("auto", "c"),
            # What the master's services decided: slot 1 unread and steered, a
            # source in quarantine, session keeping under way.
            master=MasterState(
                listeners=("echo",),
                not_serving=MappingProxyType({(1, "echo"): "no worker"}),
                steered=frozenset({(1, "echo")}),
                quarantined=MappingProxyType({"echo": 1}),
                log_dropped=3,
                sessions=MappingProxyType({"echo": (5, 7, MappingProxyType(
                    {"deadline": 1, "capacity": 0, "lost": 0}), 2)})),
        )
    )


class Health:
    def __init__(self) -> None:
        self.ok = True

    def __call__(self) -> bool:
        return self.ok


@pytest.fixture
def served(view: LatestView) -> Iterator[tuple[str, LatestView, Health]]:
    health = Health()
    server, port = start_http("127.0.0.1", 0, view, health, clock=lambda: 110.0)
    try:
        yield f"http://127.0.0.1:{port}", view, health
    finally:
        server.close()


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers["Content-Type"], e.read().decode()


def scrape(base: str) -> dict[str, Metric]:
    status, ctype, text = get(base + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    return {m.name: m for m in text_string_to_metric_families(text)}


def values(fam: Metric, sample: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    name = sample or fam.name
    return {tuple(sorted(s.labels.items())): s.value for s in fam.samples if s.name == name}


def test_traffic_counters_and_labels(served: tuple[str, LatestView, Health]) -> None:
    fams = scrape(served[0])
    rx = fams["shardudp_datagrams_received"]
    assert rx.type == "counter"
    assert values(rx, "shardudp_datagrams_received_total") == {
        (("listener", "echo"), ("slot", "0")): 10.0,
        (("listener", "echo"), ("slot", "1")): 5.0,
    }
    assert (
        values(fams["shardudp_bytes_sent"], "shardudp_bytes_sent_total")[
            (("listener", "echo"), ("slot", "0"))
        ]
        == 100.0
    )
    errors = values(fams["shardudp_handler_errors"], "shardudp_handler_errors_total")
    assert errors[(("error", "lookup"), ("listener", "echo"), ("slot", "0"))] == 2.0
    assert errors[(("error", "value"), ("listener", "echo"), ("slot", "0"))] == 0.0
    assert len(errors) == 2 * 5  # every kind of every series, zeros included


def test_histogram_is_cumulative_with_sum_and_count(
    served: tuple[str, LatestView, Health],
) -> None:
    hist = scrape(served[0])["shardudp_handler_duration_seconds"]
    assert hist.type == "histogram"
    assert "sampled" in hist.documentation and f"in {SAMPLE_EVERY}" in hist.documentation
    slot0 = (("listener", "echo"), ("slot", "0"))
    buckets = {
        float(s.labels["le"]): s.value
        for s in hist.samples
        if s.name.endswith("_bucket") and s.labels["slot"] == "0"
    }
    # Samples of 3 us and 2 ms: the first is under every bound, the second from 2.5 ms on.
    assert buckets[1e-05] == 1.0 and buckets[0.001] == 1.0
    assert buckets[0.0025] == 2.0 and buckets[float("inf")] == 2.0
    ordered = [v for _, v in sorted(buckets.items())]
    assert ordered == sorted(ordered)
    assert values(hist, "shardudp_handler_duration_seconds_count")[slot0] == 2.0
    assert values(hist, "shardudp_handler_duration_seconds_sum")[slot0] == pytest.approx(0.002003)


def test_workers_restarts_age_build_and_processes(served: tuple[str, LatestView, Health]) -> None:
    fams = scrape(served[0])
    assert values(fams["shardudp_worker_up"]) == {(("slot", "0"),): 1.0, (("slot", "1"),): 0.0}
    restarts = values(fams["shardudp_worker_restarts"], "shardudp_worker_restarts_total")
    assert restarts[(("reason", "signal"), ("slot", "1"))] == 1.0
    assert restarts[(("reason", "boot"), ("slot", "0"))] == 0.0
    assert len(restarts) == 2 * len(RESTART_REASONS)
    # The fixture's clock says 110; the book saw reports at 100 and 101.
    assert values(fams["shardudp_worker_last_report_age_seconds"]) == {
        (("slot", "0"),): 10.0,
        (("slot", "1"),): 9.0,
    }
    assert values(fams["shardudp_datapath_info"]) == {
        (("configured", "auto"), ("datapath", "c")): 1.0}
    (build,) = fams["shardudp_build_info"].samples
    assert build.value == 1.0
    assert build.labels["twisted"] == metadata.version("twisted")
    assert build.labels["python"] == ".".join(map(str, sys.version_info[:3]))

    cpu = values(fams["shardudp_process_cpu_seconds"], "shardudp_process_cpu_seconds_total")
    # The fixture names this test process as both master and worker 0; slot 1 has no pid.
    assert set(cpu) == {(("role", "master"), ("slot", "")), (("role", "worker"), ("slot", "0"))}
    fds = values(fams["shardudp_process_open_fds"])
    assert fds[(("role", "master"), ("slot", ""))] >= 3
    rss = values(fams["shardudp_process_resident_memory_bytes"])
    assert rss[(("role", "master"), ("slot", ""))] > 1 << 20
    started = values(fams["shardudp_process_start_time_seconds"])
    assert 0 < started[(("role", "master"), ("slot", ""))] <= time.time()


def test_labels_are_bounded(served: tuple[str, LatestView, Health]) -> None:
    allowed = {"slot", "listener", "error", "reason", "role", "le", "version", "python", "twisted",
               "datapath", "configured"}
    for fam in scrape(served[0]).values():
        assert fam.name.startswith("shardudp_"), fam.name
        for s in fam.samples:
            assert set(s.labels) <= allowed, (s.name, s.labels)


def test_socket_stats_follow_the_kernel(
    served: tuple[str, LatestView, Health], udp: socket.socket
) -> None:
    base = served[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(3):
            tx.sendto(b"ping", udp.getsockname())
    key = (("listener", "echo"), ("slot", "0"))
    expected = sockstats.read_meminfo(udp)
    fams = scrape(base)
    assert expected.rx_queue_bytes > 0
    assert values(fams["shardudp_socket_receive_queue_bytes"])[key] == expected.rx_queue_bytes
    assert values(fams["shardudp_socket_receive_buffer_bytes"])[key] == expected.rcvbuf_bytes
    assert values(fams["shardudp_socket_drops"], "shardudp_socket_drops_total")[key] == 0.0
    # Slot 1 holds no socket in this view, so it has no kernel series.
    assert len(values(fams["shardudp_socket_receive_queue_bytes"])) == 1


def test_view_swap_is_seen_by_the_next_scrape(
    served: tuple[str, LatestView, Health], book: MetricsBook
) -> None:
    base, view, _ = served
    book.report(0, 1, 2, {"echo": _body(50, (3_000, 2_000_000), errors=2)}, now=105.0)
    book.retire(1, 2)
    book.report(1, 3, 1, {"echo": _body(1)}, now=106.0)
    view.view = dataclasses.replace(view.view, book=book.snapshot())
    rx = values(scrape(base)["shardudp_datagrams_received"], "shardudp_datagrams_received_total")
    assert rx[(("listener", "echo"), ("slot", "0"))] == 50.0
    assert rx[(("listener", "echo"), ("slot", "1"))] == 6.0  # 5 retired + 1 new


def test_healthz_and_unknown_paths(served: tuple[str, LatestView, Health]) -> None:
    base, _, health = served
    assert get(base + "/healthz")[::2] == (200, "ok\n")
    health.ok = False
    status, _, body = get(base + "/healthz")
    assert status == 503
    assert body == "slots not ready: 1\n"
    status, _, body = get(base + "/nope")
    assert status == 404 and "/metrics" in body
    req = urllib.request.Request(base + "/metrics?x=1", method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200 and r.read() == b""


def test_a_failing_source_gives_500_and_the_server_survives(view: LatestView) -> None:
    calls = {"n": 0}

    def flaky() -> ExportView:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return view.view

    server, port = start_http("127.0.0.1", 0, flaky, lambda: True)
    try:
        assert get(f"http://127.0.0.1:{port}/metrics")[0] == 500
        assert "shardudp_worker_up" in scrape(f"http://127.0.0.1:{port}")
    finally:
        server.close()


def test_a_failing_health_check_gives_500_and_one_line_in_the_log(
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO)
    server, port = start_http("127.0.0.1", 0, LatestView(), broken)
    try:
        for _ in range(3):  # a probe's every attempt
            assert get(f"http://127.0.0.1:{port}/healthz")[0] == 500
        assert "shardudp_build_info" in scrape(f"http://127.0.0.1:{port}")
    finally:
        server.close()
    failures = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in failures] == [
        "HTTP route /healthz failed: RuntimeError: boom"]
    assert not failures[0].exc_info  # no traceback at every probe


def test_busy_port_and_bad_port_give_clear_errors() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StartupError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
            start_http("127.0.0.1", port, LatestView(), lambda: True)
    with pytest.raises(StartupError, match="0-65535"):
        start_http("127.0.0.1", 70000, LatestView(), lambda: True)
    with pytest.raises(StartupError, match="host is empty"):
        start_http(" ", 0, LatestView(), lambda: True)


def test_ipv6_loopback() -> None:
    try:
        server, port = start_http("[::1]", 0, LatestView(), lambda: True)
    except StartupError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert get(f"http://[::1]:{port}/healthz")[0] == 200
        assert "shardudp_build_info" in scrape(f"http://[::1]:{port}")
    finally:
        server.close()


def test_closed_socket_and_dead_pid_are_skipped(udp: socket.socket) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=10)
    udp.close()
    view = ExportView(
        workers=MappingProxyType({0: SlotWorker(pid=dead.pid, ready=True, started_at=123.0)}),
        sockets=((0, "echo", udp),),
    )
    fams = {m.name: m for m in ShardCollector(lambda: view).collect()}
    assert fams["shardudp_socket_drops"].samples == []
    assert fams["shardudp_process_cpu_seconds"].samples == []
    # With /proc silent, the master's own spawn time still gives a start time.
    assert values(fams["shardudp_process_start_time_seconds"]) == {
        (("role", "worker"), ("slot", "0")): 123.0
    }
    # The listener still has (zero) traffic series from the start.
    assert values(fams["shardudp_datagrams_received"], "shardudp_datagrams_received_total") == {
        (("listener", "echo"), ("slot", "0")): 0.0
    }


def test_the_datapath_is_exported_with_what_was_configured() -> None:
    view = ExportView(datapath=("auto", "python"))
    fams = {m.name: m for m in ShardCollector(lambda: view).collect()}
    assert values(fams["shardudp_datapath_info"]) == {
        (("configured", "auto"), ("datapath", "python")): 1.0}


def test_kernel_stats_are_exported_as_the_source_says() -> None:
    # Unwrapping and per-slot attribution happen in SocketSet (tests/unit/test_drops.py):
    # the exporter must pass the totals through, the listener-wide SHARED series included.
    stats = KernelStats(drops={("0", "mc"): 3, (SHARED, "mc"): 2**32 + 5},
                        queues={("0", "mc"): (832, 4608)})
    view = ExportView(kernel=lambda: stats)
    fams = {m.name: m for m in ShardCollector(lambda: view).collect()}
    assert values(fams["shardudp_socket_drops"], "shardudp_socket_drops_total") == {
        (("listener", "mc"), ("slot", "0")): 3.0,
        (("listener", "mc"), ("slot", SHARED)): 2.0**32 + 5,
    }
    assert values(fams["shardudp_socket_receive_queue_bytes"]) == {
        (("listener", "mc"), ("slot", "0")): 832.0}
    assert values(fams["shardudp_socket_receive_buffer_bytes"]) == {
        (("listener", "mc"), ("slot", "0")): 4608.0}


_NO_TWISTED = """
import sys
import threading
import shardudp.exporter, shardudp.metrics, shardudp.sockstats
shardudp.exporter.build_info()
print(sorted(m for m in sys.modules if m.split(".")[0] in ("twisted", "zope")))
"""


def test_exporter_never_imports_twisted() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [sys.executable, "-c", _NO_TWISTED],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_dashboard_uses_only_exported_metric_names(
    served: tuple[str, LatestView, Health],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for e in exprs for name in re.findall(r"\bshardudp_[a-z_]+", e)}
    exported: set[str] = set()
    for fam in scrape(served[0]).values():
        exported |= {s.name for s in fam.samples}
    assert used, "the dashboard queries nothing"
    assert used <= exported, sorted(used - exported)
    # Every family the exporter offers appears somewhere on the dashboard.
    families = {n.removesuffix("_total").removesuffix("_bucket") for n in used}
    missing = {f for f in scrape(served[0]) if not any(n.startswith(f) for n in families)}
    assert not missing, sorted(missing)


def test_view_does_not_follow_the_masters_later_mutations(udp: socket.socket) -> None:
    workers = {0: SlotWorker(pid=None, ready=False)}
    sockets = [(0, "echo", udp)]
    view = ExportView(workers=workers, sockets=sockets)  # type: ignore[arg-type]
    workers[1] = SlotWorker(pid=None, ready=False)
    sockets.clear()
    assert list(view.workers) == [0] and len(view.sockets) == 1
    assert view.not_ready() == [0]


def test_removed_slots_keep_their_counters_but_not_their_gauges(udp: socket.socket) -> None:
    # Slots 0-4 served, then the server was scaled down to 0-2.
    book = MetricsBook()
    for slot in range(5):
        book.report(slot, slot + 1, 1, {"echo": _body(10 * (slot + 1))}, now=100.0)
    book.restart(4, RestartReason.SIGNAL)
    for slot in (3, 4):
        book.retire(slot, slot + 1)
    workers = {s: SlotWorker(pid=os.getpid(), ready=True) for s in range(3)}
    view = ExportView(book=book.snapshot(), workers=workers, sockets=((0, "echo", udp),))
    fams = {m.name: m for m in ShardCollector(lambda: view, clock=lambda: 103.0).collect()}
    current = {(("slot", str(s)),) for s in range(3)}
    assert set(values(fams["shardudp_worker_up"])) == current
    assert set(values(fams["shardudp_worker_last_report_age_seconds"])) == current
    assert set(values(fams["shardudp_process_cpu_seconds"], "shardudp_process_cpu_seconds_total")
               ) == {(("role", "worker"), ("slot", str(s))) for s in range(3)}
    # Counters are forever: dropping them would read as a reset to zero.
    rx = values(fams["shardudp_datagrams_received"], "shardudp_datagrams_received_total")
    assert rx == {(("listener", "echo"), ("slot", str(s))): 10.0 * (s + 1) for s in range(5)}
    restarts = values(fams["shardudp_worker_restarts"], "shardudp_worker_restarts_total")
    assert restarts[(("reason", "signal"), ("slot", "4"))] == 1.0


def test_healthz_names_slots_whose_worker_went_silent(udp: socket.socket) -> None:
    view = LatestView(ExportView(workers={
        0: SlotWorker(pid=os.getpid(), ready=True),
        1: SlotWorker(pid=os.getpid(), ready=True, silent=True),
        2: SlotWorker(pid=None, ready=False),
    }))
    server, port = start_http("127.0.0.1", 0, view, lambda: False)
    try:
        status, _, body = get(f"http://127.0.0.1:{port}/healthz")
        assert (status, body) == (503, "slots not ready: 2; slots not responding: 1\n")
    finally:
        server.close()


def test_listen_backlog_holds_a_burst_of_connections() -> None:
    selector = selectors.DefaultSelector()
    # Nothing accepts: every connection has to wait in the listen queue.
    ep = exporter.serve("127.0.0.1", 0, exporter.routes(LatestView(), lambda: True), selector)
    clients = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(40)]
    try:
        for c in clients:
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", ep.port))
        pending = list(clients)
        deadline = time.monotonic() + 3
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], deadline - time.monotonic())
            pending = [c for c in pending if c not in writable]
        assert not pending  # a backlog of 5 queues 6
    finally:
        for c in clients:
            c.close()
        ep.close()
        selector.close()


# -- the master's side: what server.Server publishes and reports, on a fake clock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Served:
    """The standard master on a fake clock, seen through what tests ask of it."""

    def __init__(self, master: Master) -> None:
        self.master = master
        monitor = master.service(Monitor)
        assert monitor is not None
        self.monitor = monitor
        self.sup = master.sup
        self.book = monitor.book

    def after_loop(self) -> None:
        for service in self.master.services:
            service.after_turn(self.master.clock())

    def status(self) -> dict[str, object]:
        return commands.status(self.master, self.monitor)

    def healthy_view(self) -> bool:
        return self.monitor.healthy_view()

    def view(self) -> ExportView:
        return self.monitor.view()


@pytest.fixture
def master() -> Iterator[tuple[Served, FakeClock]]:
    cfg = config.build(cli={"app": "workers.echo:Echo", "bind": ["127.0.0.1:9"],
                            "workers": "2", "control": "none"})
    clock = FakeClock()
    m = server.build(cfg, clock=clock)
    sup = m.sup = Supervisor(2, Policy(cfg.timeout, cfg.graceful_timeout, cfg.backoff_max),
                             clock.now)
    for action in sup.start():
        assert isinstance(action, Spawn)
        sup.spawned(action.slot, action.incarnation, 100 + action.slot, clock.now)
        sup.ready(100 + action.slot, clock.now)
    try:
        yield Served(m), clock
    finally:
        m.selector.close()
        m._wake_r.close()
        m._wake_w.close()


def test_status_rate_is_current_not_a_trailing_average(
    master: tuple[Served, FakeClock],
) -> None:
    srv, clock = master
    rx, seq = 0, 0

    def run(seconds: float, rate: int) -> None:
        nonlocal rx, seq
        for _ in range(int(seconds * 4)):  # the loop turns 4 times a second
            clock.now += 0.25
            rx += rate // 4
            seq += 1
            srv.book.report(0, 1, seq, {"echo": _body(rx)}, clock.now)
            srv.after_loop()

    def rate() -> float:
        return float(srv.status()["slots"][0]["rx_rate"])

    run(20, 1000)
    assert rate() == 1000.0
    run(3, 0)  # traffic stopped 3 s ago: an average over 16 s would still say ~800/s
    assert rate() == 0.0
    run(3, 400)
    assert rate() == 400.0


def test_a_ready_worker_gone_silent_fails_health_until_it_speaks(
    master: tuple[Served, FakeClock],
) -> None:
    srv, clock = master
    assert srv.sup is not None
    srv.after_loop()
    assert srv.healthy_view()
    for _ in range(8):  # slot 0 heartbeats, slot 1 (pid 101) is stopped
        clock.now += 0.5
        srv.sup.heartbeat(100, clock.now)
        srv.after_loop()
    assert not srv.healthy_view()
    assert srv.view().silent() == [1] and srv.view().not_ready() == []
    status = srv.status()
    assert (status["healthy"], status["silent_slots"]) == (False, [1])
    srv.sup.heartbeat(101, clock.now)
    srv.after_loop()
    assert srv.healthy_view() and srv.status()["healthy"]


def test_with_counting_off_traffic_series_are_left_out(view: LatestView) -> None:
    """--metrics-interval 0: zeros would read as no traffic; the master's own series stay."""
    view.view = dataclasses.replace(view.view, book=MetricsBook().snapshot(), counting=False)
    server, port = start_http("127.0.0.1", 0, view, Health())
    try:
        names = set(scrape(f"http://127.0.0.1:{port}"))
    finally:
        server.close()
    traffic = {"shardudp_datagrams_received", "shardudp_datagrams_sent",
               "shardudp_bytes_received", "shardudp_bytes_sent", "shardudp_send_errors",
               "shardudp_handler_errors", "shardudp_handler_duration_seconds"}
    assert not names & traffic
    assert {"shardudp_socket_drops", "shardudp_socket_receive_queue_bytes",
            "shardudp_socket_receive_buffer_bytes", "shardudp_worker_up",
            "shardudp_worker_restarts", "shardudp_process_cpu_seconds",
            "shardudp_build_info"} <= names
