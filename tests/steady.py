"""A steady stream of datagrams from many flows, with the replying pid of each reply.

Used by the fault tests: it sends at a fixed rate, round-robin over its
flows, and keeps, per flow, which worker pids answered; ``lost`` is what was
sent and never answered, counted after a final wait for late replies.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import Flows


@dataclass
class Result:
    sent: int
    answered: set[int]
    #: flow -> pids that answered it, in order of first answer.
    pids: dict[int, list[int]] = field(default_factory=dict)
    #: datagram number -> send time, for the loss report
    sent_at: dict[int, float] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.sent - len(self.answered)

    def report(self, what: str) -> str:
        share = self.lost / self.sent if self.sent else 0.0
        line = f"{what}: sent {self.sent}, lost {self.lost} ({100 * share:.2f}%)"
        print(line)
        return line

    def moved(self) -> list[int]:
        """Flows answered by more than one worker."""
        return [f for f, pids in self.pids.items() if len(pids) > 1]


class Stream(Flows):
    """``n`` client sockets on loopback sending to ``port`` (IPv4 or IPv6)."""

    def __init__(self, port: int, n: int = 40, family: socket.AddressFamily = socket.AF_INET
                 ) -> None:
        super().__init__(n, port, family)
        self.index = {s.fileno(): i for i, s in enumerate(self.socks)}

    def __enter__(self) -> Stream:
        return self

    def source(self, flow: int) -> tuple[str, int]:
        return self.socks[flow].getsockname()[:2]

    def send_to(self, flow: int, data: bytes) -> None:
        self.socks[flow].sendto(data, (self.host, self.port))

    def run(self, rate: float, duration: float,
            events: dict[float, Callable[[], object]] | None = None,
            late: float = 8.0, skip: Callable[[int], bool] | None = None) -> Result:
        """Send ``rate`` datagrams a second for ``duration`` seconds; ``events`` maps
        a time (seconds from the start) to a call made once then; ``skip(flow)``
        leaves a flow out. Waits up to ``late`` seconds for the last replies."""
        todo = sorted((events or {}).items())
        res = Result(0, set())
        flows = [f for f in range(len(self.socks)) if skip is None or not skip(f)]
        start = time.monotonic()
        total = int(rate * duration)
        i = 0
        while i < total:
            now = time.monotonic()
            while todo and now - start >= todo[0][0]:
                todo.pop(0)[1]()
            due = start + i / rate
            if now >= due:
                flow = flows[i % len(flows)]
                # A failed send is counted as lost, not fatal: the loss figure says it.
                with contextlib.suppress(OSError):
                    self.socks[flow].sendto(b"%d" % i, (self.host, self.port))
                res.sent_at[i] = now
                i += 1
                continue
            self._receive(res, due - now)
        res.sent = total
        deadline = time.monotonic() + late
        while len(res.answered) < total and time.monotonic() < deadline:
            self._receive(res, min(0.2, deadline - time.monotonic()))
        return res

    def _receive(self, res: Result, timeout: float) -> None:
        r, _, _ = select.select(self.socks, [], [], max(0.0, timeout))
        for s in r:
            for _ in range(256):
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    break
                pid, _, payload = data.partition(b":")
                if not payload.isdigit():
                    continue
                res.answered.add(int(payload))
                flow = self.index[s.fileno()]
                seen = res.pids.setdefault(flow, [])
                if int(pid) not in seen:
                    seen.append(int(pid))
