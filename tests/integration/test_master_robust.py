"""The master cannot be wedged, starved or taken over.

Each test injects what the audit measured against a running server (real
processes on loopback) and checks the master keeps supervising: a log output
nobody reads, a crowd of idle connections to the metrics port, a burst of
control clients, a paused master, a leaking handler, and, as root with
--user, files planted by that user.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from harness import (
    ROOT,
    STARTED_SESSIONS,
    TESTS,
    Server,
    child_env,
    ctl,
    free_port,
    http_get,
    metric_sum,
    metrics_port,
    run_cli,
    serving,
    session_pids,
)
from steady import Stream

from shardudp import control, httpd

T = TypeVar("T")


def until(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Poll ``check`` until it returns something, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)  # polling interval, not synchronisation: check() decides


def status_at(path: str) -> dict[str, Any]:
    return control.call(path, {"cmd": "status"}, timeout=5)  # type: ignore[no-any-return]


def pids_of(st: dict[str, Any]) -> dict[int, int]:
    return {sl["slot"]: sl["pid"] for sl in st["slots"] if sl["pid"]}


@contextlib.contextmanager
def server_on(args: list[str], stdout: int, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m shardudp ARGS`` with its stdout and stderr on ``stdout``."""
    proc = subprocess.Popen([sys.executable, "-m", "shardudp", *args], stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stdout, env=env or child_env(),
                            cwd=cwd or ROOT, start_new_session=True)
    STARTED_SESSIONS.add(proc.pid)
    try:
        yield proc
    finally:
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def test_a_log_output_nobody_reads_never_wedges_the_master(tmp_path: Path) -> None:
    fifo = tmp_path / "out"
    os.mkfifo(fifo)
    # Our read end keeps the FIFO open and is never read: the output fills.
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    wfd = os.open(fifo, os.O_WRONLY)
    sock = str(tmp_path / "c.sock")
    args = ["run", "apps:Chatty", "--bind", f"127.0.0.1:{free_port()}", "--workers", "2",
            "--control", sock, "--metrics", "127.0.0.1:0"]
    try:
        with server_on(args, wfd) as proc:
            os.close(wfd)
            wfd = -1
            before = until("2 ready workers", lambda: len(pids_of(_try_status(sock))) == 2
                           and pids_of(_try_status(sock)), 20)
            mport = int(status_at(sock)["metrics_port"])
            # A pipe counts as full when its pages are, whatever bytes they hold.
            until("a full FIFO", lambda: _queued(rfd) >= 32768, 10)
            # kill -9 of a worker: replaced within 1 s.
            os.kill(before[0], signal.SIGKILL)
            t0 = time.monotonic()
            until("the replacement", lambda: pids_of(_try_status(sock)).get(0) not in (
                None, before[0]), 5)
            replaced = time.monotonic() - t0
            t0 = time.monotonic()
            status_at(sock)
            answered = time.monotonic() - t0
            # The master's own bounded buffer fills next; then it drops, and counts.
            dropped = until("dropped log records", lambda: metric_sum(
                mport, "shardudp_log_records_dropped_total"), 15)
            print(f"FIFO nobody reads: replaced in {replaced:.3f}s, status in {answered:.3f}s, "
                  f"{dropped:.0f} log records dropped")
            assert replaced < 1.0 and answered < 1.0 and dropped > 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)


def _try_status(path: str) -> dict[str, Any]:
    try:
        return status_at(path)
    except (OSError, control.ControlError):
        return {"slots": []}


def _queued(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


@contextlib.contextmanager
def crowd(port: int, n: int) -> Iterator[None]:
    """``n`` idle TCP connections to ``port`` from another process (as nobody when we
    are root), held until the block ends."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child holds the connections
        try:
            os.close(ready_r)
            os.close(hold_w)
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            socks = []
            for _ in range(n):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                socks.append(s)
            os.write(ready_w, b"x")
            os.read(hold_r, 1)  # until the test is done
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        assert os.read(ready_r, 1) == b"x"
        yield
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def test_a_crowd_on_the_metrics_port_takes_no_more_than_its_bound() -> None:
    with serving("apps:WhoAmI", workers=2, extra=["--metrics", "127.0.0.1:0"]) \
            as (srv, port):
        mport = metrics_port(srv)
        base_fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
        with crowd(mport, 1000):
            until("the crowd handled", lambda: len(os.listdir(f"/proc/{srv.pid}/fd"))
                  >= base_fds + httpd.MAX_CLIENTS // 2, 10)
            fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
            threads = _threads(srv.pid)
            print(f"1000 idle connections: master fds {base_fds} -> {fds} "
                  f"(bound +{httpd.FDS_USED}), threads {threads}")
            assert fds <= base_fds + httpd.FDS_USED and threads <= 2
            # A killed worker is replaced, and a new client gets its answer.
            slot, victim = next(iter(srv.ready_pids(count=2).items()))
            mark = srv.mark()
            os.kill(victim, signal.SIGKILL)
            srv.wait_line(rf"worker slot={slot} pid=\d+ ready", start=mark)
            assert http_get(mport, "/healthz")[0] == 200
            del port


def test_a_burst_of_128_control_clients_is_answered_each() -> None:
    with serving("apps:WhoAmI", workers=1) as (srv, _port):
        clients = []
        for _ in range(128):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(srv.control)  # no EAGAIN: the backlog holds the burst
            clients.append(c)
        from shardudp import wire

        for c in clients:
            c.sendall(wire.encode_obj({"cmd": "status"}))
        answered = 0
        for c in clients:
            c.settimeout(10)
            frames = wire.FrameSplitter()
            got: list[bytes] = []
            while not got:
                data = c.recv(65536)
                assert data, "closed without an answer"
                got = frames.feed(data)
            reply = wire.unpack_untrusted(got[0])
            assert isinstance(reply, dict) and reply["ok"], reply
            answered += 1
            c.close()
        print(f"control burst: {answered} of 128 answered")
        assert answered == 128


def test_a_paused_master_kills_no_worker_when_it_resumes() -> None:
    with serving("apps:WhoAmI", workers=2, extra=["--timeout", "2"]) as (srv, port), \
            Stream(port, n=10) as stream:
        before = srv.ready_pids(count=2)
        mark = srv.mark()

        def pause() -> None:
            os.kill(srv.pid, signal.SIGSTOP)

        def resume() -> None:
            os.kill(srv.pid, signal.SIGCONT)

        res = stream.run(200, 6.0, events={0.5: pause, 4.5: resume})
        res.report("master SIGSTOPped for 2x --timeout")
        srv.wait_line(r"the master did not run for \d+\.\ds", start=mark)
        assert "missed its heartbeat" not in srv.log[mark:]
        st = json.loads(ctl(srv, "status", "--json").stdout)
        assert pids_of(st) == before
        assert res.lost == 0


def test_a_leaking_worker_is_replaced_successor_first_with_nothing_lost() -> None:
    extra = ["--max-worker-memory", "120M", "--metrics", "127.0.0.1:0"]
    with serving("apps:Leaky", workers=1, extra=extra) as (srv, port), \
            Stream(port, n=20) as stream:
        mport = metrics_port(srv)
        mark = srv.mark()
        res = stream.run(300, 6.0)
        res.report("a leaking handler under max_worker_memory 120M")
        srv.wait_line(r"over max_worker_memory \(120 MiB\); replacing it \(its successor "
                      r"first\)", start=mark)
        assert metric_sum(mport, "shardudp_worker_restarts_total", reason="memory") >= 1
        assert res.lost == 0


@pytest.mark.root
def test_as_root_files_planted_by_the_worker_user_never_run_or_get_written(
        tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the master must run as root with --user nobody")
    nobody = pwd.getpwnam("nobody")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    os.chown(cwd, nobody.pw_uid, nobody.pw_gid)
    marker = tmp_path / "marker"
    planted = f"import os\nopen({str(marker)!r}, 'a').write(f'{{os.getuid()}}\\n')\n"
    for name in ("prometheus_client", "msgpack", "h11", "twisted", "tomllib"):
        (cwd / f"{name}.py").write_text(planted)
    os.chmod(tmp_path, 0o755)
    env = dict(child_env(), PYTHONPATH=os.pathsep.join((str(ROOT), str(TESTS))))
    srv = Server(["run", "apps:WhoAmI", "--bind", f"127.0.0.1:{free_port()}", "--workers", "1",
                  "--user", "nobody"], env=env, cwd=cwd)
    try:
        srv.wait_line(r"all 1 workers ready", timeout=20)
    finally:
        srv.stop()
    uids = marker.read_text().split() if marker.exists() else []
    assert "0" not in uids, "a module planted in the current directory ran as root"
    # A pid file whose name the worker user made a link to a root-owned file.
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o755)
    (rundir / "shardudp.pid").symlink_to(victim)
    res = run_cli("run", "apps:WhoAmI", "--bind", f"127.0.0.1:{free_port()}", "--workers", "1",
                  "--user", "nobody", "--pid-file", str(rundir / "shardudp.pid"),
                  "--control", str(tmp_path / "c.sock"))
    assert res.returncode != 0 and "is a symbolic link: refusing to follow it" in res.stderr, \
        res.stderr
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("datapath", ["c", "python", "python-loop"])
def test_truncated_datagrams_are_counted_and_said_once_with_the_size_that_fits(
        datapath: str) -> None:
    from shardudp import datapaths

    if datapath in datapaths.missing():
        pytest.skip(f"{datapath} cannot run here: {datapaths.missing()[datapath]}")
    extra = ["--max-packet-size", "100", "--metrics", "127.0.0.1:0",
             "--metrics-interval", "0.2", "--datapath", datapath]
    with serving("apps:WhoAmI", workers=1, extra=extra) as (srv, port), \
            Stream(port, n=1) as stream:
        mport = metrics_port(srv)
        for size in (50, 300, 200):
            stream.send_to(0, b"x" * size)
        until("two truncated datagrams", lambda: metric_sum(
            mport, "shardudp_datagrams_truncated_total") == 2, 10)
        line = srv.wait_line(r"listener (\S+): datagrams longer than max_packet_size \(100 "
                             r"bytes\) were cut; (.*)")[0]
        # The batch paths know each datagram's real length; recvfrom cannot tell.
        if datapath == "python-loop":
            assert "cannot tell by how much" in line.group(2)
        else:
            assert line.group(2) == ("the longest was 300 bytes: set max_packet_size to at "
                                     "least 300")
        stream.send_to(0, b"y" * 400)
        until("the fourth", lambda: metric_sum(mport, "shardudp_datagrams_truncated_total")
              == 3, 10)
        assert srv.log.count("were cut;") == 1  # once per listener
