"""No blackholes: a slot that cannot read never keeps its share of traffic.

Each fault of the audit, injected under a steady stream at a rate two
workers hold easily, with the loss counted and printed: a poison datagram,
the APP closing its own port, a worker SIGSTOPped past --timeout, and a
scale-up that runs out of file descriptors. Flows whose slot stayed healthy
never change worker.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import resource
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from harness import Server, ctl, http_get, metric_sum, metrics_port, serving
from steady import Stream

from shardudp.steering import Steering, Table, flow_hash

RATE = 600.0
MAX_LOSS = 0.01


def status(srv: Server) -> dict[str, Any]:
    res = ctl(srv, "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def slot_of_pid(st: dict[str, Any]) -> dict[int, int]:
    return {sl["pid"]: sl["slot"] for sl in st["slots"] if sl["pid"]}


def healthy_flows_kept_their_worker(res: Any, faulty_pids: set[int]) -> list[int]:
    """Flows first answered by a worker that was not hit, and later by another."""
    return [f for f, pids in res.pids.items() if pids[0] not in faulty_pids and len(pids) > 1]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_the_kernel_steers_every_flow_where_the_program_twin_says(
        family: socket.AddressFamily) -> None:
    with serving("apps:Faulty", workers=3, family=family) as (srv, port), \
            Stream(port, n=150, family=family) as stream:
        st = status(srv)
        steer = st["steering"]
        by_pid = slot_of_pid(st)
        twin = Steering(tuple(steer["table"]), (0, 1, 2), {}, family == socket.AF_INET6,
                        steer["seed"])
        res = stream.run(rate=1000, duration=0.3)
        assert res.lost == 0 and len(res.pids) == 150
        for flow, pids in res.pids.items():
            host, sport = stream.source(flow)
            h = flow_hash(ipaddress.ip_address(host).packed, sport, steer["seed"])
            assert [by_pid[p] for p in pids] == [twin.index_of(h)], flow
        assert Table(tuple(steer["table"])) == Table.initial(range(3))


def test_a_poison_source_is_quarantined_after_its_second_kill_and_released() -> None:
    with serving("apps:Faulty", workers=2, extra=["--quarantine", "3.5", "--metrics",
                                                  "127.0.0.1:0"]) as (srv, port), \
            Stream(port) as stream:
        before = slot_of_pid(status(srv))
        poisoner = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        poisoner.bind(("127.0.0.1", 0))
        killed_at = srv.mark()

        def poison() -> None:
            poisoner.sendto(b"poison", ("127.0.0.1", port))

        events = {0.5 + i: poison for i in range(12)}
        try:
            res = stream.run(RATE, duration=12.8, events=events)
        finally:
            poisoner.close()
        res.report("poison once a second, 12 times")
        log = srv.log
        kills = srv.wait_line(r"died handling a datagram from 127\.0\.0\.1:\d+ on udp-",
                              start=killed_at, count=2)
        assert "strike 1" in kills[0].string
        srv.wait_line(r"quarantined 127\.0\.0\.1:\d+ on udp-\S+ for 3\.5 s", start=killed_at)
        srv.wait_line(r"quarantine of 127\.0\.0\.1:\d+ on udp-\S+ is over", start=killed_at)
        # Released, it killed again, and was quarantined again on its second strike.
        assert len(re.findall(r"quarantined 127\.0\.0\.1", log)) >= 2
        # Never a backoff: a poison datagram is the sender's fault, not the slot's.
        assert "restarting in" not in log
        assert res.lost / res.sent <= MAX_LOSS, res.report("poison")
        assert not healthy_flows_kept_their_worker(res, set(before) - _survivors(srv, before))
        # The poison datagrams that arrived while quarantined were dropped and counted.
        assert _metric(srv, "shardudp_quarantine_dropped_total") >= 3


def _survivors(srv: Server, before: dict[int, int]) -> set[int]:
    now = slot_of_pid(status(srv))
    return {pid for pid in before if pid in now}


def test_an_app_that_closes_its_port_is_replaced_and_its_flows_are_served() -> None:
    with serving("apps:Faulty", workers=2, extra=["--metrics", "127.0.0.1:0"]) \
            as (srv, port), Stream(port) as stream:
        before = slot_of_pid(status(srv))
        closer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        closer.bind(("127.0.0.1", 0))
        mark = srv.mark()

        def close() -> None:
            closer.sendto(b"close", ("127.0.0.1", port))

        try:
            res = stream.run(RATE, duration=5.0, events={1.0: close})
        finally:
            closer.close()
        res.report("the APP called stopListening()")
        m = srv.wait_line(r"worker slot=(\d+) pid=(\d+): the APP called stopListening\(\) on "
                          r"listener udp-\S+; its flows go to other slots", start=mark)[0]
        hit = int(m.group(2))
        srv.wait_line(rf"worker slot={m.group(1)} pid=\d+ ready", start=mark)
        assert res.lost / res.sent <= MAX_LOSS
        assert not healthy_flows_kept_their_worker(res, {hit})
        restarts = _metric(srv, "shardudp_worker_restarts_total", reason="closed")
        assert restarts == 1.0
        del before


def _metric(srv: Server, name: str, **labels: str) -> float:
    return metric_sum(status(srv)["metrics_port"], name, **labels)


def test_a_stopped_worker_is_killed_at_its_deadline_and_its_flows_served() -> None:
    with serving("apps:Faulty", workers=2,
                 extra=["--timeout", "3", "--metrics", "127.0.0.1:0"]) as (srv, port), \
            Stream(port) as stream:
        mport = metrics_port(srv)
        before = slot_of_pid(status(srv))
        victim, victim_slot = next(iter(before.items()))
        seen: dict[str, Any] = {}

        def stop() -> None:
            os.kill(victim, signal.SIGSTOP)

        def look() -> None:
            seen["health"] = http_get(mport, "/healthz")
            seen["status"] = status(srv)

        mark = srv.mark()
        # Silent from 1.5 s (half of --timeout): steered and unhealthy; killed at 3 s.
        res = stream.run(RATE, duration=8.0, events={1.0: stop, 3.3: look})
        res.report("a worker SIGSTOPped past --timeout 3")
        srv.wait_line(rf"worker slot={victim_slot} pid={victim} missed its heartbeat", start=mark)
        srv.wait_line(rf"worker slot={victim_slot} pid={victim} killed by signal 9", start=mark)
        code, body = seen["health"]
        assert code == 503 and re.search(rf"not responding: {victim_slot}\b", body), body
        mine = next(s for s in seen["status"]["slots"] if s["slot"] == victim_slot)
        assert set(mine["not_serving"].values()) == {"not responding"}, mine
        assert res.lost / res.sent <= MAX_LOSS
        assert not healthy_flows_kept_their_worker(res, {victim})


def test_a_scale_up_out_of_descriptors_leaves_no_slot_without_a_worker() -> None:
    with serving("apps:Faulty", workers=2) as (srv, port), Stream(port) as stream:
        before = slot_of_pid(status(srv))
        soft, hard = resource.prlimit(srv.pid, resource.RLIMIT_NOFILE)
        used = len(os.listdir(f"/proc/{srv.pid}/fd"))
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (used + 16, hard))
        mark = srv.mark()

        def scale() -> None:
            ctl(srv, "scale", "60")

        res = stream.run(RATE, duration=5.0, events={1.0: scale})
        res.report("ctl scale 60 with a low fd limit")
        srv.wait_line(r"scale-up stopped at (\d+) workers", start=mark)
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (soft, hard))
        st = status(srv)
        assert all(sl["pid"] for sl in st["slots"]), st["slots"]
        # Only slots with a worker keep sockets bound to the port.
        table = Path("/proc/net/udp").read_text().splitlines()[1:]
        inodes = {int(line.split()[9]) for line in table
                  if int(line.split()[1].split(":")[1], 16) == port}
        assert len(inodes) == len(st["slots"]), (len(inodes), st["slots"])
        assert res.lost / res.sent <= MAX_LOSS
        # Flows moved only to the slots the scale-up added, never between old ones.
        new_pids = {sl["pid"] for sl in st["slots"] if sl["slot"] not in before.values()}
        for flow, pids in res.pids.items():
            assert pids[0] in before and set(pids[1:]) <= new_pids, (flow, pids)
        moved = sum(len(pids) > 1 for pids in res.pids.values())
        print(f"scale 2 -> {len(st['slots'])}: {moved} of {len(res.pids)} flows moved")
