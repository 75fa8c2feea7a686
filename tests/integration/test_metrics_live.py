"""Metrics as an operator scrapes them from a live server."""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from harness import Flows, McastSenders, Server, ctl, free_port, http_get, metrics_port, serving
from prometheus_client.parser import text_string_to_metric_families

from shardudp.sockets import shard_of

FAST = ["--metrics", "127.0.0.1:0", "--metrics-interval", "0.2"]


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> {sorted labels: value}, parsed by prometheus_client's own parser."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = collections.defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def by_slot(m: dict[str, dict], name: str, **match: str) -> dict[str, float]:
    res: dict[str, float] = collections.defaultdict(float)
    for labels, value in m.get(name, {}).items():
        d = dict(labels)
        if all(d.get(k) == v for k, v in match.items()):
            res[d["slot"]] += value
    return dict(res)


def wait_metric(port: int, pred, timeout: float = 10.0):
    """Scrape until ``pred(metrics)`` holds (reports arrive every interval)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = scrape(port)
        if pred(last):
            return last
        time.sleep(0.1)  # scrape pacing; the event waited for is pred() turning true
    raise AssertionError(f"metrics never satisfied the condition; last: {dict(last or {})}")


def test_counters_equal_what_was_sent_and_split_by_worker() -> None:
    k, m = 600, 60
    with serving("apps:WhoAmI", workers=3, extra=FAST) as (srv, port), Flows(m, port) as flows:
        mport = metrics_port(srv)
        slot_of = {pid: slot for slot, pid in srv.ready_pids(count=3).items()}
        got = []
        for _ in range(k // m):  # rounds of one datagram per flow: no burst drops
            for i in range(m):
                flows.send(i, b"x" * 10)
            got += flows.collect(m, 10)
        assert len(got) == k
        served: dict[str, float] = collections.Counter()
        reply_bytes: dict[str, float] = collections.Counter()
        for _, d in got:  # each reply names the worker's pid, hence its slot
            slot = str(slot_of[int(d.split(b":")[0])])
            served[slot] += 1
            reply_bytes[slot] += len(d)
        slots = ("0", "1", "2")
        final = wait_metric(mport, lambda ms: sum(
            by_slot(ms, "shardudp_datagrams_sent_total").values()) == k)
        # Per worker, exactly what it served; summed over workers, exactly K.
        bytes_received = {s: v * 10 for s, v in served.items()}
        for name, want in (("shardudp_datagrams_received_total", served),
                           ("shardudp_datagrams_sent_total", served),
                           ("shardudp_bytes_received_total", bytes_received),
                           ("shardudp_bytes_sent_total", reply_bytes)):
            assert by_slot(final, name) == {s: float(want.get(s, 0)) for s in slots}, name
        assert sum(by_slot(final, "shardudp_datagrams_received_total").values()) == k
        assert set(by_slot(final, "shardudp_send_errors_total").values()) == {0.0}
        assert set(by_slot(final, "shardudp_handler_errors_total").values()) == {0.0}
        durations = by_slot(final, "shardudp_handler_duration_seconds_count")
        assert 0 < sum(durations.values()) <= k
        assert final["shardudp_worker_up"] == {(("slot", s),): 1.0 for s in ("0", "1", "2")}
        (info,) = final["shardudp_build_info"]
        assert dict(info)["version"]
        from shardudp import datapaths

        assert final["shardudp_datapath_info"] == {
            (("configured", "auto"), ("datapath", datapaths.resolve("auto"))): 1.0}


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape_counters(port: int) -> Series:
    """Every sample of every counter and histogram (values that must never go down),
    and the process start times, which tell a process CPU counter's reset."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            if fam.type in ("counter", "histogram")
            or fam.name == "shardudp_process_start_time_seconds" for s in fam.samples}


def decreases(before: Series, after: Series) -> list[tuple[object, ...]]:
    """Counter samples lower (or gone) in ``after``.

    A worker's CPU time is its process's, as for any exporter: it may restart
    from zero, but only together with a new start time (how Prometheus tells
    a reset). Every other counter is the master's and never goes down.
    """
    out = []
    for key, value in before.items():
        name, labels = key
        if name == "shardudp_process_start_time_seconds" or after.get(key, -1.0) >= value:
            continue
        start = ("shardudp_process_start_time_seconds", labels)
        if name == "shardudp_process_cpu_seconds_total" and before.get(start) != after.get(start):
            continue
        out.append((key, value, after.get(key)))
    return out


class Scraper(threading.Thread):
    """Scrapes every counter series every ~50 ms (bounded) until stopped."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.done = threading.Event()
        self.scrapes: list[Series] = []

    def run(self) -> None:
        for _ in range(1000):
            self.scrapes.append(scrape_counters(self.port))
            if self.done.wait(0.05):  # scrape pacing, like a (fast) Prometheus
                return


def current_pids(srv: Server) -> dict[int, int]:
    """slot -> pid of the latest READY worker of each slot."""
    return {int(m.group(1)): int(m.group(2))
            for m in re.finditer(r"worker slot=(\d+) pid=(\d+) ready", srv.log)}


def test_every_counter_series_never_decreases_across_two_kill_9s() -> None:
    with serving("apps:WhoAmI", workers=2, extra=FAST) as (srv, port), Flows(20, port) as flows:
        mport = metrics_port(srv)
        scraper = Scraper(mport)
        rate = 400

        def kill(slot: int) -> None:
            mark = srv.mark()
            os.kill(current_pids(srv)[slot], signal.SIGKILL)
            srv.ready_pids(start=mark)

        scraper.start()
        try:
            sent, replies = flows.stream(rate=rate, duration=3.0,
                                         on_tick={0.3: lambda: kill(0), 0.6: lambda: kill(1)})
            last = wait_metric(mport, lambda ms: sum(by_slot(
                ms, "shardudp_worker_restarts_total", reason="signal").values()) == 2)
        finally:
            scraper.done.set()
            scraper.join(10)
        scrapes = scraper.scrapes
        assert len(scrapes) >= 20
        for before, after in itertools.pairwise(scrapes):
            assert not decreases(before, after)
        # The scrapes straddle both kills, and never count more than was sent.
        restarts = [sum(v for (n, lab), v in sc.items()
                        if n == "shardudp_worker_restarts_total" and ("reason", "signal") in lab)
                    for sc in scrapes]
        assert {0.0, 1.0}.issubset(restarts) and restarts == sorted(restarts)
        # A killed worker's count since its last report (0.2 s) is lost; half a
        # second of the whole stream per kill bounds that generously.
        received = sum(by_slot(last, "shardudp_datagrams_received_total").values())
        assert len(replies) - 2 * 0.5 * rate <= received <= sent


def flows_served_by(flows: Flows, pid: int) -> list[int]:
    """The flows the kernel hashes to worker ``pid`` (of an APP answering ``PID:...``)."""
    owner = {}
    for i in range(len(flows.socks)):  # one at a time: the tiny buffers must not drop these
        flows.send(i, b"who")
        ((flow, data),) = flows.collect(1, 5)
        owner[flow] = int(data.split(b":")[0])
    mine = [i for i, p in owner.items() if p == pid]
    assert mine, f"no flow hashed to worker {pid}"
    return mine


@contextlib.contextmanager
def stopped_and_flooded(pid: int, flows: Flows, mine: list[int], rounds: int) -> Iterator[int]:
    """SIGSTOP worker ``pid`` and send ``rounds`` datagrams on each flow of ``mine``,
    so its socket overflows; yields how many were sent; SIGCONT on the way out."""
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(rounds):
            for i in mine:
                flows.send(i, b"f" * 200)
        yield rounds * len(mine)
    finally:
        os.kill(pid, signal.SIGCONT)


def test_kernel_drops_of_a_stopped_worker_only() -> None:
    extra = [*FAST, "--rcvbuf", "4096", "--timeout", "60"]
    with serving("apps:WhoAmI", workers=2, extra=extra) as (srv, port), Flows(40, port) as flows:
        mport = metrics_port(srv)
        victim_slot, victim = next(iter(srv.ready_pids(count=2).items()))
        mine = flows_served_by(flows, victim)
        with stopped_and_flooded(victim, flows, mine, rounds=400):
            drops = wait_metric(mport, lambda ms: by_slot(
                ms, "shardudp_socket_drops_total").get(str(victim_slot), 0) > 0)
            others = {s: v for s, v in by_slot(drops, "shardudp_socket_drops_total").items()
                      if s != str(victim_slot)}
            assert set(others.values()) == {0.0}
            assert by_slot(drops, "shardudp_socket_receive_buffer_bytes")[str(victim_slot)] > 0
        flows.collect(10**6, 1.0)  # the queued backlog being answered
        flows.send(mine[0], b"back")
        replies = [d for _, d in flows.collect(1, 5)]
        assert replies and replies[-1].endswith(b"back")


def test_handler_errors_are_counted_and_the_worker_keeps_serving() -> None:
    with serving("apps:Misbehave", workers=1, extra=FAST) as (srv, port), Flows(1, port) as flows:
        mport = metrics_port(srv)
        for _ in range(5):
            flows.send(0, b"raise")
        flows.send(0, b"fine")
        assert [d for _, d in flows.collect(1, 5)] == [b"fine"]
        final = wait_metric(mport, lambda ms: by_slot(
            ms, "shardudp_handler_errors_total", error="value").get("0") == 5)
        assert by_slot(final, "shardudp_handler_errors_total", error="other") == {"0": 0.0}


def wait_health(port: int, status: int, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        got, body = http_get(port, "/healthz")
        if got == status or time.monotonic() > deadline:
            assert got == status, body
            return body
        time.sleep(0.05)  # scrape pacing; the event is the status changing


def test_healthz_follows_ready_workers(tmp_path) -> None:
    gate = tmp_path / "slow"
    with serving("apps:SlowStart", workers=2, extra=FAST,
                 env={"SLOW_START_FILE": str(gate)}) as (srv, _port):
        mport = metrics_port(srv)
        assert wait_health(mport, 200) == "ok\n"
        gate.touch()
        slot, victim = next(iter(srv.ready_pids(count=1).items()))
        mark = srv.mark()
        os.kill(victim, signal.SIGKILL)
        srv.wait_line("restarting", start=mark)
        # The replacement is held in startProtocol by the gate.
        assert wait_health(mport, 503) == f"slots not ready: {slot}\n"
        gate.unlink()
        srv.ready_pids(start=mark)
        assert wait_health(mport, 200) == "ok\n"


def test_with_counting_off_traffic_reads_as_unknown_not_as_zero() -> None:
    with serving("echo", workers=1,
                 extra=["--metrics", "127.0.0.1:0", "--metrics-interval", "0"]) as \
            (srv, port), Flows(1, port) as flows:
        mport = metrics_port(srv)
        flows.send(0, b"x")
        assert flows.collect(1, 5)
        m = scrape(mport)
        # No traffic or handler series at all: zeros would say "no traffic".
        assert not {name for name in m if name.startswith(
            ("shardudp_datagrams_", "shardudp_bytes_", "shardudp_send_errors",
             "shardudp_handler_"))}, sorted(m)
        # What the master knows by itself is still there.
        for name in ("shardudp_socket_drops_total", "shardudp_socket_receive_queue_bytes",
                     "shardudp_worker_up", "shardudp_worker_restarts_total",
                     "shardudp_process_cpu_seconds_total", "shardudp_build_info"):
            assert m.get(name), name
        st = json.loads(ctl(srv, "status", "--json").stdout)
        assert st["counting"] is False
        assert [(s["rx"], s["tx"], s["rx_rate"]) for s in st["slots"]] == [(None, None, None)]
        _head, columns, row, *rest = ctl(srv, "status").stdout.splitlines()
        cells = dict(zip(columns.split(), row.split(), strict=False))
        assert (cells["RECEIVED"], cells["SENT"], cells["RATE/s"], cells["DROPS"]) == (
            "-", "-", "-", "0"), row
        assert rest[-1] == "traffic is not counted (metrics_interval is 0)", rest


def test_healthz_fails_while_a_worker_is_stopped_and_recovers_on_cont() -> None:
    with serving("echo", workers=2, extra=FAST) as (srv, port), \
            Flows(1, port) as flows:
        mport = metrics_port(srv)
        assert wait_health(mport, 200) == "ok\n"
        slot, victim = next(iter(srv.ready_pids(count=1).items()))
        mark = srv.mark()
        os.kill(victim, signal.SIGSTOP)
        try:
            # Well before --timeout (30 s) would have it killed.
            assert wait_health(mport, 503) == f"slots not responding: {slot}\n"
            # status says why, not "not ready" next to a slot whose state is "ready".
            head = ctl(srv, "status").stdout.splitlines()[0]
            assert re.search(rf", 2 workers, UNHEALTHY \(slot {slot} silent for "
                             r"\d+\.\ds\)$", head), head
        finally:
            os.kill(victim, signal.SIGCONT)
        assert wait_health(mport, 200) == "ok\n"
        assert current_pids(srv)[slot] == victim and "restarting" not in srv.log[mark:]
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]


def test_scaled_down_slots_keep_their_counters_and_lose_their_gauges() -> None:
    with serving("apps:WhoAmI", workers=3, extra=FAST) as (srv, port), Flows(30, port) as flows:
        mport = metrics_port(srv)
        for i in range(30):
            flows.send(i, b"x")
        assert len(flows.collect(30, 10)) == 30
        before = wait_metric(mport, lambda ms: sum(
            by_slot(ms, "shardudp_datagrams_received_total").values()) == 30)
        assert by_slot(before, "shardudp_datagrams_received_total")["2"] > 0
        mark = srv.mark()
        assert ctl(srv, "scale", "2").returncode == 0
        srv.wait_line("slot 2 drained and closed", start=mark)
        after = wait_metric(mport, lambda ms: set(by_slot(ms, "shardudp_worker_up")) == {"0", "1"})
        assert set(by_slot(after, "shardudp_worker_last_report_age_seconds")) == {"0", "1"}
        assert by_slot(after, "shardudp_datagrams_received_total") == \
            by_slot(before, "shardudp_datagrams_received_total")
        assert "2" in by_slot(after, "shardudp_worker_restarts_total")


# -- kernel drops by listener kind (appended with the socket drop accounting) ---

GROUP = "239.255.42.98"


def _drops(m: dict[str, dict], listener: str) -> dict[str, float]:
    return by_slot(m, "shardudp_socket_drops_total", listener=listener)


def test_shard_filter_refusals_are_not_drops_and_overflow_is_exact() -> None:
    port = free_port()
    srv = Server(["run", "apps:WhoAmI", "--multicast", f"{GROUP}:{port}", "--name", "mc",
                  "--multicast-mode", "shard", "--multicast-interface", "127.0.0.1",
                  "--workers", "3", "--rcvbuf", "4096", "--timeout", "60", *FAST])
    senders = McastSenders(30, GROUP, port)
    try:
        srv.wait_line("all 3 workers ready", timeout=20)
        mport = metrics_port(srv)
        slot_of = {pid: slot for slot, pid in srv.ready_pids(count=3).items()}
        for i in range(300):  # one at a time: the tiny buffers must not drop these
            senders.send(i % 30, b"x")
            assert len(senders.collect(1, 5)) == 1
        m = wait_metric(mport, lambda ms: sum(
            by_slot(ms, "shardudp_datagrams_received_total").values()) == 300)
        # Each member refused 200 datagrams of other shards: no loss, no drops.
        assert _drops(m, "mc") == {"shared": 0.0}
        assert set(by_slot(m, "shardudp_socket_receive_queue_bytes", listener="mc")) == \
            {"0", "1", "2"}

        victim, victim_slot = next(iter(slot_of.items()))
        mine = [i for i, s in enumerate(senders.socks)
                if shard_of("127.0.0.1", s.getsockname()[1], 3) == victim_slot]
        with stopped_and_flooded(victim, senders, mine, rounds=100) as sent:
            wait_metric(mport, lambda ms: _drops(ms, "mc")["shared"] > 0)
        wait_metric(mport, lambda ms: by_slot(ms, "shardudp_socket_receive_queue_bytes",
                                              listener="mc")[str(victim_slot)] == 0)
        handled = senders.collect(10**6, 0.5)  # the replies to what was queued
        assert 0 < len(handled) < sent
        # Exactly what the stopped worker's full buffer could not take.
        final = wait_metric(mport, lambda ms: _drops(ms, "mc")["shared"] == sent - len(handled))
        status = json.loads(ctl(srv, "status", "--json").stdout)
        assert status["listener_drops"] == {"mc": final["shardudp_socket_drops_total"][
            (("listener", "mc"), ("slot", "shared"))]}
    finally:
        srv.stop()
        senders.close()


def test_slot_drops_never_decrease_across_scale_down_and_up() -> None:
    extra = [*FAST, "--rcvbuf", "4096", "--timeout", "60", "--name", "u"]
    with serving("apps:WhoAmI", workers=2, extra=extra) as (srv, port), Flows(40, port) as flows:
        mport = metrics_port(srv)
        victim = srv.ready_pids(count=2)[1]
        mine = flows_served_by(flows, victim)
        with stopped_and_flooded(victim, flows, mine, rounds=200):
            before = wait_metric(mport, lambda ms: _drops(ms, "u").get("1", 0) > 0)
        dropped = _drops(before, "u")["1"]
        mark = srv.mark()
        assert ctl(srv, "scale", "1").returncode == 0
        srv.wait_line(r"slot 1 drained and closed", start=mark)
        # The closed socket's drops stay in its slot's counter...
        assert _drops(scrape(mport), "u")["1"] == dropped
        mark = srv.mark()
        assert ctl(srv, "scale", "2").returncode == 0
        srv.ready_pids(start=mark)
        # ...and the slot's new socket adds to them.
        assert _drops(scrape(mport), "u")["1"] == dropped
        status = json.loads(ctl(srv, "status", "--json").stdout)
        assert {s["slot"]: s["drops"] for s in status["slots"]} == {0: 0, 1: dropped}
        assert status["listener_drops"] == {"u": dropped}
