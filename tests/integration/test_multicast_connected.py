"""Multicast delivery modes and connected UDP, through a sharded server."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from harness import Flows, Server, free_port, serving, wait_pid_gone

from shardudp.sockets import shard_of

GROUP = "239.255.42.99"


def mcast_server(mode: str, workers: int = 3, app: str = "apps:Probe",
                 env: dict[str, str] | None = None, tries: int = 5) -> tuple[Server, int]:
    for _ in range(tries):
        port = free_port()
        srv = Server(["run", app, "--multicast", f"{GROUP}:{port}", "--multicast-mode", mode,
                      "--multicast-interface", "127.0.0.1", "--workers", str(workers)],
                     env=env)
        try:
            srv.wait_line(r"all \d+ workers ready", timeout=20)
            return srv, port
        except AssertionError:
            srv.stop()
            if "already in use" not in srv.log:
                raise
    raise AssertionError("no free port")


class McastSenders:
    """Loopback-only multicast senders, each its own source port."""

    def __init__(self, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            # Never leave the machine: send the group out of lo only.
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.setblocking(False)
            self.socks.append(s)
        self.flows = Flows(0, 0)
        self.flows.socks = self.socks

    def send_many(self, port: int, count: int, tag: bytes) -> None:
        for i in range(count):
            self.socks[i % len(self.socks)].sendto(b"%s-%04d" % (tag, i), (GROUP, port))
            if i % 50 == 49:
                time.sleep(0.005)  # pacing the sender, not synchronising

    def replies(self, want: int, timeout: float) -> list[tuple[int, bytes]]:
        """(pid, payload) of each reply."""
        out = []
        for _, data in self.flows.collect(want, timeout):
            pid, _, payload = data.partition(b":")
            out.append((int(pid), payload))
        return out

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def senders():
    s = McastSenders(30)
    yield s
    s.close()


def _settle(s: McastSenders, timeout: float = 0.5) -> list[tuple[int, bytes]]:
    """Collect whatever else arrives (duplicates would show up here)."""
    return s.replies(10**6, timeout)


@pytest.mark.parametrize(("mode", "copies"), [("fanout", 3), ("single", 1), ("shard", 1)])
def test_delivery_modes_with_three_workers(mode: str, copies: int,
                                           senders: McastSenders) -> None:
    srv, port = mcast_server(mode)
    try:
        slot_of = {pid: slot for slot, pid in srv.ready_pids(count=3).items()}
        senders.send_many(port, 300, b"s")
        got = senders.replies(300 * copies, 15) + _settle(senders)
        counts = collections.Counter(p for _, p in got)
        assert len(counts) == 300 and set(counts.values()) == {copies}
        assert len(got) == 300 * copies
        by_worker = collections.Counter(pid for pid, _ in got)
        if mode == "single":
            assert len(by_worker) == 1
        else:
            assert set(by_worker) == set(slot_of), by_worker  # every worker takes part
        if mode == "shard":
            # The kernel's BPF filter keeps exactly the shard we compute.
            port_of = {b"s-%04d" % i: senders.socks[i % 30].getsockname()[1]
                       for i in range(300)}
            for pid, payload in got:
                assert shard_of("127.0.0.1", port_of[payload], 3) == slot_of[pid]
    finally:
        srv.stop()


def test_single_survives_kill_9_of_the_active_worker(senders: McastSenders) -> None:
    srv, port = mcast_server("single")
    try:
        senders.send_many(port, 100, b"a")
        got = senders.replies(100, 10)
        (active,) = {pid for pid, _ in got}
        mark = srv.mark()
        os.kill(active, signal.SIGKILL)
        assert wait_pid_gone(active, 5)
        senders.send_many(port, 300, b"b")
        got = senders.replies(300, 15) + _settle(senders)
        counts = collections.Counter(p for _, p in got)
        assert len(got) == 300 and set(counts.values()) == {1}
        assert active not in {pid for pid, _ in got}
        srv.wait_line(r"now reads single-mode listeners", start=mark)
    finally:
        srv.stop()


def test_seed_ping_client_and_server_through_a_sharded_server() -> None:
    env = {"PING_GROUP": GROUP, "PING_INTERFACE": "127.0.0.1"}
    srv, port = mcast_server("shard", app="workers.multicast_ping:MulticastPingPong", env=env)
    env["PING_PORT"] = str(port)
    client = Server(["run", "workers.multicast_ping:MulticastPingClient",
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
    app = "workers.helloer:Helloer" if how == "app-on-port-0" else "workers.helloer:OpensHelloer"
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

