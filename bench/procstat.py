"""What the bench reads from /proc: CPU time of processes, their children,
and the kernel's per-socket UDP counters (queue length, drops).

The server under test is never asked for numbers: CPU comes from
/proc/<pid>/stat and drops from /proc/net/udp{,6}, so every server, C or
Python, baseline or shardudp, is measured the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process (all its threads), or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses: split after the
    # last ')'. Fields then start at "state" (field 3), so utime (14) and
    # stime (15) are at 11 and 12.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def children(pid: int) -> list[int]:
    """Direct children of a process (empty if it is gone)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except FileNotFoundError:
            continue
        out.extend(int(p) for p in text.split())
    return sorted(set(out))


def cpu_snapshot(pids: list[int]) -> dict[int, int]:
    snap: dict[int, int] = {}
    for pid in pids:
        ticks = cpu_ticks(pid)
        if ticks is not None:
            snap[pid] = ticks
    return snap


def cpu_seconds_between(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU used between two snapshots by processes alive at the second.

    A process that appeared in between (a replacement worker) counts from
    zero; one that died in between is lost, which is why CPU figures are
    not reported for the kill scenario.
    """
    ticks = sum(t - before.get(pid, 0) for pid, t in after.items())
    return ticks / CLK_TCK


@dataclass(frozen=True)
class UdpSocketStats:
    inode: int
    rx_queue: int
    drops: int


def _port_sockets(table: str, port: int) -> list[UdpSocketStats]:
    out: list[UdpSocketStats] = []
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except FileNotFoundError:
        return out
    for line in lines:
        f = line.split()
        # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref ptr drops
        if len(f) < 13 or int(f[1].rsplit(":", 1)[1], 16) != port:
            continue
        rx_queue = int(f[4].split(":")[1], 16)
        out.append(UdpSocketStats(inode=int(f[9]), rx_queue=rx_queue, drops=int(f[12])))
    return out


def udp_sockets(port: int) -> list[UdpSocketStats]:
    """Every UDP socket bound to `port` on this host (IPv4 and IPv6)."""
    return _port_sockets("/proc/net/udp", port) + _port_sockets("/proc/net/udp6", port)


def udp_drops(port: int) -> int:
    return sum(s.drops for s in udp_sockets(port))


def udp_queued(port: int) -> int:
    return sum(s.rx_queue for s in udp_sockets(port))
