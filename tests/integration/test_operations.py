"""Operations: config files, the control socket, privileges, systemd notify, pid file."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import pytest
from harness import ROOT, Flows, McastSenders, Server, ctl, free_port, serving, started
from test_multicast_connected import GROUP

from shardudp import control, wire
from shardudp.errors import StartupError
from shardudp.pidfile import claim as _claim_pid_file
from shardudp.pidfile import release as _release_pid_file


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                SHARDUDP_CONTROL="none")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "shardudp", *args], capture_output=True,
                          text=True, timeout=30, env=full, stdin=subprocess.DEVNULL)


def test_config_with_two_unicast_and_one_multicast_listener(tmp_path: Path) -> None:

    def launch() -> tuple[Server, tuple[int, int, int]]:
        p1, p2, p3 = free_port(), free_port(), free_port()
        cfg = tmp_path / "shardudp.toml"
        cfg.write_text(f"""
workers = 2
metrics_interval = 0.5

[[listener]]
name = "echo"
app = "echo"
bind = "127.0.0.1:{p1}"

[[listener]]
name = "upper"
app = "apps:Upper"
bind = "127.0.0.1:{p2}"
rcvbuf = 262144

[[listener]]
name = "disc"
app = "apps:Probe"
multicast = "{GROUP}:{p3}"
multicast_mode = "shard"
multicast_interface = "127.0.0.1"
""")
        assert _cli("check", "--config", str(cfg)).returncode == 0
        return Server(["run", "--config", str(cfg)]), (p1, p2, p3)

    with started(launch, ready="all 2 workers ready") as (srv, (p1, p2, p3)):
        with Flows(1, p1) as a, Flows(1, p2) as b:
            a.send(0, b"hello")
            b.send(0, b"hello")
            assert [d for _, d in a.collect(1, 5)] == [b"hello"]
            assert [d for _, d in b.collect(1, 5)] == [b"HELLO"]
        with McastSenders(4, GROUP, p3) as senders:
            senders.send_many((GROUP, p3), 8, b"m")
            got = senders.replies(8, 5)
            assert sorted(p for _, p in got) == [b"m%06d" % i for i in range(8)]
        srv.wait_line(r"listener upper: asked SO_RCVBUF 262144, the kernel gave \d+")


def test_check_reports_every_error_with_its_key_and_prints_effective_config(
        tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('workers = 0\nbogus = 1\n[[listener]]\napp = "a:B"\nbind = "localhost:5"\n'
                   'multicast_mode = "single"\n')
    res = _cli("check", "--config", str(bad))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    for needle in ("workers: 0 is out of range", "bogus: unknown setting",
                   "listener[0].bind: 'localhost' is not an IP",
                   "listener[0].multicast_mode: only valid on a multicast listener"):
        assert needle in res.stderr, res.stderr
    good = tmp_path / "good.toml"
    good.write_text('workers = 2\n[[listener]]\napp = "apps:Upper"\nbind = "127.0.0.1:5"\n')
    res = _cli("check", "--config", str(good), "--print-config", "--workers", "3",
               env={"SHARDUDP_TIMEOUT": "7"})
    assert res.returncode == 0, res.stderr
    eff = json.loads(res.stdout)
    assert (eff["workers"], eff["timeout"]) == (3, 7.0)
    assert eff["listener"][0]["bind"] == "127.0.0.1:5"
    missing = _cli("check", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "--config" in missing.stderr


def test_ctl_status_scale_reload_stop_lose_nothing() -> None:
    with serving("apps:WhoAmI", workers=2, extra=["--metrics-interval", "0.5"]) as (srv, port), \
            Flows(16, port) as flows:
        res = ctl(srv, "status", "--json")
        assert res.returncode == 0, res.stderr
        st = json.loads(res.stdout)
        assert st["workers"] == 2 and st["healthy"] and len(st["slots"]) == 2
        human = ctl(srv, "status")
        assert "SLOT" in human.stdout and "ready" in human.stdout
        assert ", 2 workers, healthy\n" in human.stdout, human.stdout

        results: list[subprocess.CompletedProcess[str]] = []
        mark = srv.mark()
        sent, replies = flows.stream(rate=300, duration=6.0, on_tick={
            0.1: lambda: results.append(ctl(srv, "scale", "3")),
            0.4: lambda: results.append(ctl(srv, "scale", "1")),
            0.6: lambda: results.append(ctl(srv, "reload")),
        })
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        assert [r.stdout for r in results] == ["scaling to 3 workers\n",
                                               "scaling to 1 worker\n", "reloading\n"]
        assert len(replies) == sent
        srv.wait_line("scaling up from 2 to 3", start=mark)
        srv.wait_line("scaling down from 3 to 1", start=mark)
        srv.wait_line("reload complete", start=mark)
        st = json.loads(ctl(srv, "status", "--json").stdout)
        assert st["workers"] == 1 and [s["slot"] for s in st["slots"]] == [0]
        assert ", 1 worker, healthy\n" in ctl(srv, "status").stdout
        assert json.loads(ctl(srv, "scale", "1", "--json").stdout) == {"workers": 1}

        res = ctl(srv, "stop")
        assert res.returncode == 0 and "stopping" in res.stdout
        assert srv.wait_exit(15) == 0


def test_control_socket_survives_fuzz_from_many_clients() -> None:
    rng = random.Random(1234)
    with serving("echo", workers=1) as (srv, port), Flows(1, port) as flows:
        payloads = [
            b"", b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"\x00\x00\x00\x02\xc1\xc1",
            msgpack.packb({"cmd": "scale"}), msgpack.packb({"cmd": "scale", "n": "x"}),
            msgpack.packb({"cmd": "nope"}), msgpack.packb([1, 2, 3]),
            msgpack.packb({"cmd": "status", "extra": 1}),
        ]
        framed = [len(p).to_bytes(4, "big") + p for p in payloads[4:]]
        deadline = time.monotonic() + 15
        socks = []
        for i in range(200):
            if time.monotonic() > deadline:
                break
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(srv.control)
                choice = i % 4
                if choice == 0:
                    s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
                elif choice == 1:
                    s.sendall(rng.choice(payloads))
                elif choice == 2:
                    s.sendall(rng.choice(framed))
                    reply = msgpack.unpackb(s.recv(65536)[4:])
                    assert reply["ok"] is False and reply["error"]
                # choice 3: connect and say nothing (kept open below)
            except OSError:
                pass  # the server may close on garbage: that is the point
            socks.append(s)
        # Silent clients hold nothing up: a real request still gets an answer.
        res = ctl(srv, "status", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["healthy"]
        for s in socks:
            s.close()
        # A trickling client is dropped, and one pipelining a full read of
        # requests gets every answer while others are still served.
        results: dict[str, object] = {}
        workers = [threading.Thread(target=lambda: results.update(trickle=_trickle(srv.control))),
                   threading.Thread(target=lambda: results.update(piped=_pipeline(srv.control)))]
        for t in workers:
            t.start()
        res = ctl(srv, "status", "--json")
        for t in workers:
            t.join(30)
        assert res.returncode == 0, res.stderr
        assert results == {"trickle": "dropped", "piped": "all answered"}
        flows.send(0, b"still serving")
        assert [d for _, d in flows.collect(1, 5)] == [b"still serving"]
        assert srv.proc.poll() is None


def _trickle(path: str) -> str:
    """Send a request one byte a second; the server must not wait for it forever."""
    frame = wire.encode_obj({"cmd": "status"})
    deadline = time.monotonic() + control.REQUEST_TIMEOUT + 3
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        for byte in frame[:-1]:
            s.send(bytes([byte]))
            readable, _, _ = select.select([s], [], [], min(1.0, deadline - time.monotonic()))
            if readable:
                return "dropped" if s.recv(100) == b"" else "answered?"
            if time.monotonic() >= deadline:
                return "still connected"
    return "request completed"


def _pipeline(path: str) -> str:
    frame = wire.encode_obj({"cmd": "status"})
    n = control.MAX_REQUEST // len(frame)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(frame * n)
        splitter = wire.FrameSplitter()
        ok = 0
        for _ in range(n):
            data = s.recv(1 << 20)
            if not data:
                return f"dropped after {ok} answers"
            ok += sum(msgpack.unpackb(p)["ok"] is True for p in splitter.feed(data))
            if ok == n:
                return "all answered"
    return f"{ok} of {n} answered"


def test_ctl_errors_are_clear() -> None:
    with serving("echo", workers=1) as (srv, _port):
        res = ctl(srv, "scale", "0")
        assert (res.returncode, res.stderr) == (
            2, "shardudp: error: ctl scale: 0 is out of range [1, 1024]\n")
        # A client that skips the command line's check gets the same words from the server.
        with pytest.raises(control.ControlError, match=r"^scale: 1025 is out of range"):
            control.call(srv.control, {"cmd": "scale", "n": 1025})
    res = _cli("ctl", "--control", "/tmp/definitely-not-there.sock", "status")
    assert (res.returncode, res.stderr) == (
        1, "shardudp: error: no shardudp is listening on /tmp/definitely-not-there.sock\n")


def _healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


def test_sd_notify_ready_only_after_all_workers_ready(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    gate = tmp_path / "gate"
    gate.touch()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(notify_path)
        port = free_port()
        srv = Server(["run", "apps:SlowStart", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                      "--metrics", "127.0.0.1:0"],
                     env={"NOTIFY_SOCKET": notify_path, "SLOW_START_FILE": str(gate)})
        try:
            srv.wait_line("starting 2 workers")
            (m,) = srv.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
            mport = int(m.group(1))
            # Workers are held in startProtocol: nothing may arrive yet.
            r, _, _ = select.select([ns], [], [], 1.0)
            assert not r, ns.recv(100)
            assert _healthz(mport) == 503
            gate.unlink()
            r, _, _ = select.select([ns], [], [], 10.0)
            assert r and ns.recv(100) == b"READY=1"
            # The health view is published before READY=1 and the log line go out, so
            # whoever acts on them finds /healthz at 200 at once: one probe, no retry.
            assert _healthz(mport) == 200
            srv.wait_line("all 2 workers ready")
            assert len(srv.ready_pids(count=2)) == 2
            # Again after a worker is replaced (both are edge-triggered).
            mark = srv.mark()
            os.kill(next(iter(srv.ready_pids(count=1).values())), signal.SIGKILL)
            srv.wait_line("all 2 workers ready", start=mark)
            assert _healthz(mport) == 200
            srv.signal(signal.SIGTERM)
            got = []
            for _ in range(4):  # READY=1 may have been repeated (systemd ignores that)
                r, _, _ = select.select([ns], [], [], 10.0)
                assert r, got
                got.append(ns.recv(100))
                if got[-1] == b"STOPPING=1":
                    break
            assert got[-1] == b"STOPPING=1" and set(got[:-1]) <= {b"READY=1"}, got
            assert srv.wait_exit(10) == 0
        finally:
            srv.stop()


def test_pid_file_written_removed_and_refuses_a_live_pid(tmp_path: Path) -> None:
    pid_file = tmp_path / "run" / "shardudp.pid"
    with serving("echo", workers=1, extra=["--pid-file", str(pid_file)]) as \
            (srv, _port):
        assert pid_file.read_text().strip() == str(srv.pid)
        res = _cli("run", "echo", "--bind", f"127.0.0.1:{free_port()}",
                   "--pid-file", str(pid_file))
        assert res.returncode == 1
        assert f"process {srv.pid} is still running" in res.stderr
    assert not pid_file.exists()


def _connect_as(uid: int, path: str) -> str:
    """Connect to a unix socket from a child running as ``uid``; the exception name or 'ok'."""
    outcomes = ("ok", "PermissionError", "other")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child only makes syscalls, then leaves
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return outcomes[os.waitstatus_to_exitcode(status)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to bind port 999 and drop to nobody")
def test_root_master_workers_run_as_nobody_on_port_999() -> None:
    port = 999
    if any(f":{port:04X} " in ln for name in ("udp", "udp6")
           for ln in Path(f"/proc/net/{name}").read_text().splitlines()):
        pytest.skip("port 999 busy on this machine")
    srv = Server(["run", "apps:WhoAmI", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                  "--user", "nobody"])
    try:
        srv.wait_line("all 2 workers ready")
        # The control socket stays the master's: the APP, running as nobody,
        # must not be able to scale or stop the root master.
        st = os.stat(srv.control)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
        assert _connect_as(65534, srv.control) == "PermissionError"
        pids = list(srv.ready_pids(count=2).values())
        for pid in pids:
            uids = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if ln.startswith("Uid:")).split()[1:]
            assert set(uids) == {"65534"}, uids
        with Flows(20, port) as flows:
            for i in range(20):
                flows.send(i, b"priv")
            got = flows.collect(20, 5)
        assert len(got) == 20
        # A replacement worker still gets the master's (root-owned) socket.
        mark = srv.mark()
        os.kill(pids[0], signal.SIGKILL)
        srv.ready_pids(start=mark)
        with Flows(20, port) as flows:
            for i in range(20):
                flows.send(i, b"again")
            assert len(flows.collect(20, 5)) == 20
    finally:
        srv.stop()


def _wait_healthy(path: str, timeout: float = 20.0) -> dict[str, object]:
    """Ask ``status`` until every slot is ready (for servers that log to a file)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = control.call(path, {"cmd": "status"}, timeout=2)
        except (OSError, control.ControlError) as exc:
            last = exc
        if isinstance(last, dict) and last["healthy"]:
            return last
        time.sleep(0.1)  # polling pace; the event is the status turning healthy
    raise AssertionError(f"never healthy: {last!r}")


def test_failing_reopen_logs_is_an_error_reply_and_the_server_keeps_serving(
        tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    log_file = log_dir / "shardudp.log"
    with serving("echo", workers=2, ready=False,
                 extra=["--log-file", str(log_file)]) as (srv, port), Flows(1, port) as flows:
        _wait_healthy(srv.control)
        (log_dir / "shardudp.log").unlink()
        log_dir.rmdir()
        res = ctl(srv, "reopen-logs")
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert "reopen-logs failed" in res.stderr and "No such file or directory" in res.stderr
        assert "Traceback" not in res.stderr
        flows.send(0, b"still here")
        assert [d for _, d in flows.collect(1, 5)] == [b"still here"]
        st = json.loads(ctl(srv, "status", "--json").stdout)
        assert st["healthy"] and len(st["slots"]) == 2
        # Once the directory is back, reopening works and the log goes on.
        log_dir.mkdir()
        res = ctl(srv, "reopen-logs")
        assert res.returncode == 0 and "reopened" in res.stdout, res.stderr
        assert ctl(srv, "scale", "3").returncode == 0
        deadline = time.monotonic() + 10
        while "scaling up from 2 to 3" not in log_file.read_text():
            assert time.monotonic() < deadline, log_file.read_text()
            time.sleep(0.05)  # polling pace; the event is the line in the file
        assert srv.proc.poll() is None


def test_second_server_clashing_on_the_control_socket_binds_nothing() -> None:
    with serving("echo", workers=1) as (first, _port), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        # The second server's port is taken too: had it bound UDP first, it
        # would complain about the port rather than the control socket.
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        res = _cli("run", "echo", "--bind", f"127.0.0.1:{port}",
                   env={"SHARDUDP_CONTROL": first.control})
        assert res.returncode == 1, res.stderr
        assert f"control socket {first.control} is served by a running shardudp" in res.stderr
        assert "--control PATH" in res.stderr and "--control none" in res.stderr
        assert "in use" not in res.stderr and "Traceback" not in res.stderr
        # The first server's socket was left alone.
        assert json.loads(ctl(first, "status", "--json").stdout)["healthy"]


def test_own_control_directory_is_created_private_and_refused_if_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "shardudp-own"
    monkeypatch.setattr(control, "_own_dir", lambda: own)
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    sel = selectors.DefaultSelector()
    path = str(own / "control.sock")
    old_umask = os.umask(0o022)
    try:
        srv = control.ControlServer(path, lambda req: None, sel)
    finally:
        os.umask(old_umask)
    srv.close()
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
    own.chmod(0o755)
    with pytest.raises(StartupError, match=r"open to other users \(mode 0755\); chmod 700"):
        control.ControlServer(path, lambda req: None, sel)
    own.chmod(0o700)
    if os.geteuid() == 0:
        os.chown(own, 65534, 65534)
        with pytest.raises(StartupError, match="belongs to uid 65534, not to us"):
            control.ControlServer(path, lambda req: None, sel)
    own.rmdir()
    own.symlink_to(tmp_path)
    with pytest.raises(StartupError, match="is not a directory"):
        control.ControlServer(path, lambda req: None, sel)
    # A directory the operator names is theirs: /tmp itself is not ours, nor private.
    named = control.ControlServer(str(tmp_path / "named.sock"), lambda req: None, sel)
    assert stat.S_IMODE(os.stat(named.path).st_mode) == 0o600
    named.close()
    # The socket's own directory is made (a container's fresh /tmp), never its parents:
    # as root, a mistyped path would otherwise grow a tree anywhere.
    fresh = control.ControlServer(str(tmp_path / "fresh" / "c.sock"), lambda req: None, sel)
    fresh.close()
    assert stat.S_IMODE((tmp_path / "fresh").stat().st_mode) == 0o700
    typo = tmp_path / "typo" / "dir"
    with pytest.raises(StartupError, match=f"control socket directory {typo}: its parent "
                                           f"{typo.parent} does not exist; create it, or pass "
                                           "--control PATH"):
        control.ControlServer(str(typo / "c.sock"), lambda req: None, sel)
    assert not typo.parent.exists()
    # Longer than sun_path: a real reason, not "None" (check refuses it before this).
    long_path = str(tmp_path / ("x" * (control.MAX_PATH + 1)))
    with pytest.raises(StartupError, match=f"cannot bind control socket {long_path}: "
                                           "AF_UNIX path too long"):
        control.ControlServer(long_path, lambda req: None, sel)
    sel.close()


def _turn(sel: selectors.BaseSelector, timeout: float = 1.0) -> int:
    """One master loop turn, as far as the control socket is concerned."""
    events = sel.select(timeout)
    for key, mask in events:
        key.data(mask)
    return len(events)


def test_a_pipelining_client_gets_a_batch_per_turn_and_every_answer(tmp_path: Path) -> None:
    calls: list[str] = []

    def handler(req: control.Request) -> object:
        calls.append(req.cmd)
        return len(calls)

    sel = selectors.DefaultSelector()
    srv = control.ControlServer(str(tmp_path / "c.sock"), handler, sel)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(srv.path)
            assert _turn(sel) == 1  # accepted
            frame = wire.encode_obj({"cmd": "status"})
            n = control.MAX_REQUEST // len(frame)  # one full read of requests
            client.sendall(frame * n)
            _turn(sel)
            assert len(calls) == control.MAX_FRAMES_PER_TURN
            client.setblocking(False)
            splitter = wire.FrameSplitter()
            answers: list[object] = []
            for _ in range(2 * n):
                if len(answers) == n:
                    break
                _turn(sel)
                with contextlib.suppress(BlockingIOError):
                    answers += [msgpack.unpackb(p)["result"]
                                for p in splitter.feed(client.recv(1 << 20))]
            assert answers == list(range(1, n + 1))
    finally:
        srv.close()
        sel.close()


def test_a_client_dropped_for_not_reading_gets_no_more_answers_computed(
        tmp_path: Path) -> None:
    calls: list[str] = []
    big = "x" * 300_000

    def handler(req: control.Request) -> object:
        calls.append(req.cmd)
        return big

    sel = selectors.DefaultSelector()
    srv = control.ControlServer(str(tmp_path / "c.sock"), handler, sel)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(srv.path)
            _turn(sel)
            client.sendall(wire.encode_obj({"cmd": "status"}) * control.MAX_FRAMES_PER_TURN)
            for _ in range(10):
                if not srv.conns:
                    break
                _turn(sel)
            assert not srv.conns
            reply = len(wire.encode_obj({"ok": True, "result": big}))
            assert len(calls) == control.MAX_OUTBOX // reply + 1
    finally:
        srv.close()
        sel.close()


def test_pid_file_claim_is_atomic_and_replaces_only_stale_files(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "x.pid")
    fd = _claim_pid_file(path, 4242)
    try:
        assert Path(path).read_text() == "4242\n"
        # A second claim (another open file: as another server would) is refused.
        with pytest.raises(StartupError, match="process 4242 is still running"):
            _claim_pid_file(path, 4343)
    finally:
        _release_pid_file(path, fd)
    assert not Path(path).exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    for stale in (f"{dead.pid}\n", "garbage", ""):
        Path(path).write_text(stale)
        fd = _claim_pid_file(path, 4444)
        assert Path(path).read_text() == "4444\n"
        _release_pid_file(path, fd)
    # A live pid in a file nobody locks still counts (a server that predates locking).
    Path(path).write_text(f"{os.getpid()}\n")
    with pytest.raises(StartupError, match=f"process {os.getpid()} is still running"):
        _claim_pid_file(path, 4545)


def test_servers_started_together_on_one_pid_file_leave_one_running(tmp_path: Path) -> None:
    pid_file = tmp_path / "shardudp.pid"
    servers = [Server(["run", "echo", "--bind", f"127.0.0.1:{free_port()}",
                       "--workers", "1", "--pid-file", str(pid_file)]) for _ in range(3)]
    try:
        pidfds = {os.pidfd_open(s.pid): s for s in servers}
        exited: list[Server] = []
        deadline = time.monotonic() + 20
        try:
            while len(exited) < 2 and time.monotonic() < deadline:
                waiting = [fd for fd, s in pidfds.items() if s not in exited]
                ready, _, _ = select.select(waiting, [], [], deadline - time.monotonic())
                exited += [pidfds[fd] for fd in ready]
        finally:
            for fd in pidfds:
                os.close(fd)
        assert [s.wait_exit(5) for s in exited] == [1, 1], [s.log for s in servers]
        (winner,) = [s for s in servers if s not in exited]
        winner.wait_line("all 1 workers ready")
        assert winner.proc.poll() is None
        assert pid_file.read_text() == f"{winner.pid}\n"
        for srv in servers:
            if srv is not winner:
                assert "is still running" in srv.log and "Traceback" not in srv.log
    finally:
        for srv in servers:
            srv.stop()


def test_the_systemd_units_reload_is_a_rolling_restart() -> None:
    """`systemctl reload shardudp` runs the unit's ExecReload with $MAINPID set."""
    unit = (ROOT / "deploy" / "systemd" / "shardudp.service").read_text()
    (reload_line,) = [ln for ln in unit.splitlines() if ln.startswith("ExecReload=")]
    with serving("echo", workers=2) as (srv, _port):
        old = srv.ready_pids(count=2)
        mark = srv.mark()
        argv = [a.replace("$MAINPID", str(srv.pid))
                for a in reload_line.removeprefix("ExecReload=").split()]
        assert subprocess.run(argv, timeout=10).returncode == 0
        srv.wait_line("reload complete", start=mark)
        new = srv.ready_pids(start=mark, count=2)
        assert set(new) == set(old) and not set(new.values()) & set(old.values())
