"""sockstats against the real kernel: sockets on loopback only, processes we start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardudp import sockstats

DEADLINE_S = 5.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(params=["127.0.0.1", "::1"])
def flooded(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    """A never-read socket with the smallest receive buffer, flooded until it drops."""
    host: str = request.param
    if ":" in host and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # kernel rounds up to its minimum
        rx.bind((host, 0))
        tx.setblocking(False)
        deadline = time.monotonic() + DEADLINE_S
        for _ in range(50):  # bounded: 50 bursts of 100
            for _ in range(100):
                try:
                    tx.sendto(b"x" * 200, rx.getsockname())
                except BlockingIOError:
                    break
            if sockstats.read_meminfo(rx).drops > 0 or time.monotonic() > deadline:
                break
        yield rx
    finally:
        rx.close()
        tx.close()


def test_flooded_socket_shows_drops_and_queue_both_ways(flooded: socket.socket) -> None:
    by_meminfo = sockstats.read_meminfo(flooded)
    by_proc = sockstats.read_proc(flooded)
    assert by_meminfo.drops > 0
    assert by_meminfo.rx_queue_bytes > 0
    # Nothing reads or sends between the two reads, so they must agree exactly.
    assert by_proc == by_meminfo
    assert by_meminfo.rcvbuf_bytes == flooded.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # The queue cannot hold more than the buffer allows (plus one datagram's overshoot).
    assert by_meminfo.rx_queue_bytes <= 2 * by_meminfo.rcvbuf_bytes


def test_draining_empties_the_queue_but_keeps_drops(flooded: socket.socket) -> None:
    before = sockstats.read_meminfo(flooded)
    flooded.setblocking(False)
    drained = 0
    for _ in range(1000):
        try:
            flooded.recv(2048)
        except BlockingIOError:
            break
        drained += 1
    after = sockstats.read_meminfo(flooded)
    assert drained > 0
    assert after.rx_queue_bytes == 0
    assert after.drops == before.drops
    assert sockstats.read_sockets([flooded]) == [after]


def test_read_sockets_skips_a_closed_socket_and_keeps_order() -> None:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    b.bind(("127.0.0.1", 0))
    try:
        a.close()
        got = sockstats.read_sockets([a, b])
        assert got[0] is None
        assert got[1] is not None and got[1].drops == 0 and got[1].rcvbuf_bytes > 0
    finally:
        b.close()


def test_proc_table_fallback_finds_socket_by_inode() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        table = sockstats.read_proc_net_udp()
        assert table[sockstats.socket_inode(s)] == (0, 0)
    # A socket that is not bound is not listed in /proc/net/udp.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, pytest.raises(OSError):
        sockstats.read_proc(s, {})


def test_proc_table_parser_tolerates_junk(tmp_path: Path) -> None:
    good = tmp_path / "udp"
    good.write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
        "   uid  timeout inode ref pointer drops\n"
        "  7: 0100007F:3039 00000000:0000 07 00000000:00000680 00:00000000 00000000"
        "     0        0 4242 2 0000000000000000 48\n"
        "short line\n"
    )
    bad = tmp_path / "udp6"
    bad.write_text("header\n  1: x y 07 zz:qq 00:0 0 0 0 notanumber 2 0 1\n")
    table = sockstats.read_proc_net_udp([str(good), str(tmp_path / "missing"), str(bad)])
    assert table == {4242: (0x680, 48)}


def test_read_process_of_self() -> None:
    before = sockstats.read_process(os.getpid())
    r, w = os.pipe()
    try:
        during = sockstats.read_process(os.getpid())
    finally:
        os.close(r)
        os.close(w)
    assert before is not None and during is not None
    assert before.open_fds is not None and during.open_fds is not None
    # Another thread (pytest's) may open files, but never fewer than our pipe's two.
    assert during.open_fds >= before.open_fds + 2
    assert before.resident_bytes > 1 << 20
    assert 0 < before.cpu_seconds <= during.cpu_seconds
    with open("/proc/stat") as f:
        btime = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    assert btime <= before.start_time <= time.time()


# Waits on stdin, having renamed itself to a comm full of the characters that
# break naive /proc/<pid>/stat parsing.
_CHILD = (
    "import sys\n"
    "open('/proc/self/comm', 'w').write('a) b (c')\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
)


def test_read_process_of_child_with_hostile_name_then_gone() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with open(f"/proc/{child.pid}/comm") as f:
            assert f.read().strip() == "a) b (c"
        st = sockstats.read_process(child.pid)
        assert st is not None
        assert st.resident_bytes > 0
        assert st.open_fds is not None and st.open_fds >= 3
        assert st.start_time >= sockstats.read_process(os.getpid()).start_time  # type: ignore[union-attr]
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert sockstats.read_process(child.pid) is None
