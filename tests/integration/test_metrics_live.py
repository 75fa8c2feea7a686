"""Metrics as an operator scrapes them from a live server."""

from __future__ import annotations

import collections
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
from harness import Flows, Server, serving
from prometheus_client.parser import text_string_to_metric_families

FAST = ["--metrics", "127.0.0.1:0", "--metrics-interval", "0.2"]


def metrics_port(srv: Server) -> int:
    return int(srv.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[0].group(1))


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
        served = collections.Counter(str(slot_of[int(d.split(b":")[0])]) for _, d in got)
        final = wait_metric(mport, lambda ms: sum(
            by_slot(ms, "shardudp_datagrams_received_total").values()) == k)
        assert by_slot(final, "shardudp_datagrams_received_total") == {
            s: float(served.get(s, 0)) for s in ("0", "1", "2")}
        assert sum(by_slot(final, "shardudp_datagrams_sent_total").values()) == k
        assert sum(by_slot(final, "shardudp_bytes_received_total").values()) == k * 10
        assert sum(by_slot(final, "shardudp_handler_duration_seconds_count").values()) > 0
        assert final["shardudp_worker_up"] == {(("slot", s),): 1.0 for s in ("0", "1", "2")}
        (info,) = final["shardudp_build_info"]
        assert dict(info)["version"]


def test_counters_never_decrease_across_kill_9() -> None:
    with serving("apps:WhoAmI", workers=2, extra=FAST) as (srv, port), Flows(20, port) as flows:
        mport = metrics_port(srv)
        for _ in range(10):
            for i in range(20):
                flows.send(i, b"a")
            assert len(flows.collect(20, 10)) == 20
        before = wait_metric(mport, lambda ms: sum(
            by_slot(ms, "shardudp_datagrams_received_total").values()) == 200)
        victim = next(iter(srv.ready_pids(count=1).values()))
        mark = srv.mark()
        os.kill(victim, signal.SIGKILL)
        srv.ready_pids(start=mark)
        for _ in range(5):
            for i in range(20):
                flows.send(i, b"b")
            assert len(flows.collect(20, 10)) == 20
        after = wait_metric(mport, lambda ms: sum(
            by_slot(ms, "shardudp_datagrams_received_total").values()) >= 300)
        for name in ("shardudp_datagrams_received_total", "shardudp_bytes_sent_total"):
            for labels, value in before[name].items():
                assert after[name][labels] >= value, (name, labels)
        restarts = by_slot(after, "shardudp_worker_restarts_total", reason="signal")
        assert sum(restarts.values()) == 1


def test_kernel_drops_of_a_stopped_worker_only() -> None:
    extra = [*FAST, "--rcvbuf", "4096", "--timeout", "60"]
    with serving("apps:WhoAmI", workers=2, extra=extra) as (srv, port), Flows(40, port) as flows:
        mport = metrics_port(srv)
        slots = srv.ready_pids(count=2)
        owner = {}
        for i in range(40):  # one at a time: the tiny buffers must not drop these
            flows.send(i, b"who")
            ((flow, data),) = flows.collect(1, 5)
            owner[flow] = int(data.split(b":")[0])
        victim_slot, victim = next(iter(slots.items()))
        mine = [i for i, pid in owner.items() if pid == victim]
        assert mine, "no flow hashed to the victim"
        os.kill(victim, signal.SIGSTOP)
        try:
            for _ in range(400):
                for i in mine:
                    flows.send(i, b"f" * 200)
            drops = wait_metric(mport, lambda ms: by_slot(
                ms, "shardudp_socket_drops_total").get(str(victim_slot), 0) > 0)
            others = {s: v for s, v in by_slot(drops, "shardudp_socket_drops_total").items()
                      if s != str(victim_slot)}
            assert set(others.values()) == {0.0}
            assert by_slot(drops, "shardudp_socket_receive_buffer_bytes")[str(victim_slot)] > 0
        finally:
            os.kill(victim, signal.SIGCONT)
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


def healthz(port: int) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_healthz_follows_ready_workers(tmp_path) -> None:
    gate = tmp_path / "slow"
    with serving("apps:SlowStart", workers=2, extra=FAST,
                 env={"SLOW_START_FILE": str(gate)}) as (srv, _port):
        mport = metrics_port(srv)
        assert healthz(mport) == 200
        gate.touch()
        victim = next(iter(srv.ready_pids(count=1).values()))
        mark = srv.mark()
        os.kill(victim, signal.SIGKILL)
        srv.wait_line("restarting", start=mark)
        deadline = time.monotonic() + 5
        while healthz(mport) != 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # scrape pacing
        assert healthz(mport) == 503
        gate.unlink()
        srv.ready_pids(start=mark)
        deadline = time.monotonic() + 5
        while healthz(mport) != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthz(mport) == 200


@pytest.mark.parametrize("interval", ["0"])
def test_metrics_off_still_serves(interval: str) -> None:
    with serving("workers.echo:Echo", workers=1,
                 extra=["--metrics", "127.0.0.1:0", "--metrics-interval", interval]) as \
            (srv, port), Flows(1, port) as flows:
        mport = metrics_port(srv)
        flows.send(0, b"x")
        assert flows.collect(1, 5)
        m = scrape(mport)
        assert "shardudp_datagrams_received_total" not in m or \
            sum(by_slot(m, "shardudp_datagrams_received_total").values()) == 0
        assert m["shardudp_worker_up"]
