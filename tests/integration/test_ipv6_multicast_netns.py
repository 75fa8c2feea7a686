"""Multicast that needs a network namespace the test creates: IPv6 (lo cannot
do it), routes of our own, and sockets bound to 0.0.0.0 without exposing them."""

from __future__ import annotations

import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from harness import Server, free_port

from shardudp.sockets import shard_of

ADDR = "fd00:5d::1"  # a private address inside our own namespace only
GROUP = "ff15::4242"

# Shared by the scripts below, which run inside the namespace.
_RECEIVE = r"""
import select, time

# [reply, receiving port] until `want` replies or 10 s, then 0.5 s more in
# which duplicates or extra copies would show.
def receive(socks, want):
    out = []
    for enough, within in ((want, 10.0), (None, 0.5)):
        deadline = time.monotonic() + within
        while (enough is None or len(out) < enough) and time.monotonic() < deadline:
            r, _, _ = select.select(socks, [], [], 0.1)
            for s in r:
                for _ in range(100):
                    try:
                        out.append([s.recv(100).decode(), s.getsockname()[1]])
                    except BlockingIOError:
                        break
    return out
"""

SENDER = _RECEIVE + r"""
import json, socket, sys
group, port, ifname, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
idx = socket.if_nametoindex(ifname)
socks = []
for _ in range(12):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.bind(("fd00:5d::1", 0))
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, idx)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 0)
    s.setblocking(False)
    socks.append(s)
for i in range(n):
    socks[i % len(socks)].sendto(b"v6-%04d" % i, (group, port))
print(json.dumps(receive(socks, n)))
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    name = f"sdu-{uuid.uuid4().hex[:8]}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        try:
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "link", "add", "dm0", "type", "veth", "peer", "name", "dm1")
            _ip("-n", name, "link", "set", "dm1", "up")
            _ip("-n", name, "link", "set", "dm0", "up")
            _ip("-n", name, "-6", "addr", "add", f"{ADDR}/64", "dev", "dm0", "nodad")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"kernel refused the test network: {exc.stderr.decode().strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.mark.parametrize(("mode", "copies"), [("shard", 1), ("fanout", 2)])
def test_ipv6_multicast_in_a_namespace(netns: str, mode: str, copies: int) -> None:
    port = free_port()  # fresh namespace: any port is free there
    prefix = ["ip", "netns", "exec", netns]
    srv = Server(["run", "apps:Probe", "--multicast", f"[{GROUP}]:{port}", "--multicast-mode",
                  mode, "--multicast-interface", ADDR, "--workers", "2"], prefix=prefix)
    try:
        slot_of = {str(pid): slot for slot, pid in srv.ready_pids(count=2, timeout=20).items()}
        srv.wait_line("all 2 workers ready", timeout=20)
        out = subprocess.run([*prefix, sys.executable, "-c", SENDER, GROUP, str(port), "dm0",
                              "100"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        replies = [(*r.split(":", 1), sport) for r, sport in json.loads(out.stdout)]
        payloads = [payload for _, payload, _ in replies]
        assert sorted(set(payloads)) == [f"v6-{i:04d}" for i in range(100)]
        assert len(payloads) == 100 * copies
        assert {pid for pid, _, _ in replies} == set(slot_of)
        if mode == "shard":
            # The kernel's filter folds all 128 bits of the source, as shard_of does.
            for pid, _, sport in replies:
                assert shard_of(ADDR, sport, 2) == slot_of[pid]
    finally:
        srv.stop()


# -- IPv4 in the namespace -----------------------------------------------------

SENDER4 = _RECEIVE + r"""
import json, socket, sys
plan, want = json.loads(sys.argv[1]), int(sys.argv[2])
joined = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # another process's membership
for group in json.loads(sys.argv[3]):
    joined.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                      socket.inet_aton(group) + socket.inet_aton("127.0.0.1"))
socks = []
for _ in range(10):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setblocking(False)
    socks.append(s)
i = 0
for host, port, n, tag in plan:
    for k in range(n):
        socks[i % len(socks)].sendto(b"%s-%04d" % (tag.encode(), k), (host, port))
        i += 1
print(json.dumps([reply for reply, _ in receive(socks, want)]))
"""


def _send4(netns: str, plan: list[tuple[str, int, int, str]], want: int,
           join: tuple[str, ...] = ()) -> collections.Counter[str]:
    """Run SENDER4 in the namespace; replies as a Counter of 'PID:payload'."""
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", SENDER4,
                          json.dumps(plan), str(want), json.dumps(list(join))],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return collections.Counter(json.loads(out.stdout))


def test_unicast_listener_sees_only_groups_its_own_worker_joined(
    netns: str, tmp_path: Path
) -> None:
    """0.0.0.0:P with IP_MULTICAST_ALL left on would get a copy, per worker, of
    every group on port P that anything on the host joined."""
    port = free_port()
    cfg = tmp_path / "shardudp.toml"
    cfg.write_text(f"""
workers = 3
[[listener]]
name = "u"
bind = "0.0.0.0:{port}"
app = "mcast_apps:Member"
""")
    srv = Server(["run", "--config", str(cfg)], prefix=["ip", "netns", "exec", netns],
                 env={"MEMBER_JOIN": "239.255.50.2 127.0.0.1"})
    try:
        srv.wait_line("all 3 workers ready", timeout=20)
        got = _send4(netns, [("239.255.50.1", port, 100, "g"), ("239.255.50.2", port, 50, "h"),
                             ("127.0.0.1", port, 30, "u")], want=30 + 150,
                     join=("239.255.50.1",))
        by_tag = collections.defaultdict(list)
        for reply, n in got.items():
            pid, _, payload = reply.partition(":")
            by_tag[payload[0]] += [(pid, payload)] * n
        # A group only the sending process joined: no worker gets it.
        assert "g" not in by_tag
        # A group each worker joined on its own socket: fanout, one copy per worker.
        assert len(by_tag["h"]) == 150
        assert collections.Counter(p for _, p in by_tag["h"]) == {f"h-{i:04d}": 3
                                                                   for i in range(50)}
        assert len({pid for pid, _ in by_tag["h"]}) == 3
        assert sorted(p for _, p in by_tag["u"]) == [f"u-{i:04d}" for i in range(30)]
    finally:
        srv.stop()


def _route_multicast(netns: str, dev: str) -> None:
    _ip("-n", netns, "route", "add", "224.0.0.0/4", "dev", dev)


def test_unmodified_seed_ping_pong(netns: str) -> None:
    """The how-to's server and client as written: 228.0.0.5:9999, no interface."""
    _route_multicast(netns, "lo")
    prefix = ["ip", "netns", "exec", netns]
    srv = Server(["run", "multicast_ping", "--multicast",
                  "228.0.0.5:9999", "--multicast-interface", "127.0.0.1", "--workers", "3"],
                 prefix=prefix)
    client = None
    try:
        srv.wait_line("all 3 workers ready", timeout=20)
        client = Server(["run", "multicast_ping_client", "--bind",
                         "127.0.0.1:0", "--workers", "2"], prefix=prefix)
        client.wait_line(r"Datagram b'Server: Pong' received from \('127\.0\.0\.1', 9999\)",
                         count=2)
        srv.wait_line(r"Datagram b'Client: Ping' received from", count=2)
        client.stop()
        srv.stop()  # the logs are complete once both have exited
        assert srv.log.count("Client: Ping") == 2  # one per client, each handled once
        assert client.log.count("Server: Pong") == 2
    finally:
        if client is not None:
            client.stop()
        srv.stop()


def _igmp_devices(netns: str, group: str) -> set[str]:
    """Devices on which the namespace is a member of ``group`` (from /proc/net/igmp)."""
    text = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/net/igmp"],
                          capture_output=True, text=True, check=True, timeout=10).stdout
    want = socket.inet_aton(group)[::-1].hex().upper()  # host-order hex, as /proc prints it
    devices, dev = set(), ""
    for line in text.splitlines()[1:]:
        if not line.startswith("\t"):
            dev = line.split()[1]
        elif line.split()[0] == want:
            devices.add(dev)
    return devices


@pytest.mark.parametrize("mode", ["shard", "single", "fanout"])
def test_seed_join_without_interface_stays_on_the_listeners_interface(
    netns: str, mode: str
) -> None:
    """The default multicast route goes out dm0; --multicast-interface says lo.
    The seed's joinGroup("228.0.0.5") must not add a membership on dm0."""
    _route_multicast(netns, "dm0")
    srv = Server(["run", "multicast_ping", "--multicast",
                  "228.0.0.5:9999", "--multicast-interface", "127.0.0.1", "--multicast-mode",
                  mode, "--workers", "2"], prefix=["ip", "netns", "exec", netns])
    try:
        # READY comes after startProtocol, where the seed joins.
        srv.wait_line("all 2 workers ready", timeout=20)
        assert _igmp_devices(netns, "228.0.0.5") == {"lo"}
    finally:
        srv.stop()


# -- IPv6 wildcard listeners ---------------------------------------------------

ASK = r"""
import json, socket, sys
answers = {}
for host, port in json.loads(sys.argv[1]):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(10)
        s.connect((host, port))
        s.send(b"ping")
        try:
            answers[f"{host} {port}"] = s.recv(100).decode()
        except ConnectionRefusedError:  # the kernel's port unreachable: nobody listens
            answers[f"{host} {port}"] = "refused"
print(json.dumps(answers))
"""


def test_an_ipv6_wildcard_listener_takes_no_ipv4_traffic(netns: str, tmp_path: Path) -> None:
    """[::]:P is IPv6 only (IPV6_V6ONLY), whatever net.ipv6.bindv6only says,
    so it never overlaps an IPv4 listener; 0.0.0.0:P plus [::]:P serves both."""
    cfg = tmp_path / "shardudp.toml"
    cfg.write_text("""
workers = 2
[[listener]]
name = "six-only"
bind = "[::]:5000"
app = "apps:Upper"
[[listener]]
name = "four"
bind = "0.0.0.0:5001"
app = "apps:WhoAmI"
[[listener]]
name = "six"
bind = "[::]:5001"
app = "apps:Upper"
""")
    prefix = ["ip", "netns", "exec", netns]
    srv = Server(["run", "--config", str(cfg)], prefix=prefix)
    try:
        pids = {str(pid) for pid in srv.ready_pids(count=2, timeout=20).values()}
        plan = [("127.0.0.1", 5000), ("::1", 5000), ("127.0.0.1", 5001), ("::1", 5001)]
        out = subprocess.run([*prefix, sys.executable, "-c", ASK, json.dumps(plan)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        answers = json.loads(out.stdout)
        pid, _, payload = answers.pop("127.0.0.1 5001").partition(":")
        assert pid in pids and payload == "ping"  # WhoAmI: the IPv4 listener
        assert answers == {"127.0.0.1 5000": "refused", "::1 5000": "PING", "::1 5001": "PING"}
    finally:
        srv.stop()
