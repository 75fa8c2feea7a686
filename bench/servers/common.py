"""What every Python baseline server shares: its command line and the
READY/COUNT lines the bench harness reads from its stdout.

    python -m bench.servers.<name> HOST PORT echo|sink [--rcvbuf BYTES]

--rcvbuf sets SO_RCVBUF (0, the default, keeps the system's): the bench gives
every server the same buffer as shardudp's default, so that a comparison is
about CPU, not queue length. PORT 0 picks a free port; the bound one is
printed as ``READY <port>`` once the socket is ready, and ``COUNT <n>``
(datagrams received) on SIGTERM.
"""

from __future__ import annotations

import argparse
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

# The bench sends 64 B and 1200 B datagrams; 2048 keeps the read buffer
# small (cheap to allocate) while fitting both, as in the C baseline.
BUFSIZE = 2048


@dataclass(frozen=True)
class ServerArgs:
    host: str
    port: int
    echo: bool
    rcvbuf: int


def parse_args(prog: str, argv: list[str] | None = None) -> ServerArgs:
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("host", help="IP literal to bind, e.g. 127.0.0.1 or ::1")
    p.add_argument("port", type=int, help="UDP port; 0 picks a free one")
    p.add_argument("mode", choices=("echo", "sink"))
    p.add_argument("--rcvbuf", type=int, default=0, help="SO_RCVBUF bytes; 0 = system default")
    a = p.parse_args(argv)
    if not 0 <= a.port <= 65535:
        p.error(f"port must be in [0, 65535], got {a.port}")
    if a.rcvbuf < 0:
        p.error(f"--rcvbuf must be >= 0, got {a.rcvbuf}")
    return ServerArgs(host=a.host, port=a.port, echo=a.mode == "echo", rcvbuf=a.rcvbuf)


def bound_socket(prog: str, args: ServerArgs) -> socket.socket:
    """A UDP socket bound as asked, with the requested receive buffer."""
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if args.rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, args.rcvbuf)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        fail(prog, f"cannot bind {args.host}:{args.port}: {e}")
    return sock


def announce_ready(port: int) -> None:
    print(f"READY {port}", flush=True)


def announce_count(count: int) -> None:
    print(f"COUNT {count}", flush=True)


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
