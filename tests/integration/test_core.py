"""The sharded server core, as a user runs it: real processes, loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from harness import ROOT, Flows, Server, serving, session_pids, wait_pid_gone

pytestmark = pytest.mark.integration


def test_four_workers_200_flows_all_echoed_and_all_workers_serve() -> None:
    with serving("apps:WhoAmI", workers=4) as (srv, port), Flows(200, port) as flows:
        ready = srv.ready_pids(count=4)
        for i in range(200):
            flows.send(i, b"flow%03d" % i)
        got = flows.collect(200, timeout=10)
        assert len(got) == 200
        by_flow = {i: data for i, data in got}
        assert sorted(by_flow) == list(range(200))
        pids = set()
        for i, data in by_flow.items():
            pid, _, payload = data.partition(b":")
            assert payload == b"flow%03d" % i
            pids.add(int(pid))
        assert pids == set(ready.values())


def _kill_one(srv: Server) -> None:
    pid = next(iter(srv.ready_pids(count=1).values()))
    os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("datapath", ["python", "c"])
def test_kill_9_of_a_worker_under_steady_stream_loses_nothing(datapath: str) -> None:
    from shardudp.port import HAVE_C_BATCHIO

    if datapath == "c" and not HAVE_C_BATCHIO:
        pytest.skip("C batch helper not built here")
    with serving("workers.echo:Echo", workers=2, extra=["--datapath", datapath]) as (srv, port), \
            Flows(16, port) as flows:
        mark = srv.mark()
        sent, replies = flows.stream(rate=400, duration=3.0, on_tick={0.4: lambda: _kill_one(srv)})
        assert len(replies) == sent
        # The replacement came up in the killed worker's slot.
        srv.wait_line(r"killed by signal 9; restarting", start=mark)
        srv.wait_line(r"worker slot=\d+ pid=\d+ ready", start=mark)


def test_rolling_hup_loses_nothing_and_replaces_every_worker() -> None:
    with serving("workers.echo:Echo", workers=2) as (srv, port), Flows(16, port) as flows:
        old = set(srv.ready_pids(count=2).values())
        mark = srv.mark()
        sent, replies = flows.stream(rate=400, duration=3.0,
                                     on_tick={0.2: lambda: srv.signal(signal.SIGHUP)})
        assert len(replies) == sent
        srv.wait_line("reload complete", start=mark)
        new = set(srv.ready_pids(start=mark, count=2).values())
        assert not old & new
        for pid in old:
            assert wait_pid_gone(pid, 5)


def test_hup_picks_up_code_changes(tmp_path) -> None:
    app = tmp_path / "reloadme.py"
    app.write_text("from twisted.internet.protocol import DatagramProtocol\n"
                   "class P(DatagramProtocol):\n"
                   "    def datagramReceived(self, d, a):\n"
                   "        self.transport.write(b'v1', a)\n")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    with serving("reloadme:P", workers=1, env=env) as (srv, port), Flows(1, port) as flows:
        flows.send(0, b"x")
        assert flows.collect(1, 5)[0][1] == b"v1"
        app.write_text(app.read_text().replace("v1", "v2"))
        mark = srv.mark()
        srv.signal(signal.SIGHUP)
        srv.wait_line("reload complete", start=mark)
        flows.send(0, b"x")
        assert flows.collect(1, 5)[0][1] == b"v2"


def test_term_stops_in_time_and_stop_protocol_ran_everywhere(tmp_path) -> None:
    marker = tmp_path / "marks"
    with serving("apps:Marker", workers=3, env={"MARKER_FILE": str(marker)},
                 extra=["--graceful-timeout", "5"]) as (srv, _port):
        pids = set(srv.ready_pids(count=3).values())
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(timeout=8) == 0
    lines = marker.read_text().split("\n")
    assert {int(ln.split()[1]) for ln in lines if ln.startswith("stop")} == pids
    assert {int(ln.split()[1]) for ln in lines if ln.startswith("start")} == pids


def test_kill_9_of_the_master_leaves_no_worker() -> None:
    with serving("workers.echo:Echo", workers=3) as (srv, _port):
        pids = list(srv.ready_pids(count=3).values())
        os.kill(srv.pid, signal.SIGKILL)
        for pid in pids:
            assert wait_pid_gone(pid, 5), f"worker {pid} outlived its master"
        assert session_pids(srv.pid) == []


def _run_fail(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-m", "shardudp", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT,
                          stdin=subprocess.DEVNULL)


def _assert_clean_error(res: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out, out
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert any(needle in ln for ln in errors), out


@pytest.mark.parametrize(("app", "needle"), [
    ("no_such_module:Echo", "cannot import 'no_such_module'"),
    ("apps:Nope", "has no attribute 'Nope'"),
    ("apps:broken_factory", "raised while being built: RuntimeError: the database is down"),
    ("apps:NotAProtocol", "not a DatagramProtocol subclass"),
])
def test_boot_failures_halt_with_exit_code_3_and_one_clear_line(app: str, needle: str) -> None:
    from harness import free_port

    res = _run_fail("run", app, "--bind", f"127.0.0.1:{free_port()}", "--workers", "2")
    _assert_clean_error(res, 3, needle)


def test_port_in_use_by_someone_else() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        res = _run_fail("run", "workers.echo:Echo", "--bind", f"127.0.0.1:{port}")
    _assert_clean_error(res, 1, "already in use")


@pytest.mark.parametrize("bind", ["127.0.0.1", "localhost:99", "1.2.3.4.5:1", "[::1]:70000",
                                  "::1:53"])
def test_bad_bind_is_a_usage_error(bind: str) -> None:
    res = _run_fail("run", "workers.echo:Echo", "--bind", bind)
    _assert_clean_error(res, 2, "--bind")


def test_second_server_on_a_served_port_refuses() -> None:
    with serving("workers.echo:Echo", workers=2) as (_srv, port):
        res = _run_fail("run", "workers.echo:Echo", "--bind", f"127.0.0.1:{port}")
        _assert_clean_error(res, 1, "already in use")
        res = _run_fail("run", "workers.echo:Echo", "--bind", f"0.0.0.0:{port}")
        _assert_clean_error(res, 1, "already in use")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_largest_datagram_echoes_whole(family: socket.AddressFamily) -> None:
    with serving("workers.echo:Echo", workers=2, family=family) as (_srv, port), \
            Flows(1, port, family) as flows:
        payload = os.urandom(65507)
        flows.send(0, payload)
        got = flows.collect(1, timeout=5)
        assert got and got[0][1] == payload


def test_worker_logs_reach_the_master_tagged_with_slot_and_pid() -> None:
    with serving("workers.echo:Echo", workers=2) as (srv, _port):
        ready = srv.ready_pids(count=2)
        for slot, pid in ready.items():
            srv.wait_line(rf"\[{pid}\] \[{slot}\] INFO twisted: Echo starting on")


def test_handler_exception_does_not_kill_the_worker() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        flows.send(0, b"raise")
        flows.send(0, b"after")
        assert [d for _, d in flows.collect(1, 5)] == [b"after"]
        srv.wait_line("asked to raise")


def test_crashing_worker_is_replaced_in_its_slot() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        mark = srv.mark()
        flows.send(0, b"exit")
        srv.wait_line(r"slot=0 pid=\d+ exited with code 7; restarting", start=mark)
        srv.ready_pids(start=mark)
        flows.send(0, b"back")
        assert [d for _, d in flows.collect(1, 5)] == [b"back"]


def test_blocking_mode_left_by_a_dead_worker_does_not_wedge_its_replacement() -> None:
    with serving("apps:Misbehave", workers=1, extra=["--timeout", "3"]) as (srv, port), \
            Flows(1, port) as flows:
        mark = srv.mark()
        flows.send(0, b"block-and-exit")
        srv.ready_pids(start=mark)
        for i in range(5):
            flows.send(0, b"x%d" % i)
        assert len(flows.collect(5, 5)) == 5
        # Still heartbeating: no timeout kill after the replacement's reads.
        flows.send(0, b"y")
        assert flows.collect(1, 5)
        assert "missed its heartbeat" not in srv.log


def test_wedged_worker_misses_heartbeat_and_is_replaced() -> None:
    with serving("apps:Misbehave", workers=1, extra=["--timeout", "1.5",
                                                     "--graceful-timeout", "1"]) as (srv, port), \
            Flows(1, port) as flows:
        mark = srv.mark()
        flows.send(0, b"wedge")
        srv.wait_line("missed its heartbeat", start=mark, timeout=10)
        srv.ready_pids(start=mark, timeout=15)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]


def test_corrupt_frame_from_a_worker_gets_it_replaced() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        mark = srv.mark()
        flows.send(0, b"corrupt")
        srv.wait_line("bad frame", start=mark)
        srv.ready_pids(start=mark)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]
        assert srv.proc.poll() is None


def test_ttin_and_ttou_add_and_remove_a_worker() -> None:
    with serving("apps:WhoAmI", workers=2) as (srv, port):
        mark = srv.mark()
        srv.signal(signal.SIGTTIN)
        srv.wait_line(r"worker slot=2 pid=\d+ ready", start=mark)
        srv.wait_line("all 3 workers ready", start=mark)
        mark = srv.mark()
        srv.signal(signal.SIGTTOU)
        srv.wait_line("scaling down from 3 to 2", start=mark)
        srv.wait_line("slot 2 drained and closed", start=mark)
        with Flows(60, port) as flows:
            for i in range(60):
                flows.send(i, b"q")
            got = flows.collect(60, 10)
        assert len(got) == 60
        pids = {int(d.split(b":")[0]) for _, d in got}
        assert len(pids) == 2


def _udp_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def test_each_worker_holds_only_its_own_slot_socket() -> None:
    from pathlib import Path

    with serving("workers.echo:Echo", workers=3) as (srv, port):
        pids = srv.ready_pids(count=3)
        group = set()
        for name in ("udp", "udp6"):
            for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    group.add(int(parts[9]))
        assert len(group) == 3  # one socket per slot, all held by the master
        master = _udp_inodes(srv.pid)
        assert group <= master
        seen = []
        for pid in pids.values():
            mine = _udp_inodes(pid) & group
            assert len(mine) == 1, (pid, mine)
            seen.append(mine.pop())
        assert len(set(seen)) == 3
