"""Operations: config files, the control socket, privileges, systemd notify, pid file."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from harness import ROOT, Flows, Server, ctl, free_port, serving
from test_multicast_connected import GROUP, McastSenders


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                SHARDUDP_CONTROL="none")
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "shardudp", *args], capture_output=True,
                          text=True, timeout=30, env=full, stdin=subprocess.DEVNULL)


def test_config_with_two_unicast_and_one_multicast_listener(tmp_path: Path) -> None:
    for _ in range(5):
        p1, p2, p3 = free_port(), free_port(), free_port()
        cfg = tmp_path / "shardudp.toml"
        cfg.write_text(f"""
workers = 2
metrics_interval = 0.5

[[listener]]
name = "echo"
app = "workers.echo:Echo"
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
        srv = Server(["run", "--config", str(cfg)])
        try:
            try:
                srv.wait_line("all 2 workers ready")
            except AssertionError:
                if "already in use" in srv.log:
                    continue
                raise
            with Flows(1, p1) as a, Flows(1, p2) as b:
                a.send(0, b"hello")
                b.send(0, b"hello")
                assert [d for _, d in a.collect(1, 5)] == [b"hello"]
                assert [d for _, d in b.collect(1, 5)] == [b"HELLO"]
            senders = McastSenders(4)
            try:
                senders.send_many(p3, 8, b"m")
                got = senders.replies(8, 5)
                assert sorted(p for _, p in got) == [b"m-%04d" % i for i in range(8)]
            finally:
                senders.close()
            srv.wait_line(r"listener upper: asked SO_RCVBUF 262144, the kernel gave \d+")
            return
        finally:
            srv.stop()
    pytest.fail("no free ports")


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
    good.write_text('workers = 2\n[[listener]]\napp = "a:B"\nbind = "127.0.0.1:5"\n')
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

        results: list[subprocess.CompletedProcess[str]] = []
        mark = srv.mark()
        sent, replies = flows.stream(rate=300, duration=6.0, on_tick={
            0.1: lambda: results.append(ctl(srv, "scale", "3")),
            0.4: lambda: results.append(ctl(srv, "scale", "1")),
            0.6: lambda: results.append(ctl(srv, "reload")),
        })
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        assert len(replies) == sent
        srv.wait_line("scaling up from 2 to 3", start=mark)
        srv.wait_line("scaling down from 3 to 1", start=mark)
        srv.wait_line("reload complete", start=mark)
        st = json.loads(ctl(srv, "status", "--json").stdout)
        assert st["workers"] == 1 and [s["slot"] for s in st["slots"]] == [0]

        res = ctl(srv, "stop")
        assert res.returncode == 0 and "stopping" in res.stdout
        assert srv.wait_exit(15) == 0


def test_control_socket_survives_fuzz_from_many_clients() -> None:
    rng = random.Random(1234)
    with serving("workers.echo:Echo", workers=1) as (srv, port), Flows(1, port) as flows:
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
        flows.send(0, b"still serving")
        assert [d for _, d in flows.collect(1, 5)] == [b"still serving"]
        assert srv.proc.poll() is None


def test_ctl_errors_are_clear() -> None:
    with serving("workers.echo:Echo", workers=1) as (srv, _port):
        res = ctl(srv, "scale", "0")
        assert res.returncode == 1 and "n must be between 1 and 1024" in res.stderr
    res = _cli("ctl", "--control", "/tmp/definitely-not-there.sock", "status")
    assert res.returncode == 1 and "no shardudp is listening" in res.stderr
    assert "Traceback" not in res.stderr


def test_sd_notify_ready_only_after_all_workers_ready(tmp_path: Path) -> None:
    notify_path = str(tmp_path / "notify.sock")
    gate = tmp_path / "gate"
    gate.touch()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(notify_path)
        port = free_port()
        srv = Server(["run", "apps:SlowStart", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
                     env={"NOTIFY_SOCKET": notify_path, "SLOW_START_FILE": str(gate)})
        try:
            srv.wait_line("starting 2 workers")
            # Workers are held in startProtocol: nothing may arrive yet.
            r, _, _ = select.select([ns], [], [], 1.0)
            assert not r, ns.recv(100)
            gate.unlink()
            r, _, _ = select.select([ns], [], [], 10.0)
            assert r and ns.recv(100) == b"READY=1"
            srv.wait_line("all 2 workers ready")
            assert len(srv.ready_pids(count=2)) == 2
            srv.signal(signal.SIGTERM)
            r, _, _ = select.select([ns], [], [], 10.0)
            assert r and ns.recv(100) == b"STOPPING=1"
            assert srv.wait_exit(10) == 0
        finally:
            srv.stop()


def test_pid_file_written_removed_and_refuses_a_live_pid(tmp_path: Path) -> None:
    pid_file = tmp_path / "run" / "shardudp.pid"
    with serving("workers.echo:Echo", workers=1, extra=["--pid-file", str(pid_file)]) as \
            (srv, _port):
        assert pid_file.read_text().strip() == str(srv.pid)
        res = _cli("run", "workers.echo:Echo", "--bind", f"127.0.0.1:{free_port()}",
                   "--pid-file", str(pid_file))
        assert res.returncode == 1
        assert f"process {srv.pid} is still running" in res.stderr
    assert not pid_file.exists()


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
