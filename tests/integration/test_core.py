"""The sharded server core, as a user runs it: real processes, loopback."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import apps
import pytest
from harness import (
    ROOT,
    Flows,
    Server,
    child_env,
    ctl,
    free_port,
    run_cli,
    serving,
    session_pids,
    wait_pid_gone,
)

from shardudp.errors import ExitCode

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
    with serving("echo", workers=2, extra=["--datapath", datapath]) as (srv, port), \
            Flows(16, port) as flows:
        mark = srv.mark()
        sent, replies = flows.stream(rate=400, duration=3.0, on_tick={0.4: lambda: _kill_one(srv)})
        assert len(replies) == sent
        # The replacement came up in the killed worker's slot.
        srv.wait_line(r"killed by signal 9; restarting", start=mark)
        srv.wait_line(r"worker slot=\d+ pid=\d+ ready", start=mark)


def test_rolling_hup_loses_nothing_and_replaces_every_worker() -> None:
    with serving("echo", workers=2) as (srv, port), Flows(16, port) as flows:
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


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_term_stops_in_time_and_stop_protocol_ran_everywhere(tmp_path, sig: int) -> None:
    marker = tmp_path / "marks"
    with serving("apps:Marker", workers=3, env={"MARKER_FILE": str(marker)},
                 extra=["--graceful-timeout", "5"]) as (srv, _port):
        pids = set(srv.ready_pids(count=3).values())
        srv.signal(sig)
        assert srv.wait_exit(timeout=8) == 0
        assert f"stopping: {signal.Signals(sig).name} received" in srv.log
    lines = marker.read_text().split("\n")
    assert {int(ln.split()[1]) for ln in lines if ln.startswith("stop")} == pids
    assert {int(ln.split()[1]) for ln in lines if ln.startswith("start")} == pids


def test_worker_stuck_past_the_graceful_deadline_is_killed_and_the_stop_completes() -> None:
    with serving("apps:StuckStop", workers=2, extra=["--graceful-timeout", "1"]) as (srv, _port):
        pids = srv.ready_pids(count=2)
        mark = srv.mark()
        srv.signal(signal.SIGTERM)
        # Stopped, but not gracefully: its own exit code, not 0.
        assert srv.wait_exit(timeout=10) == ExitCode.FORCED == 4
        for slot, pid in pids.items():
            srv.wait_line(rf"worker slot={slot} pid={pid} did not stop in time; killing",
                          start=mark)
        assert "workers had to be killed" in srv.log
        assert "Traceback" not in srv.log


def test_a_second_term_kills_at_once_and_exits_forced() -> None:
    with serving("apps:StuckStop", workers=1, extra=["--graceful-timeout", "30"]) \
            as (srv, _port):
        srv.ready_pids(count=1)
        mark = srv.mark()
        srv.signal(signal.SIGTERM)
        srv.wait_line(r"stopping: SIGTERM received", start=mark)
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(timeout=10) == ExitCode.FORCED


def test_term_answers_every_datagram_queued_before_it() -> None:
    # 2 ms per datagram: most of the burst is still queued when TERM arrives,
    # well past what one read event delivers (256).
    with serving("apps:Slow", workers=1) as (srv, port), Flows(20, port) as flows:
        srv.ready_pids(count=1)
        sent = 600
        for i in range(sent):
            flows.send(i % 20, b"q%04d" % i)
        srv.signal(signal.SIGTERM)
        got = {data for _, data in flows.collect(sent, timeout=15)}
        assert srv.wait_exit(timeout=15) == 0
        assert len(got) == sent
        assert "did not stop in time" not in srv.log


@pytest.mark.parametrize("app", ["echo", "apps:Chatty"])
def test_kill_9_of_the_master_leaves_no_worker_and_no_traceback(app: str) -> None:
    with serving(app, workers=3) as (srv, _port):
        pids = list(srv.ready_pids(count=3).values())
        if app == "apps:Chatty":  # mid-stream
            srv.wait_line(rf"\[{pids[0]}\] \[\d\] INFO apps: chat 100$")
        os.kill(srv.pid, signal.SIGKILL)
        for pid in pids:
            assert wait_pid_gone(pid, 5), f"worker {pid} outlived its master"
        assert session_pids(srv.pid) == []
        srv.wait_exit(5)  # and the output is complete
        assert "Traceback" not in srv.log, srv.log[-3000:]
        assert "BrokenPipe" not in srv.log, srv.log[-3000:]


def test_wedged_worker_is_gone_soon_after_a_kill_9_of_its_master() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        pid = srv.ready_pids()[0]
        flows.send(0, b"wedge")
        srv.wait_line(rf"\[{pid}\] \[0\] WARNING apps: wedging")
        os.kill(srv.pid, signal.SIGKILL)
        # The reactor never runs again; the worker's own timer ends it.
        assert wait_pid_gone(pid, 8), "a wedged worker outlived its master"


def test_a_worker_killed_mid_log_stream_does_not_silence_the_others() -> None:
    with serving("apps:Chatty", workers=2, extra=["--graceful-timeout", "10"]) as (srv, _port):
        ready = srv.ready_pids(count=2)
        victim, other = ready[0], ready[1]
        srv.wait_line(rf"\[{victim}\] \[0\] INFO apps: chat 300$")
        os.kill(victim, signal.SIGKILL)
        mark = srv.mark()
        srv.wait_line(rf"slot=0 pid={victim} killed by signal 9", start=mark)
        after = srv.mark()
        # The survivor's records keep arriving, and so do the replacement's.
        srv.wait_line(rf"\[{other}\] \[1\] INFO apps: chat \d+$", start=after, count=100)
        new = srv.ready_pids(start=mark)[0]
        srv.wait_line(rf"\[{new}\] \[0\] INFO apps: chat \d+$", start=mark, count=100)
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(timeout=15) == 0
        assert "did not stop in time" not in srv.log


def _assert_clean_error(res: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out, out
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln.lower()]
    assert any(needle in ln for ln in errors), out


BAD_APPS = {
    "raise_at_import": "raise RuntimeError('settings.ini is missing')\n",
    "exit_at_import": "import sys\nsys.exit('no licence key')\n",
    "interrupt_at_import": "raise KeyboardInterrupt\n",
}


def _apps_line(text: str) -> str:
    """``path:line`` of the line of tests/apps.py holding ``text``."""
    path = Path(apps.__file__)
    lines = path.read_text().splitlines()
    return f"{path}:{next(i for i, ln in enumerate(lines, 1) if text in ln)}"


@pytest.mark.parametrize(("app", "needle"), [
    ("no_such_module:Echo",
     "failed in import: ModuleNotFoundError: No module named 'no_such_module'"),
    ("raise_at_import:P",
     "failed in import at {tmp}/raise_at_import.py:1: RuntimeError: settings.ini is missing"),
    ("exit_at_import:P",
     "failed in import at {tmp}/exit_at_import.py:2: SystemExit: no licence key"),
    ("interrupt_at_import:P",
     "failed in import at {tmp}/interrupt_at_import.py:1: KeyboardInterrupt"),
    ("apps:Nope", "names nothing: module 'apps' has no attribute 'Nope'"),
    ("apps:broken_factory", "failed in build at "
     f"{_apps_line('the database is down')}: RuntimeError: the database is down"),
    ("apps:NotAProtocol", "is a class but not a DatagramProtocol subclass"),
    ("apps:RaiseInStartProtocol", "failed in startProtocol at "
     f"{_apps_line('boom in startProtocol')}: RuntimeError: boom in startProtocol"),
])
def test_boot_failures_halt_with_exit_code_3_and_one_line_naming_app_listener_and_place(
        tmp_path: Path, app: str, needle: str) -> None:
    for name, code in BAD_APPS.items():
        (tmp_path / f"{name}.py").write_text(code)
    port = free_port()
    res = run_cli("run", app, "--bind", f"127.0.0.1:{port}", "--workers", "2",
                  env=child_env([tmp_path]))
    needle = f"APP {app!r} (listener udp-127.0.0.1:{port}) " + needle.format(tmp=tmp_path)
    _assert_clean_error(res, 3, needle)
    out = (res.stdout + res.stderr).splitlines()
    assert len([ln for ln in out if needle in ln]) == 1, "\n".join(out)
    assert "Broken pipe" not in res.stderr


def test_an_app_exiting_by_itself_while_booting_halts_with_exit_code_3() -> None:
    res = run_cli("run", "apps:ExitInStartProtocol", "--bind", f"127.0.0.1:{free_port()}",
                  "--workers", "2", timeout=20)
    needle = "exited with status 7 while booting the APP"
    _assert_clean_error(res, 3, needle)
    (line,) = [ln for ln in res.stderr.splitlines() if needle in ln]
    assert re.fullmatch(rf"shardudp: error: worker slot=[01] {needle}", line)


@pytest.mark.parametrize(("app", "needle"), [
    ("apps:HugeBootError", "RuntimeError: bad config value: xxx"),
    ("apps:SurrogateBootError", "RuntimeError: cannot read /etc/caf\\udce9.conf"),
])
def test_a_huge_or_undecodable_boot_error_still_halts_with_one_line(app: str,
                                                                   needle: str) -> None:
    res = run_cli("run", app, "--bind", f"127.0.0.1:{free_port()}", "--workers", "1",
                  timeout=20)
    _assert_clean_error(res, 3, needle)
    (line,) = [ln for ln in res.stderr.splitlines() if needle in ln]
    assert len(line) < 5000
    if app == "apps:HugeBootError":  # the end of the message survives the cut too
        assert "characters cut" in line and line.endswith(" (the end)")


def test_a_log_record_that_is_not_utf8_arrives_escaped() -> None:
    with serving("apps:SurrogateLog", workers=1) as (srv, _port):
        pid = srv.ready_pids()[0]
        srv.wait_line(rf"\[{pid}\] \[0\] WARNING apps: file name caf\\udce9$")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run workers as nobody")
def test_an_app_the_worker_user_cannot_read_gets_the_user_hint(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "hidden_app.py").write_text(BAD_APPS["raise_at_import"])
    res = run_cli("run", "hidden_app:P", "--bind", f"127.0.0.1:{free_port()}",
                  "--workers", "1", "--user", "nobody", "--control", "none",
                  env=child_env([hidden]))
    _assert_clean_error(res, 3, "ModuleNotFoundError: No module named 'hidden_app' (the "
                                "worker runs as uid 65534: are the Python installation and "
                                "the APP readable by that user?)")


def test_boot_failure_with_a_log_file_names_the_cause_once_there_and_once_on_stderr(
        tmp_path: Path) -> None:
    log_file = tmp_path / "shardudp.log"
    res = run_cli("run", "apps:broken_factory", "--bind", f"127.0.0.1:{free_port()}",
                  "--log-file", str(log_file))
    _assert_clean_error(res, 3, "the database is down")
    assert res.stderr.count("the database is down") == 1
    assert log_file.read_text().count("the database is down") == 1


def test_port_in_use_by_someone_else() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
        other.bind(("127.0.0.1", 0))
        port = other.getsockname()[1]
        res = run_cli("run", "echo", "--bind", f"127.0.0.1:{port}")
    _assert_clean_error(res, 1, "already in use")


@pytest.mark.parametrize("bind", ["127.0.0.1", "localhost:99", "1.2.3.4.5:1", "[::1]:70000",
                                  "::1:53"])
def test_bad_bind_is_a_usage_error(bind: str) -> None:
    res = run_cli("run", "echo", "--bind", bind)
    _assert_clean_error(res, 2, "--bind")


def test_second_server_on_a_served_port_refuses() -> None:
    with serving("echo", workers=2) as (_srv, port):
        res = run_cli("run", "echo", "--bind", f"127.0.0.1:{port}")
        _assert_clean_error(res, 1, "already in use")
        res = run_cli("run", "echo", "--bind", f"0.0.0.0:{port}")
        _assert_clean_error(res, 1, "already in use")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_largest_datagram_echoes_whole(family: socket.AddressFamily) -> None:
    with serving("echo", workers=2, family=family) as (_srv, port), \
            Flows(1, port, family) as flows:
        payload = os.urandom(65507)
        flows.send(0, payload)
        got = flows.collect(1, timeout=5)
        assert got and got[0][1] == payload


def test_worker_logs_reach_the_master_tagged_with_slot_and_pid() -> None:
    with serving("echo", workers=2) as (srv, _port):
        ready = srv.ready_pids(count=2)
        for slot, pid in ready.items():
            srv.wait_line(rf"\[{pid}\] \[{slot}\] INFO twisted: Echo starting on")


def test_handler_exception_does_not_kill_the_worker() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        flows.send(0, b"raise")
        flows.send(0, b"after")
        assert [d for _, d in flows.collect(1, 5)] == [b"after"]
        srv.wait_line("asked to raise")


def test_crash_loop_restarts_with_growing_delays_then_serves(tmp_path: Path) -> None:
    env = {"CRASH_FILE": str(tmp_path / "boots"), "CRASHES": "4"}
    with serving("apps:CrashAfterReady", workers=1, env=env) as (srv, port), \
            Flows(1, port) as flows:
        lines = srv.wait_line(r"slot=0 pid=\d+ exited with code 5; restarting(?: in (\S+)s)?$",
                              count=4)
        delays = [float(m.group(1) or 0) for m in lines]
        assert delays == sorted(delays) and len(set(delays)) == 4, delays
        srv.ready_pids(count=5)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]
        assert (tmp_path / "boots").read_text().split() == ["boot"] * 5


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


@pytest.mark.parametrize("cmd", [b"wedge", b"wedge-chatty"])
def test_wedged_worker_misses_heartbeat_and_is_replaced(cmd: bytes) -> None:
    with serving("apps:Misbehave", workers=1, extra=["--timeout", "1.5",
                                                     "--graceful-timeout", "1"]) as (srv, port), \
            Flows(1, port) as flows:
        mark = srv.mark()
        flows.send(0, cmd)
        srv.wait_line("missed its heartbeat", start=mark, timeout=10)
        srv.ready_pids(start=mark, timeout=15)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]


@pytest.mark.parametrize(("cmd", "problem"), [
    (b"corrupt", "undecodable msgpack frame"),
    (b"oversize", "exceeds the 1048576-byte limit"),
])
def test_bad_frame_from_a_worker_gets_it_replaced(cmd: bytes, problem: str) -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        mark = srv.mark()
        flows.send(0, cmd)
        srv.wait_line(rf"slot=0 pid=\d+: bad frame: .*{problem}.*; replacing it", start=mark)
        srv.ready_pids(start=mark)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]
        assert srv.proc.poll() is None


def test_worker_whose_pipe_the_master_sees_closed_is_replaced() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        pid = srv.ready_pids()[0]
        mark = srv.mark()
        flows.send(0, b"null-pipe")
        srv.wait_line(rf"worker slot=0 pid={pid} closed its pipe to the master; replacing it",
                      start=mark)
        srv.ready_pids(start=mark)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]


def test_worker_that_cannot_write_to_the_master_stops_cleanly_and_is_replaced() -> None:
    with serving("apps:Misbehave", workers=1) as (srv, port), Flows(1, port) as flows:
        pid = srv.ready_pids()[0]
        mark = srv.mark()
        flows.send(0, b"close-pipe")
        srv.wait_line(rf"shardudp: worker slot=0 pid={pid}: pipe to the master failed: "
                      r"\[Errno 9\] Bad file descriptor; stopping", start=mark)
        srv.ready_pids(start=mark)
        flows.send(0, b"alive")
        assert [d for _, d in flows.collect(1, 5)] == [b"alive"]
        assert "Traceback" not in srv.log
        assert "Unhandled error" not in srv.log


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

    with serving("echo", workers=3) as (srv, port):
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


def _lowest_free_fd(pid: int) -> int:
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


def test_out_of_file_descriptors_on_scale_up_is_one_line_and_the_server_carries_on() -> None:
    with serving("apps:WhoAmI", workers=2) as (srv, port), Flows(40, port) as flows:
        srv.ready_pids(count=2)
        soft, hard = resource.prlimit(srv.pid, resource.RLIMIT_NOFILE)
        free = _lowest_free_fd(srv.pid)
        # No fd left: the new slot's socket cannot be created.
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (free, hard))
        mark = srv.mark()
        srv.signal(signal.SIGTTIN)
        srv.wait_line(r"ERROR .*cannot open sockets for new slot 2: Too many open files; "
                      r"scale-up stopped at 2 workers$", start=mark)
        # One fd left: the socket opens, the worker's pipes cannot. A slot that
        # never had a worker must not keep sockets in the group: it is closed.
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (free + 1, hard))
        mark = srv.mark()
        srv.signal(signal.SIGTTIN)
        srv.wait_line(r"ERROR .*cannot start a worker for new slot 2: Too many open files; "
                      r"scale-up stopped at 2 workers$", start=mark)
        srv.wait_line(r"slot 2 drained and closed", start=mark)
        for i in range(40):
            flows.send(i, b"q%02d" % i)
        assert len(flows.collect(40, 10)) == 40  # nothing went to the closed slot
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (soft, hard))
        # Asked again with descriptors to spare, the scale-up succeeds.
        srv.signal(signal.SIGTTIN)
        srv.wait_line(r"worker slot=\d+ pid=\d+ ready", start=mark)
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit() == 0
        assert "Traceback" not in srv.log
        failures = [ln for ln in srv.lines[mark:] if "Too many open files" in ln]
        assert len(failures) == 1, failures


def test_too_low_a_file_descriptor_limit_is_refused_at_startup_in_one_line() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    # 100 slots: 100 sockets and 200 pipe ends cannot fit under 256 fds.
    res = run_cli("run", "echo", "--bind", f"127.0.0.1:{free_port()}",
                  "--workers", "100", preexec_fn=low_limit)
    _assert_clean_error(res, 2, "the limit is 256")
    assert re.fullmatch(r"shardudp: error: --workers: 100 workers need about (\d+) file "
                        r"descriptors, but the limit is 256: raise it \(`ulimit -n \1` in the "
                        r"shell, LimitNOFILE=\1 under systemd\) or run fewer workers",
                        res.stderr.splitlines()[-1]), res.stderr
    # Before it, at most the warning that 100 workers are many for this host's CPUs.
    assert all("100 workers are" in ln for ln in res.stderr.splitlines()[:-1]), res.stderr
    assert res.stdout == ""


def test_the_soft_file_descriptor_limit_is_raised_to_the_hard_one() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 256:
        pytest.skip(f"hard fd limit {hard} leaves nothing to raise to")
    # A soft limit of 64 is below what 2 workers are estimated to need.
    srv = Server(["run", "echo", "--bind", f"127.0.0.1:{free_port()}",
                  "--workers", "2"], prefix=["prlimit", f"--nofile=64:{hard}"])
    try:
        srv.wait_line(r"all 2 workers ready")
        assert resource.prlimit(srv.pid, resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        srv.stop()


def _limit_leaving(pid: int, free: int) -> int:
    """The RLIMIT_NOFILE under which process ``pid`` has exactly ``free`` fd numbers unused."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    unused = [n for n in range(len(used) + free) if n not in used][:free]
    return unused[-1] + 1


def test_a_worker_that_cannot_start_says_so_in_one_line_not_a_traceback() -> None:
    with serving("apps:WhoAmI", workers=1) as (srv, _port):
        srv.ready_pids()
        soft, hard = resource.prlimit(srv.pid, resource.RLIMIT_NOFILE)
        # Room for the new slot's socket and the worker's pipes, so the fork
        # succeeds, and none for the worker to import its own code.
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (_limit_leaving(srv.pid, 5), hard))
        mark = srv.mark()
        srv.signal(signal.SIGTTIN)
        srv.wait_line(r"^shardudp: worker slot=1 crashed: \w+: .*Too many open files", start=mark)
        srv.wait_line(r"worker slot=1 pid=\d+ exited with code 1; restarting", start=mark)
        resource.prlimit(srv.pid, resource.RLIMIT_NOFILE, (soft, hard))
        srv.wait_line(r"worker slot=1 pid=\d+ ready", start=mark, timeout=20)
        assert "Traceback" not in srv.log


def test_a_bad_frame_read_after_the_worker_was_reaped_signals_no_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from shardudp import config, master, services, supervision, wire

    cfg = config.build(cli={"app": "echo", "bind": ["127.0.0.1:9"], "workers": 1})
    actions: list[supervision.Action] = []

    class Recorder(services.Service):
        def after_action(self, action: supervision.Action) -> None:
            actions.append(action)

    m = master.Master(cfg, [Recorder()])
    m.sup = supervision.Supervisor(1, supervision.Policy(10.0, 5.0, 8.0), 0.0)

    def no_fork(slot: int, incarnation: int, beside: bool = False) -> int:
        raise OSError(errno.EAGAIN, "not in this test")

    monkeypatch.setattr(m, "_fork", no_fork)
    (spawn,) = m.sup.start()
    assert isinstance(spawn, supervision.Spawn)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child writes a corrupt frame and leaves
        os.write(w, b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
        os._exit(0)
    os.close(w)
    m.children[pid] = master.Child(pid, 0, spawn.incarnation, r, -1, wire.Decoder())
    m.apply(m.sup.spawned(0, spawn.incarnation, pid, 0.0))
    # A zombie now, its frame still unread: the master reaps it, then drains the pipe.
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    signals: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda p, sig: signals.append((p, sig)))
    try:
        m._reap()
    finally:
        m.selector.close()
        m._wake_r.close()
        m._wake_w.close()
    assert supervision.Kill(pid, supervision.Sig.TERM) in actions  # the bad frame asked for it...
    assert signals == []  # ...and nobody got it
    assert [a.reason for a in actions if isinstance(a, supervision.Retired)] == [
        supervision.RestartReason.WIRE]


def test_prints_from_workers_arrive_as_whole_lines() -> None:
    """Workers share the master's stdout; under PYTHONUNBUFFERED each print()
    must still be one write, or two workers' lines interleave mid-line."""
    with serving("apps:Printer", workers=2, env={"PYTHONUNBUFFERED": "1"}) as (srv, _):
        srv.wait_line(r"^printer \d+ done$", count=2)
        lines = [ln for ln in srv.lines if "printer" in ln]
    whole = [ln for ln in lines if re.fullmatch(r"printer \d+ \d{4} x{60}|printer \d+ done", ln)]
    assert whole == lines
    assert len(whole) == 2 * (apps.Printer.LINES + 1)


def test_a_server_on_the_hosts_default_control_socket_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As when an operator runs shardudp by hand on this host (as root it serves
    /run/shardudp/control.sock): every server the suite starts has a control socket of
    its own, and the hand-started one keeps serving its own."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    default = {"SHARDUDP_CONTROL": "auto", "RUNTIME_DIRECTORY": str(runtime)}
    by_hand = Server(["run", "echo", "--bind", "127.0.0.1:0", "--workers", "1"], env=default)
    try:
        by_hand.wait_line("all 1 workers ready")
        by_hand.wait_line(f"control socket {runtime}/control.sock")
        # From here on this host's default control socket is the one by_hand serves.
        monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
        res = run_cli("run", "apps:broken_factory", "--bind", f"127.0.0.1:{free_port()}",
                      "--workers", "1")
        _assert_clean_error(res, 3, "the database is down")
        with serving("echo", workers=1) as (srv, _port):
            assert srv.control != f"{runtime}/control.sock"
            status = ctl(srv, "status", "--json")
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["master_pid"] == srv.pid
        hand = run_cli("status", "--json", env=dict(child_env(), **default))
        assert hand.returncode == 0, hand.stderr
        assert json.loads(hand.stdout)["master_pid"] == by_hand.pid
    finally:
        by_hand.stop()


def test_the_masters_last_line_says_it_stopped_and_its_exit_code() -> None:
    with serving("echo", workers=1) as (srv, _port):
        pass
    master = [ln for ln in srv.lines if "[master]" in ln]
    assert re.search(rf"INFO shardudp\.master: shardudp master pid={srv.pid} stopped, exit "
                     r"code 0$", master[-1]), master[-3:]
    res = run_cli("run", "apps:broken_factory", "--bind", f"127.0.0.1:{free_port()}",
                  "--workers", "1")
    assert res.returncode == 3
    lines = res.stderr.splitlines()
    assert re.search(r"WARNING shardudp\.master: shardudp master pid=\d+ stopped, exit code 3$",
                     lines[-2]), lines[-3:]
    assert "the database is down" in lines[-1]


def _worker_report_age(metrics_port: int) -> float | None:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^shardudp_worker_last_report_age_seconds\{slot="0"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_with_counting_off_the_worker_report_age_follows_its_heartbeat() -> None:
    """The worker series remain with --metrics-interval 0: nothing reports metrics, so the
    age is the heartbeat's, and stays fresh while the worker is alive."""
    with serving("echo", workers=1, extra=["--metrics", "127.0.0.1:0", "--metrics-interval",
                                           "0", "--timeout", "2"]) as (srv, _port):
        (m,) = srv.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
        age = _worker_report_age(int(m.group(1)))
        assert age is not None and age < 2.0, age
        time.sleep(3.0)  # not synchronisation: the time that passes is what is measured
        age = _worker_report_age(int(m.group(1)))
        # Heartbeats every 0.5 s, the view republished every second.
        assert age is not None and age < 2.0, age
