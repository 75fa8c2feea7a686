"""IPv6 multicast, in a network namespace this test creates (lo cannot do it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest
from harness import Server, free_port

ADDR = "fd00:5d::1"  # a private address inside our own namespace only
GROUP = "ff15::4242"

SENDER = r"""
import json, select, socket, struct, sys, time
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
replies = []
deadline = time.monotonic() + 10
while len(replies) < n and time.monotonic() < deadline:
    r, _, _ = select.select(socks, [], [], 0.5)
    for s in r:
        for _ in range(100):
            try:
                replies.append(s.recv(100).decode())
            except BlockingIOError:
                break
deadline = time.monotonic() + 0.5
while time.monotonic() < deadline:  # a window in which duplicates would show
    r, _, _ = select.select(socks, [], [], 0.1)
    for s in r:
        try:
            replies.append(s.recv(100).decode())
        except BlockingIOError:
            pass
print(json.dumps(replies))
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
        srv.wait_line("all 2 workers ready", timeout=20)
        out = subprocess.run([*prefix, sys.executable, "-c", SENDER, GROUP, str(port), "dm0",
                              "100"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        replies = json.loads(out.stdout)
        payloads = [r.split(":", 1)[1] for r in replies]
        assert sorted(set(payloads)) == [f"v6-{i:04d}" for i in range(100)]
        assert len(payloads) == 100 * copies
        workers = {r.split(":", 1)[0] for r in replies}
        assert len(workers) == 2
    finally:
        srv.stop()
