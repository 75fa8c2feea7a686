"""Socket set-up and the shard filters: BPF programs run by an interpreter, then
real sockets on loopback (a multicast group joined on 127.0.0.1 only)."""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import McastSenders, free_port
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import MulticastJoinError
from twisted.internet.protocol import DatagramProtocol

from shardudp import sockets, sockstats
from shardudp.config import Listener, build
from shardudp.drops import SHARED
from shardudp.errors import StartupError
from shardudp.port import PythonShardPort
from shardudp.socketset import SocketSet

M32 = 0xFFFFFFFF
NET_BASE = sockets.SKF_NET_OFF & M32
DEADLINE_S = 5.0


# -- a classic BPF interpreter for the opcodes the shard filters use -----------


def run_bpf(prog: list[sockets.Insn], ip_header: bytes, udp_header: bytes) -> int:
    """What the kernel would return for this packet: 0 drops, non-zero keeps."""
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(k: int, size: int) -> int:
        buf, off = (ip_header, k - NET_BASE) if k >= NET_BASE else (udp_header, k)
        assert off + size <= len(buf), "load past the packet: the kernel would drop"
        return int.from_bytes(buf[off:off + size], "big")

    for _ in range(len(prog)):  # no backward jumps in cBPF: one pass at most
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == 0x28:
            a = load(k, 2)
        elif code == 0x20:
            a = load(k, 4)
        elif code == 0x07:
            x = a
        elif code == 0xAC:
            a ^= x
        elif code == 0x24:
            a = a * k & M32
        elif code == 0x74:
            a >>= k
        elif code == 0x94:
            a %= k
        elif code == 0x02:
            mem[k] = a
        elif code == 0x60:
            a = mem[k]
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"opcode {code:#x} not interpreted")
    raise AssertionError("program ran off its end")


def packet(src: str, sport: int) -> tuple[bytes, bytes]:
    ip = ipaddress.ip_address(src)
    if ip.version == 4:
        header = bytes(12) + ip.packed + bytes(4)
    else:
        header = bytes(8) + ip.packed + bytes(16)
    return header, struct.pack("!HHHH", sport, 9999, 8, 0)


def keeps(prog: list[sockets.Insn], src: str, sport: int) -> bool:
    return run_bpf(prog, *packet(src, sport)) != 0


def sources(n: int, seed: int = 7) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            addr = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        else:
            addr = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        out.append((addr, rng.randrange(1, 65536)))
    return out


def test_filter_keeps_exactly_the_share_shard_of_names() -> None:
    for (src, sport), count in zip(sources(600), itertools.cycle([1, 2, 3, 5, 8]),
                                   strict=False):
        v6 = ":" in src
        kept = [i for i in range(count) if keeps(sockets.shard_filter([(i, count)], v6), src,
                                                 sport)]
        assert kept == [sockets.shard_of(src, sport, count)], (src, sport, count)


def test_ipv6_hash_uses_every_bit_of_the_source() -> None:
    # Hosts differing only in the high 96 bits: the old low-word hash put them
    # all in one share.
    hosts = [f"2001:db8:{i:x}::1" for i in range(64)]
    assert len({sockets.shard_of(h, 5000, 4) for h in hosts}) == 4
    prog = sockets.shard_filter([(0, 4)], True)
    assert {keeps(prog, h, 5000) for h in hosts} == {True, False}


def test_union_filter_keeps_either_share_and_empty_drops_all() -> None:
    for src, sport in sources(300, seed=3):
        v6 = ":" in src
        for old, new in [((1, 3), (2, 4)), ((0, 2), (0, 1)), ((2, 5), (2, 5))]:
            want = (sockets.shard_of(src, sport, old[1]) == old[0]
                    or sockets.shard_of(src, sport, new[1]) == new[0])
            assert keeps(sockets.shard_filter([old, new], v6), src, sport) == want
        assert not keeps(sockets.shard_filter([], v6), src, sport)


# -- real sockets --------------------------------------------------------------

_GROUPS = (f"239.255.43.{i}" for i in itertools.count(1))


def listener(mode: str | None = None, **cli: Any) -> Listener:
    """A multicast listener on loopback (mode given) or a unicast one."""
    if mode is not None:
        cli = {"multicast": [f"{next(_GROUPS)}:{free_port()}"], "multicast_mode": mode,
               "multicast_interface": "127.0.0.1", **cli}
    return build(cli={"app": "a:B", "workers": "1", **cli}).listeners[0]


def address(lst: Listener) -> tuple[str, int]:
    return lst.address.host, lst.address.port


@pytest.fixture
def senders() -> Iterator[McastSenders]:
    with McastSenders(30) as s:
        yield s


OpenSet = Callable[[Listener, int], SocketSet]


@pytest.fixture
def sset() -> Iterator[OpenSet]:
    """Make a SocketSet of one listener with slots 0..n-1 open; closed after the test."""
    made: list[SocketSet] = []

    def open_set(lst: Listener, slots: int) -> SocketSet:
        ss = SocketSet((lst,))
        made.append(ss)
        for slot in range(slots):
            ss.open_slot(slot)
        return ss

    yield open_set
    for s in made:
        s.close_all()


def collect(socks: list[socket.socket], want: int) -> list[list[bytes]]:
    """Payloads received on each socket, until ``want`` in all (bounded), plus
    whatever else is queued by then (a duplicate would show up here)."""
    got: list[list[bytes]] = [[] for _ in socks]
    deadline = time.monotonic() + DEADLINE_S
    while sum(map(len, got)) < want and time.monotonic() < deadline:
        select.select(socks, [], [], 0.05)
        for i, s in enumerate(socks):
            got[i] += drain(s)
    for i, s in enumerate(socks):
        got[i] += drain(s)
    return got


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    for _ in range(100_000):
        try:
            out.append(sock.recv(100, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out
    raise AssertionError("never emptied")


def test_every_socket_turns_multicast_all_off() -> None:
    for lst in (listener(bind=["127.0.0.1:0"]), listener(bind=["[::1]:0"]), listener("shard")):
        sock = sockets.open_socket(lst, reuseport=True)
        try:
            if sock.family == socket.AF_INET6:
                assert sock.getsockopt(socket.IPPROTO_IPV6, sockets.IPV6_MULTICAST_ALL) == 0
            else:
                assert sock.getsockopt(socket.IPPROTO_IP, sockets.IP_MULTICAST_ALL) == 0
        finally:
            sock.close()


def test_shard_members_split_exactly_and_refusals_are_not_drops(
    senders: McastSenders, sset: OpenSet
) -> None:
    lst = listener("shard")
    ss = sset(lst, 3)
    members = [ss.for_slot(slot)[0].sock for slot in range(3)]
    senders.send_many(address(lst), 300)
    got = collect(members, 300)
    assert sorted(p for g in got for p in g) == [b"%06d" % i for i in range(300)]
    ports = [s.getsockname()[1] for s in senders.socks]
    for slot, payloads in enumerate(got):
        assert payloads, "every member takes part"
        for p in payloads:
            assert sockets.shard_of("127.0.0.1", ports[int(p) % 30], 3) == slot
    # The kernel counts each member's 200 refusals as drops...
    assert sum(sockstats.read_meminfo(m).drops for m in members) == 600
    stats = ss.kernel_stats()
    # ...but nothing was lost, and members have no per-slot drop series.
    assert stats.drops == {(SHARED, lst.name): 0}
    assert set(stats.queues) == {("0", lst.name), ("1", lst.name), ("2", lst.name)}


def test_shard_overflow_is_reported_exactly(senders: McastSenders, sset: OpenSet) -> None:
    lst = listener("shard", rcvbuf="4096")  # a few datagrams per member
    ss = sset(lst, 3)
    members = [ss.for_slot(slot)[0].sock for slot in range(3)]
    senders.send_many(address(lst), 300)  # nothing reads meanwhile
    queued = sum(len(drain(m)) for m in members)
    assert 0 < queued < 300
    assert ss.kernel_stats().drops == {(SHARED, lst.name): 300 - queued}
    for i in range(300, 330):  # one at a time, read as they come: no more loss
        senders.send_many(address(lst), 1, start=i)
        assert sum(map(len, collect(members, 1))) == 1
    assert ss.kernel_stats().drops == {(SHARED, lst.name): 300 - queued}


def test_scale_changes_never_leave_a_source_without_a_socket(
    sset: OpenSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every filter change, one setsockopt at a time: each source stays kept
    by at least one open member socket throughout, and by exactly one after."""
    lst = listener("shard")
    programs: dict[socket.socket, list[sockets.Insn]] = {}
    srcs = [("127.0.0.1", port) for port in range(20000, 20400)]
    covered = [False]
    real_attach = sockets.attach_filter

    def keepers(src: str, port: int) -> int:
        return sum(keeps(prog, src, port) for sock, prog in programs.items()
                   if sock.fileno() >= 0)

    def attach(sock: socket.socket, prog: list[sockets.Insn]) -> None:
        real_attach(sock, prog)
        programs[sock] = prog
        counts = [keepers(*s) for s in srcs]
        covered[0] = covered[0] or min(counts) >= 1
        if covered[0]:
            assert min(counts) >= 1, "a source was refused by every socket"

    monkeypatch.setattr(sockets, "attach_filter", attach)
    ss = sset(lst, 0)
    steps = [("open", 0), ("open", 1), ("open", 2), ("open", 3), ("detach", 3), ("close", 3),
             ("detach", 0), ("close", 0), ("open", 4), ("open", 5)]
    for what, slot in steps:
        getattr(ss, f"{what}_slot")(slot)
        assert {keepers(*s) for s in srcs} == {1}, (what, slot)
    live = ss.slots()
    assert live == [1, 2, 4, 5]
    for index, slot in enumerate(live):
        prog = programs[ss.for_slot(slot)[0].sock]
        for src in srcs[:50]:
            assert keeps(prog, *src) == (sockets.shard_of(*src, 4) == index)


def test_slot_drops_never_decrease_across_scale_down_and_up(sset: OpenSet) -> None:
    lst = listener(bind=["127.0.0.1:0"], rcvbuf="4096")  # a private socket per slot
    ss = sset(lst, 2)
    key = ("1", lst.name)

    def flood() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for _ in range(200):
                tx.sendto(b"x" * 100, ss.for_slot(1)[0].sock.getsockname())

    flood()
    first = ss.kernel_stats().drops[key]
    assert first > 0
    ss.detach_slot(1)
    ss.close_slot(1)
    assert ss.kernel_stats().drops[key] == first  # the closed socket's count is kept
    ss.open_slot(1)
    assert ss.kernel_stats().drops[key] == first
    flood()
    assert ss.kernel_stats().drops[key] > first
    assert ss.kernel_stats().drops[("0", lst.name)] == 0


def test_single_socket_is_read_once_and_belongs_to_the_listener(
    senders: McastSenders, sset: OpenSet
) -> None:
    lst = listener("single", rcvbuf="4096")
    ss = sset(lst, 3)
    shared = ss.for_slot(0)[0].sock
    assert all(ss.for_slot(slot)[0].sock is shared for slot in range(3))
    senders.send_many(address(lst), 100)
    queued = len(drain(shared))
    stats = ss.kernel_stats()
    assert stats.drops == {(SHARED, lst.name): 100 - queued}
    assert set(stats.queues) == {(SHARED, lst.name)}


def test_fanout_detach_stops_delivery_without_counting_drops(
    senders: McastSenders, sset: OpenSet
) -> None:
    lst = listener("fanout")
    ss = sset(lst, 2)
    a, b = ss.for_slot(0)[0].sock, ss.for_slot(1)[0].sock
    senders.send_many(address(lst), 10)
    assert [len(g) for g in collect([a, b], 20)] == [10, 10]
    ss.detach_slot(1)
    senders.send_many(address(lst), 10, start=10)
    assert len(collect([a], 10)[0]) == 10
    assert drain(b) == []
    assert ss.kernel_stats().drops == {("0", lst.name): 0, ("1", lst.name): 0}


def test_new_worker_gets_the_listeners_multicast_options(sset: OpenSet) -> None:
    lst = listener("fanout", multicast_ttl="3", multicast_loopback=False)
    ss = sset(lst, 1)

    def options(sock: socket.socket) -> tuple[int, int, str]:
        return (sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL),
                sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP),
                socket.inet_ntoa(sock.getsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, 4)))

    sock = ss.for_slot(0)[0].sock
    assert options(sock) == (3, 0, "127.0.0.1")
    # What a worker did with the socket (stock setTTL and friends)...
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 9)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("0.0.0.0"))
    # ...is undone before the next worker of the slot gets it.
    assert options(ss.for_slot(0)[0].sock) == (3, 0, "127.0.0.1")


def test_a_low_port_without_privilege_says_how_to_get_it() -> None:
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 99:
        pytest.skip("this host lets anyone bind ports below 1024")
    lst = listener(bind=["127.0.0.1:99"])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root (and every capability with it), then bind
        try:
            os.close(r)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                sockets.open_socket(lst, reuseport=True).close()
                os.write(w, b"bound")
            except StartupError as exc:
                os.write(w, str(exc).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.read().decode()
    os.waitpid(pid, 0)
    if line == "bound":
        pytest.skip("this process may bind ports below 1024 even without root")
    assert line == (
        "cannot bind 127.0.0.1:99 for listener 'udp-127.0.0.1:99': Permission denied; ports "
        "below 1024 need privilege: start as root (with --user USER to run the workers as "
        "USER), or grant CAP_NET_BIND_SERVICE (in a systemd unit: "
        "AmbientCapabilities=CAP_NET_BIND_SERVICE)")


def test_a_worker_takes_its_listeners_interface_from_the_config(sset: OpenSet) -> None:
    """In single mode every worker shares one socket: between the master's reset
    (for_slot) and a new worker's adopt, the leader may set another outgoing
    interface. The new worker still treats joins on the listener's interface
    as the master's."""
    lst = listener("single")
    ss = sset(lst, 2)
    sock = ss.for_slot(1)[0].sock
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("0.0.0.0"))
    reactor: Any = EPollReactor()
    port = PythonShardPort.adopt(sock, DatagramProtocol(), reactor,
                                 multicast_interface=lst.multicast_interface or "")
    port.startListening()
    try:
        results: list[Any] = []
        group = lst.address.host
        port.joinGroup(group, "127.0.0.1").addBoth(results.append)
        port.leaveGroup(group, "127.0.0.1").addBoth(results.append)
        port.joinGroup(group, "127.0.0.2").addBoth(results.append)
        assert results[:2] == [None, None]
        assert results[2].check(MulticastJoinError)
        assert "on 127.0.0.1 (--multicast-interface)" in str(results[2].value)
    finally:
        port.connectionLost(None)
        reactor.waker.connectionLost(None)
        reactor._poller.close()
