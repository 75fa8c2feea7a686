"""Sessions survive reload and scale: real processes on loopback, a stateful APP.

``apps:Sessions`` answers ``seq version pid`` per datagram, seq counting
that flow's datagrams in its protocol instance: a flow whose seq starts over
lost its session. Every flow sends steadily; the tests count restarts and
lost datagrams, and print them.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from harness import Server, ctl, metric_sum, metrics_port, serving

PER_FLOW_INTERVAL = 0.1  # each flow sends ten datagrams a second


@dataclass
class Flow:
    sock: socket.socket
    sent: int = 0
    answered: int = 0
    last_seq: int = 0
    restarts: int = 0
    versions: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)


class Clients:
    """Flows that each send every PER_FLOW_INTERVAL while active, and check their seq."""

    def __init__(self, port: int, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.port = port
        self.family = family
        self.host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.flows: list[Flow] = []

    def add(self, n: int) -> list[int]:
        first = len(self.flows)
        for _ in range(n):
            s = socket.socket(self.family, socket.SOCK_DGRAM)
            s.bind((self.host, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.setblocking(False)
            self.flows.append(Flow(s))
        return list(range(first, first + n))

    def close(self) -> None:
        for f in self.flows:
            f.sock.close()

    def run(self, active: Iterable[int], seconds: float,
            events: dict[float, Callable[[], object]] | None = None) -> None:
        """Send from every flow in ``active`` each PER_FLOW_INTERVAL for ``seconds``."""
        active = list(active)
        todo = sorted((events or {}).items())
        start = time.monotonic()
        rounds = int(seconds / PER_FLOW_INTERVAL)
        for r in range(rounds):
            while todo and time.monotonic() - start >= todo[0][0]:
                todo.pop(0)[1]()
            for i in active:
                f = self.flows[i]
                f.sent += 1
                f.sock.sendto(b"%d" % f.sent, (self.host, self.port))
            self.receive(start + (r + 1) * PER_FLOW_INTERVAL)
        self.receive(time.monotonic() + 2.0, until_done=True)

    def receive(self, until: float, until_done: bool = False) -> None:
        by_fd = {f.sock.fileno(): f for f in self.flows}
        socks = [f.sock for f in self.flows]
        while True:
            left = until - time.monotonic()
            if left <= 0 or (until_done and all(f.answered >= f.sent for f in self.flows)):
                return
            ready, _, _ = select.select(socks, [], [], min(left, 0.05))
            for s in ready:
                f = by_fd[s.fileno()]
                for _ in range(64):
                    try:
                        data = s.recv(256)
                    except BlockingIOError:
                        break
                    seq, version, pid, _ = data.split(b" ", 3)
                    f.answered += 1
                    if int(seq) != f.last_seq + 1:
                        f.restarts += 1
                    f.last_seq = int(seq)
                    f.versions.append(version.decode())
                    if int(pid) not in f.pids:
                        f.pids.append(int(pid))

    def lost(self) -> int:
        return sum(f.sent - f.answered for f in self.flows)

    def restarts(self, flows: Iterable[int] | None = None) -> int:
        return sum(self.flows[i].restarts for i in (flows or range(len(self.flows))))


def status(srv: Server) -> dict[str, Any]:
    return json.loads(ctl(srv, "status", "--json").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def version_file(tmp_path: Path) -> Path:
    path = tmp_path / "version"
    path.write_text("v1")
    return path


def test_a_reload_keeps_every_active_session_and_new_flows_get_the_new_code(
        version_file: Path) -> None:
    extra = ["--session-idle", "1", "--drain-timeout", "30", "--metrics", "127.0.0.1:0"]
    with serving("apps:Sessions", workers=2, extra=extra,
                 env={"APP_VERSION_FILE": str(version_file)}) as (srv, port):
        mport = metrics_port(srv)
        clients = Clients(port)
        try:
            _reload_keeps_sessions(srv, clients, version_file, 200, mport)
        finally:
            clients.close()


#: Every data path tracks flows its own way (the C engine and the Python batch
#: engine per batch, the loops through the port's gate): each keeps sessions.
@pytest.mark.parametrize(("datapath", "family"), [
    ("c", socket.AF_INET6), ("python", socket.AF_INET), ("python-loop", socket.AF_INET6),
    ("twisted", socket.AF_INET)])
def test_every_data_path_keeps_sessions_across_a_reload(
        version_file: Path, datapath: str, family: socket.AddressFamily) -> None:
    if datapath == "c":
        from shardudp import datapaths

        if "c" in datapaths.missing():
            pytest.skip(f"the C data path is not built here: {datapaths.missing()['c']}")
    extra = ["--session-idle", "1", "--drain-timeout", "30", "--metrics", "127.0.0.1:0",
             "--datapath", datapath]
    with serving("apps:Sessions", workers=2, extra=extra, family=family,
                 env={"APP_VERSION_FILE": str(version_file)}) as (srv, port):
        mport = metrics_port(srv)
        clients = Clients(port, family)
        try:
            _reload_keeps_sessions(srv, clients, version_file, 40, mport, seconds=2.0)
        finally:
            clients.close()


def _reload_keeps_sessions(srv: Server, clients: Clients, version_file: Path, n: int,
                           mport: int, seconds: float = 4.0) -> None:
    """n active flows through a reload: none restarts, none is lost, new flows get the
    new code, and the old workers drain, then exit."""
    old = clients.add(n)
    old_pids = {sl["pid"] for sl in status(srv)["slots"]}
    mark = srv.mark()

    def reload() -> None:
        version_file.write_text("v2")
        assert ctl(srv, "reload").returncode == 0

    # n flows at 10 n datagrams a second; the reload a quarter in.
    clients.run(old, seconds, events={seconds / 4: reload})
    srv.wait_line(r"reload complete", start=mark)
    new = clients.add(20)
    clients.run([*old, *new], seconds / 4)
    lost, restarts = clients.lost(), clients.restarts()
    print(f"reload with {n} active flows: sent {sum(f.sent for f in clients.flows)}, "
          f"lost {lost}, sessions restarted {restarts}")
    assert restarts == 0 and lost == 0
    assert all(set(clients.flows[i].versions) == {"v1"} for i in old)
    assert all(set(clients.flows[i].versions) == {"v2"} for i in new)
    # The old flows go quiet: their old workers drain, then exit.
    clients.run(new, 2.0)
    for pid in old_pids:
        srv.wait_line(rf"worker slot=\d+ pid={pid} drained its sessions", start=mark)
    assert not old_pids & {sl["pid"] for sl in status(srv)["slots"]}
    assert metric_sum(mport, "shardudp_sessions_drained_total") == n
    assert metric_sum(mport, "shardudp_sessions_cut_total") == 0


def _slots(srv: Server, clients: Clients, flows: list[int]) -> dict[int, int]:
    """flow -> the slot that answers it now (one datagram each). A probe may land on
    another worker on purpose: its seq starting over is not counted."""
    by_pid = {sl["pid"]: sl["slot"] for sl in status(srv)["slots"] if sl["pid"]}
    restarts = [clients.flows[i].restarts for i in flows]
    for i in flows:
        clients.flows[i].pids.clear()
    clients.run(flows, PER_FLOW_INTERVAL)
    for i, n in zip(flows, restarts, strict=True):
        clients.flows[i].restarts = n
    return {i: by_pid[clients.flows[i].pids[-1]] for i in flows}


def _settled(srv: Server, clients: Clients, flows: list[int], n: int,
             mport: int) -> dict[int, int]:
    """Where each flow goes once the scale is done and every held session has ended."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        st = status(srv)
        done = len(st["slots"]) == n and all(sl["state"] == "ready" for sl in st["slots"])
        if done and metric_sum(mport, "shardudp_sessions_draining") == 0:
            return _slots(srv, clients, flows)
        clients.receive(time.monotonic() + 0.2)
    raise AssertionError("the held sessions never ended")


def test_scaling_keeps_active_sessions_and_moves_few_flows(version_file: Path) -> None:
    extra = ["--session-idle", "1", "--drain-timeout", "30", "--metrics", "127.0.0.1:0"]
    with serving("apps:Sessions", workers=2, extra=extra,
                 env={"APP_VERSION_FILE": str(version_file)}) as (srv, port):
        mport = metrics_port(srv)
        clients = Clients(port)
        try:
            flows = clients.add(200)
            before = _slots(srv, clients, flows)
            for n, step in ((3, "2 -> 3"), (2, "3 -> 2")):
                mark = srv.mark()
                clients.run(flows, 3.0, events={0.5: lambda n=n: ctl(srv, "scale", str(n))})
                srv.wait_line(rf"flow table: {n} slots", start=mark)
                restarts, lost = clients.restarts(), clients.lost()
                after = _settled(srv, clients, flows, n, mport)
                moved = sum(before[i] != after[i] for i in flows) / len(flows)
                print(f"scale {step}: {100 * moved:.1f}% of 200 flows moved "
                      f"(bound {100 * 1.5 / 3:.0f}%), sessions restarted {restarts}, "
                      f"lost {lost}")
                assert restarts == 0 and lost == 0
                assert 0 < moved <= 1.5 / 3
                before = after
            assert metric_sum(mport, "shardudp_flows_moved_total") > 0
        finally:
            clients.close()


def test_a_session_busy_past_the_drain_deadline_is_cut_and_counted(version_file: Path) -> None:
    extra = ["--session-idle", "1", "--drain-timeout", "1.5", "--metrics",
             "127.0.0.1:0", "--workers", "1"]
    with serving("apps:Sessions", workers=1, extra=extra,
                 env={"APP_VERSION_FILE": str(version_file)}) as (srv, port):
        mport = metrics_port(srv)
        clients = Clients(port)
        try:
            busy = clients.add(1)
            mark = srv.mark()

            def reload() -> None:
                version_file.write_text("v2")
                ctl(srv, "reload")

            clients.run(busy, 4.0, events={0.5: reload})
            srv.wait_line(r"reached its drain deadline", start=mark)
            f = clients.flows[busy[0]]
            print(f"busy flow: restarts {f.restarts}, versions {sorted(set(f.versions))}")
            assert f.restarts == 1 and f.versions[-1] == "v2" and clients.lost() == 0
            assert metric_sum(mport, "shardudp_sessions_cut_total", reason="deadline") == 1
        finally:
            clients.close()
