"""Multicast delivery modes and connected UDP, through a sharded server."""

from __future__ import annotations

import collections
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import Flows, McastSenders, Server, free_port, serving, wait_pid_gone

from shardudp.port import HAVE_C_BATCHIO
from shardudp.sockets import shard_of

GROUP = "239.255.42.99"
MODES = ("fanout", "single", "shard")
DATAPATHS = ["python", "twisted", pytest.param(
    "c", marks=pytest.mark.skipif(not HAVE_C_BATCHIO and not os.environ.get("SHARDUDP_REQUIRE_C"),
                                  reason="shardudp._batchio is not built"))]


def mcast_server(mode: str, workers: int = 3, app: str = "apps:Probe",
                 env: dict[str, str] | None = None, tries: int = 5,
                 extra: tuple[str, ...] = ()) -> tuple[Server, int]:
    for _ in range(tries):
        port = free_port()
        srv = Server(["run", app, "--multicast", f"{GROUP}:{port}", "--multicast-mode", mode,
                      "--multicast-interface", "127.0.0.1", "--workers", str(workers), *extra],
                     env=env)
        try:
            srv.wait_line(r"all \d+ workers ready", timeout=20)
            return srv, port
        except AssertionError:
            srv.stop()
            if "already in use" not in srv.log:
                raise
    raise AssertionError("no free port")


def three_modes(tmp_path: Path, app: str = "apps:Probe", settings: str = "",
                extra: tuple[str, ...] = ()) -> tuple[Server, dict[str, int]]:
    """One server, three workers, a listener per multicast mode (named after it)."""
    ports = {m: free_port() for m in MODES}
    cfg = tmp_path / "shardudp.toml"
    cfg.write_text(f'workers = 3\napp = "{app}"\nmulticast_interface = "127.0.0.1"\n{settings}\n'
                   + "".join(f'\n[[listener]]\nname = "{m}"\nmulticast = "{GROUP}:{p}"\n'
                             f'multicast_mode = "{m}"\n' for m, p in ports.items()))
    srv = Server(["run", "--config", str(cfg), *extra])
    try:
        srv.wait_line(r"all \d+ workers ready", timeout=20)
    except BaseException:
        srv.stop()
        raise
    return srv, ports


@pytest.fixture
def senders():
    with McastSenders(30, GROUP) as s:
        yield s


def _settle(s: McastSenders, timeout: float = 0.5) -> list[tuple[int, bytes]]:
    """Collect whatever else arrives (duplicates would show up here)."""
    return s.replies(10**6, timeout)


def by_mode(got: list[tuple[int, bytes]]) -> dict[str, list[tuple[int, bytes]]]:
    """Replies grouped by the mode tag their payload starts with."""
    out: dict[str, list[tuple[int, bytes]]] = {m: [] for m in MODES}
    for pid, payload in got:
        out[payload.split(b"-")[0].decode()].append((pid, payload))
    return out


def deliver_to_every_mode(senders: McastSenders, ports: dict[str, int], count: int,
                          workers: set[int]) -> dict[str, list[tuple[int, bytes]]]:
    """Send ``count`` datagrams to each mode's listener and check who handled them:
    fanout every worker, single one worker, shard each once; the replies by mode."""
    for mode in MODES:
        senders.send_many((GROUP, ports[mode]), count, mode.encode() + b"-")
    got = by_mode(senders.replies(5 * count, 15) + _settle(senders))
    for mode, copies in (("fanout", 3), ("single", 1), ("shard", 1)):
        counts = collections.Counter(p for _, p in got[mode])
        assert counts == {b"%s-%06d" % (mode.encode(), i): copies for i in range(count)}, mode
        pids = {pid for pid, _ in got[mode]}
        assert len(pids) == 1 if mode == "single" else pids == workers, mode
    return got


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_delivery_modes_on_every_datapath(datapath: str, senders: McastSenders,
                                          tmp_path: Path) -> None:
    srv, ports = three_modes(tmp_path, extra=("--datapath", datapath))
    try:
        slot_of = {pid: slot for slot, pid in srv.ready_pids(count=3).items()}
        got = deliver_to_every_mode(senders, ports, 100, set(slot_of))
        # The kernel's BPF filter keeps exactly the shard we compute.
        for pid, payload in got["shard"]:
            sport = senders.socks[int(payload[-6:]) % 30].getsockname()[1]
            assert shard_of("127.0.0.1", sport, 3) == slot_of[pid]
    finally:
        srv.stop()


def test_single_kill_9_of_the_leader_while_datagrams_are_queued(senders: McastSenders) -> None:
    """Runs on --datapath python-loop, which reads one datagram at a time: all but
    the one the leader was handling are still queued in the shared socket when
    it dies, and the next leader handles each of them exactly once. (A batch
    datapath loses what the dead leader had read but not yet handled.)"""
    srv, port = mcast_server("single", app="mcast_apps:Slow", env={"SLOW_MS": "10"},
                             extra=("--datapath", "python-loop"))
    try:
        senders.send_many((GROUP, port), 60, b"q-")
        first = senders.replies(5, 10)
        (leader,) = {pid for pid, _ in first}
        mark = srv.mark()
        os.kill(leader, signal.SIGKILL)
        assert wait_pid_gone(leader, 5)
        got = first + senders.replies(60 - 5 - 1, 15) + _settle(senders)
        counts = collections.Counter(p for _, p in got)
        assert set(counts.values()) == {1}, "a datagram was handled twice"
        lost = [i for i in range(60) if b"q-%06d" % i not in counts]
        answered = sorted(int(p[2:]) for pid, p in got if pid == leader)
        # At most the datagram in the leader's hands, the one after its last reply.
        assert lost in ([], [answered[-1] + 1]), (lost, answered)
        after = [p for pid, p in got if pid != leader]
        assert len(after) >= 60 - len(answered) - 1 > 20  # were queued when it died
        srv.wait_line(r"now reads single-mode listeners", start=mark)
    finally:
        srv.stop()


def _command_all(senders: McastSenders, ports: dict[str, int], cmd: bytes
                 ) -> dict[str, list[tuple[int, bytes]]]:
    """Send ``cmd`` from every sender to every mode's listener, so that every
    worker of every mode gets it; the replies by mode (tagged by port order)."""
    got: dict[str, list[tuple[int, bytes]]] = {}
    for mode in MODES:
        for s in senders.socks:
            s.sendto(cmd, (GROUP, ports[mode]))
        want = 30 * (3 if mode == "fanout" else 1)
        got[mode] = senders.replies(want, 10)
    return got


def test_listener_membership_belongs_to_the_master(senders: McastSenders,
                                                   tmp_path: Path) -> None:
    srv, ports = three_modes(tmp_path, app="mcast_apps:Member")
    try:
        workers = set(srv.ready_pids(count=3).values())
        # Every worker leaves the group, with and without naming the interface;
        # joins it as the seed does (no interface); then tries a group its
        # socket can never receive.
        for cmd, want in ((b"leave %s 127.0.0.1" % GROUP.encode(), b"leave ok"),
                          (b"leave " + GROUP.encode(), b"leave ok"),
                          (b"join " + GROUP.encode(), b"join ok")):
            for mode, replies in _command_all(senders, ports, cmd).items():
                assert {p for _, p in replies} == {want}, (mode, replies[:3])
                if mode != "single":
                    assert {pid for pid, _ in replies} == workers
        for mode, replies in _command_all(senders, ports, b"join 239.255.42.7").items():
            msg = (f"join failed: joinGroup('239.255.42.7') refused: this listener's sockets are "
                   f"bound to {GROUP}:{ports[mode]} and never receive 239.255.42.7; add a "
                   f"--multicast listener for 239.255.42.7:{ports[mode]}").encode()
            assert {p for _, p in replies} == {msg}
        # The master's memberships are intact: every mode still delivers.
        deliver_to_every_mode(senders, ports, 60, workers)
    finally:
        srv.stop()


def test_a_new_single_mode_worker_takes_its_interface_from_the_config(
    senders: McastSenders
) -> None:
    """Every worker of a single-mode listener shares one socket: whatever the
    leader sets as outgoing interface is there when a new worker adopts it.
    The new worker still knows the listener's own interface."""
    srv, port = mcast_server("single", workers=2, app="mcast_apps:Member",
                              env={"MEMBER_CLOBBER_IF": "0.0.0.0"})
    try:
        pids = set(srv.ready_pids(count=2).values())
        leader = int(srv.wait_line(r"worker pid=(\d+) now reads single-mode")[0].group(1))
        (standby,) = pids - {leader}
        mark = srv.mark()
        os.kill(standby, signal.SIGKILL)
        (new,) = srv.ready_pids(start=mark).values()  # adopted while the leader clobbers
        mark = srv.mark()
        os.kill(leader, signal.SIGKILL)
        srv.wait_line(rf"worker pid={new} now reads single-mode", start=mark)
        for cmd in (b"join", b"leave"):
            senders.socks[0].sendto(b"%s %s 127.0.0.1" % (cmd, GROUP.encode()), (GROUP, port))
            assert senders.replies(1, 10) == [(new, cmd + b" ok")]
    finally:
        srv.stop()


def test_ttl_and_loopback_come_from_the_config_in_every_new_worker(
    senders: McastSenders, tmp_path: Path
) -> None:
    srv, ports = three_modes(tmp_path, app="mcast_apps:Member",
                             settings="multicast_ttl = 3\nmulticast_loopback = false")
    try:
        def options() -> dict[str, set[bytes]]:
            return {mode: {p for _, p in replies}
                    for mode, replies in _command_all(senders, ports, b"options").items()}

        assert options() == {m: {b"ttl=3 loop=0"} for m in MODES}
        # What one incarnation sets (setTTL(9), loopback on)...
        _command_all(senders, ports, b"setttl 9")
        assert options() == {m: {b"ttl=9 loop=1"} for m in MODES}
        mark = srv.mark()
        for pid in srv.ready_pids(count=3).values():
            os.kill(pid, signal.SIGKILL)
        srv.ready_pids(start=mark, count=3)
        # ...is not what the next one starts with (in single mode the new
        # leader reads the very same socket).
        assert options() == {m: {b"ttl=3 loop=0"} for m in MODES}
    finally:
        srv.stop()


class Stream:
    """A steady stream to every mode's listener: tick i sends ``MODE-i`` to each,
    from sender i % 30. A thread sends, paced; another counts the replies."""

    def __init__(self, senders: McastSenders, ports: dict[str, int], rate: float) -> None:
        self.senders, self.ports, self.interval = senders, ports, 1.0 / rate
        self.sent = 0  # ticks sent; read by the test thread to mark phases
        self.copies: collections.Counter[bytes] = collections.Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def __enter__(self) -> Stream:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(20)

    def _send(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set() and self.sent < 100_000:
            delay = start + self.sent * self.interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the sender
            sock = self.senders.socks[self.sent % len(self.senders.socks)]
            for mode, port in self.ports.items():
                sock.sendto(b"%s-%06d" % (mode.encode(), self.sent), (GROUP, port))
            self.sent += 1

    def _receive(self) -> None:
        quiet_since = None
        for _ in range(1_000_000):
            r, _, _ = select.select(self.senders.socks, [], [], 0.1)
            for s in r:
                for _ in range(100):
                    try:
                        self.copies[s.recv(100).partition(b":")[2]] += 1
                    except BlockingIOError:
                        break
            if not self._stop.is_set():
                continue
            # Stopped: keep collecting until 0.5 s pass with nothing new.
            if r or quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 0.5:
                return

    def wait_replies(self, n: int, timeout: float = 10.0) -> None:
        """Wait (bounded) for ``n`` more replies than there are now."""
        want = sum(self.copies.values()) + n
        deadline = time.monotonic() + timeout
        while sum(self.copies.values()) < want:
            assert time.monotonic() < deadline, "the stream's replies stopped"
            self._stop.wait(0.02)  # polling a counter another thread updates


def test_scale_and_reload_under_a_stream_in_every_mode(senders: McastSenders,
                                                       tmp_path: Path) -> None:
    srv, ports = three_modes(tmp_path)
    try:
        with Stream(senders, ports, rate=400) as stream:
            stream.wait_replies(200)
            marks = []
            for sig, done in ((signal.SIGTTIN, r"worker slot=3 pid=\d+ ready"),
                              (signal.SIGTTOU, r"slot 3 drained and closed"),
                              (signal.SIGHUP, r"reload complete")):
                mark = srv.mark()
                marks.append(stream.sent)
                srv.signal(sig)
                srv.wait_line(done, start=mark)
                marks.append(stream.sent)
                stream.wait_replies(300)  # steady traffic in the new state
        total = stream.sent
        copies = {m: [stream.copies[b"%s-%06d" % (m.encode(), i)] for i in range(total)]
                  for m in MODES}
        # single: exactly once, through scaling and a rolling restart.
        assert set(copies["single"]) == {1}
        # shard: never lost; handled twice only if it arrived in the
        # microseconds between the two steps of a filter change.
        assert set(copies["shard"]) <= {1, 2}, collections.Counter(copies["shard"])
        # fanout: once per worker socket in the group when it arrived.
        ttin0, ttin1, ttou0, ttou1, _hup0, _hup1 = marks
        fan = copies["fanout"]
        assert set(fan[:ttin0]) == {3}
        assert set(fan[ttin0:ttin1]) <= {3, 4}
        assert set(fan[ttin1:ttou0]) == {4}
        assert set(fan[ttou0:ttou1]) <= {3, 4}
        assert set(fan[ttou1:]) == {3}  # the rolling restart included
    finally:
        srv.stop()


def test_seed_ping_client_and_server_through_a_sharded_server() -> None:
    env = {"PING_GROUP": GROUP, "PING_INTERFACE": "127.0.0.1"}
    srv, port = mcast_server("shard", app="multicast_ping", env=env)
    env["PING_PORT"] = str(port)
    client = Server(["run", "multicast_ping_client",
                     "--bind", "127.0.0.1:0", "--workers", "2"], env=env)
    try:
        # Two clients (one per client worker), each ping handled once, each
        # answered by a unicast pong.
        client.wait_line(rf"Datagram b'Server: Pong' received from \('127\.0\.0\.1', {port}\)",
                         count=2)
        srv.wait_line(r"Datagram b'Client: Ping' received from", count=2)
        time.sleep(0.2)  # not synchronisation: a window in which a duplicate would show
        assert srv.log.count("Client: Ping") == 2
    finally:
        client.stop()
        srv.stop()


def test_connect_on_a_sharded_listener_raises_and_it_keeps_serving() -> None:
    with serving("apps:Probe", workers=2) as (_srv, port), Flows(40, port) as flows:
        flows.send(0, b"connect")
        (reply,) = [d for _, d in flows.collect(1, 5)]
        assert reply.startswith(b"ShardedSocketError: ")
        # What a user can do about it, not an internal API.
        assert b"--bind HOST:0" in reply and b"reactor.listenUDP(0, proto)" in reply
        assert b"adopt(" not in reply
        for i in range(40):
            flows.send(i, b"q")
        got = flows.collect(40, 5)
        assert len(got) == 40
        assert len({d.split(b":")[0] for _, d in got}) == 2  # still both workers


def test_hostname_where_an_ip_is_required_and_resolve_in_a_worker() -> None:
    with serving("apps:Probe", workers=1) as (_srv, port), Flows(1, port) as flows:
        flows.send(0, b"hostname")
        (reply,) = [d for _, d in flows.collect(1, 5)]
        assert reply.startswith(b"InvalidAddressError") and b"localhost" in reply
        flows.send(0, b"resolve localhost")
        (reply,) = [d for _, d in flows.collect(1, 10)]
        assert reply == b"resolved 127.0.0.1"


class Upstream:
    """A plain UDP echo on loopback for the Helloers to talk to."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def echo(self, want: int, timeout: float) -> set[int]:
        """Echo ``want`` datagrams back; return their source ports."""
        sources = set()
        self.sock.settimeout(timeout)
        for _ in range(want):
            data, addr = self.sock.recvfrom(65536)
            self.sock.sendto(data, addr)
            sources.add(addr[1])
        return sources


@pytest.mark.parametrize("how", ["app-on-port-0", "opened-inside-worker"])
def test_helloer_connection_refused_then_echo(how: str) -> None:
    app = "helloer" if how == "app-on-port-0" else "shardudp.workers.helloer:OpensHelloer"
    bind = "127.0.0.1:0" if how == "app-on-port-0" else f"127.0.0.1:{free_port()}"
    # Nobody listens: a free port, reserved then released.
    dead = free_port()
    env = {"HELLOER_HOST": "127.0.0.1", "HELLOER_PORT": str(dead)}
    srv = Server(["run", app, "--bind", bind, "--workers", "2"], env=env)
    try:
        srv.wait_line("all 2 workers ready")
        srv.wait_line("No one listening", count=2)
    finally:
        srv.stop()

    up = Upstream()
    env["HELLOER_PORT"] = str(up.port)
    srv = Server(["run", app, "--bind", bind, "--workers", "2"], env=env)
    try:
        sources = up.echo(2, timeout=15)
        assert len(sources) == 2  # one connected socket per worker
        srv.wait_line(rf"received b'hello' from 127\.0\.0\.1:{up.port}", count=2)
    finally:
        srv.stop()
        up.sock.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another uid")
def test_another_uid_cannot_hijack_the_port() -> None:
    with serving("apps:Probe", workers=2, extra=[]) as (_srv, port):
        code = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"try:\n    s.bind(('127.0.0.1', {port}))\n"
            "except OSError as e:\n    print(e.errno); sys.exit(0)\n"
            "s.settimeout(1.0)\n"
            "try:\n    print('got', s.recv(100))\nexcept OSError:\n    print('bound, nothing')\n"
        )
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        with Flows(10, port) as flows:
            for i in range(10):
                flows.send(i, b"mine")
            assert len(flows.collect(10, 5)) == 10  # the server still got all of it
        out, _ = proc.communicate(timeout=10)
        assert out.strip() == str(98), out  # EADDRINUSE


def test_ipv6_unicast_on_loopback() -> None:
    with serving("apps:Probe", workers=2, family=socket.AF_INET6) as (_srv, port), \
            Flows(20, port, socket.AF_INET6) as flows:
        for i in range(20):
            flows.send(i, b"six")
        assert len(flows.collect(20, 5)) == 20

