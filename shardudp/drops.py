"""Kernel drop accounting: raw per-socket ``sk_drops`` samples in, true totals out.

Pure: no sockets, no clock, no threads. ``SocketSet`` reads the counters and
feeds them in (holding its lock); the exporter and ``status`` read the totals.

What the kernel counts
----------------------
``sk_drops`` (a wrapping u32) counts every datagram a socket refused: receive
buffer full, bad checksum, and a socket filter saying no. For most sockets
only the first two happen, and the counter is the socket's real loss. A shard
listener is different: its N member sockets each see every datagram sent to
the group, and each member's filter refuses the N-1 shares that are not its
own, so each member counts (N-1)/N of all traffic as "drops" with no loss.

The listener keeps one more socket, the *tally*: joined like the members,
with a filter that refuses everything, so its counter is D, the number of
datagrams that reached the listener. Over an interval in which the member set
is fixed and each datagram is kept by exactly one member::

    sum of member drops = (N - 1) * D + O

where O is the real overflow; so ``O = sum - (N - 1) * D``. The owner
samples right after a member joins (while its filter still refuses
everything, which keeps the formula exact) and right before one closes, so
N is constant between samples. Which member overflowed cannot be told apart
with classic BPF: shard overflow belongs to the listener (``SHARED``).

Imprecision, always towards counting less:
- a datagram kept by two members while filters change (a few microseconds)
  takes one off O;
- counters are read one after the other, members first and the tally last,
  so a datagram arriving mid-read makes D look bigger: O is low for one
  sample and caught up at the next. The exported total is the running
  maximum, so it never goes down.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from shardudp.metrics import DropUnwrapper

#: The slot label of drops that belong to a listener rather than to one slot:
#: its single-mode socket (shared by every slot) and shard-mode overflow.
SHARED: Final = "shared"

#: "socket": its drops are real and belong to (slot, listener);
#: "member": one of a shard listener's filtered sockets; "tally": its tally.
Role = Literal["socket", "member", "tally"]


@dataclass(frozen=True, slots=True)
class Reading:
    """One socket's raw ``sk_drops``, or None if it could not be read this time."""

    key: Hashable  # the same for one kernel socket over its life, never reused
    listener: str
    slot: str  # the series label: a slot number, or SHARED
    role: Role
    drops: int | None


def shard_overflow(member_deltas: Sequence[int], tally_delta: int) -> int:
    """Real overflow of a shard listener over one interval with a fixed member set.

    ``member_deltas`` are the members' drop increments, ``tally_delta`` the
    datagrams that reached the listener. Negative when reads raced traffic.
    """
    if not member_deltas:
        return 0
    return sum(member_deltas) - (len(member_deltas) - 1) * tally_delta


class DropBook:
    """Monotonic drop totals per (slot label, listener) from repeated samples.

    A (slot, listener) total keeps what closed sockets counted, so it never
    decreases when a slot is scaled down and back up. Not thread-safe.
    """

    def __init__(self) -> None:
        self._unwrap = DropUnwrapper()
        self._seen: dict[Hashable, int] = {}  # unwrapped total at the last update
        self._totals: dict[tuple[str, str], int] = {}
        self._overflow: dict[str, int] = {}  # shard: running (signed) sum of intervals

    def update(self, readings: Iterable[Reading]) -> None:
        """Account one sample. It must list every socket not yet forgotten,
        with the members and tally of a shard listener read in that order."""
        readings = list(readings)
        # One unreadable member or tally leaves the interval open: the next
        # complete sample covers it.
        broken = {r.listener for r in readings if r.role != "socket" and r.drops is None}
        shard: dict[str, tuple[list[int], list[int]]] = {}
        for r in readings:
            if r.drops is None or r.listener in broken:
                continue
            total = self._unwrap.update(r.key, r.drops)
            prev = self._seen.get(r.key)
            self._seen[r.key] = total
            if r.role == "socket":
                series = (r.slot, r.listener)
                self._totals[series] = self._totals.get(series, 0) + total - (prev or 0)
                continue
            members, tally = shard.setdefault(r.listener, ([], []))
            if prev is not None:  # a new member's first sample is only its baseline
                (members if r.role == "member" else tally).append(total - prev)
        for listener, (members, tally) in shard.items():
            if tally:
                self._overflow[listener] = (self._overflow.get(listener, 0)
                                            + shard_overflow(members, tally[0]))
            series = (SHARED, listener)
            self._totals[series] = max(self._totals.get(series, 0),
                                       self._overflow.get(listener, 0))

    def forget(self, keys: Iterable[Hashable]) -> None:
        """Sockets about to close, sampled one last time: their counts stay in the totals."""
        for key in keys:
            self._seen.pop(key, None)
        self._unwrap.keep_only(self._seen)

    def totals(self) -> Mapping[tuple[str, str], int]:
        return dict(self._totals)
