"""The two ways to steer a slot's flows away, side by side: what one change costs.

    python -m bench.steering_cost

- the reuseport CBPF program (what shardudp does): attaching a new program
  to a group of 4 sockets, for a small table and for the largest one with a
  full load of pins (the cost of every steering or session change);
- passing a slot's socket to a sibling worker over a unix socketpair
  (SCM_RIGHTS), the alternative issue 11 named: one send and receive.

Both are microseconds per change, far below steer_grace: neither decides
the choice, which rests on what each can express (see the printout).
"""

from __future__ import annotations

import random
import socket
import time

from shardudp import sockets
from shardudp.steering import BUCKETS, PIN_CAPACITY, Steering, Table

ROUNDS = 2000


def _group(n: int) -> list[socket.socket]:
    socks = []
    port = 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", port))
        port = s.getsockname()[1]
        socks.append(s)
    return socks


def _attach_us(program: list[sockets.Insn], sock: socket.socket) -> float:
    t0 = time.perf_counter()
    for _ in range(ROUNDS):
        sockets.attach_reuseport_program(sock, program)
    return (time.perf_counter() - t0) / ROUNDS * 1e6


def _pass_fd_us(sock: socket.socket) -> float:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        t0 = time.perf_counter()
        for _ in range(ROUNDS):
            socket.send_fds(a, [b"x"], [sock.fileno()])
            _, fds, _, _ = socket.recv_fds(b, 1, 1)
            for fd in fds:
                socket.close(fd)
        return (time.perf_counter() - t0) / ROUNDS * 1e6
    finally:
        a.close()
        b.close()


def main() -> None:
    group = _group(4)
    try:
        small = Steering(Table.initial(range(4)).owners, (0, 1, 2, 3), {}, False, 1)
        rng = random.Random(1)
        worst = Steering(tuple(rng.randrange(4) for _ in range(BUCKETS)), (0, 1, 2, 3),
                         {rng.getrandbits(32): 0 for _ in range(PIN_CAPACITY)}, False, 1)
        for name, plan in (("small table (4 slots, no pins)", small),
                           (f"worst table ({BUCKETS} runs, {PIN_CAPACITY} pins)", worst)):
            program = plan.program()
            print(f"attach a CBPF program, {name}: {len(program)} instructions, "
                  f"{_attach_us(program, group[0]):.1f} µs")
        print(f"pass one socket over a socketpair (SCM_RIGHTS): {_pass_fd_us(group[1]):.1f} µs")
    finally:
        for s in group:
            s.close()


if __name__ == "__main__":
    main()
