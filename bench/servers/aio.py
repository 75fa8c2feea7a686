"""Baselines: an asyncio DatagramProtocol on the default loop or on uvloop.

python -m bench.servers.aio HOST PORT echo|sink [--loop asyncio|uvloop]
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any

from bench.servers.common import announce_count, announce_ready, bound_socket, fail, parse_args


class Echo(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1
        self.transport.sendto(data, addr)


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.count = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.count += 1


async def serve(sock: socket.socket, echo: bool) -> int:
    loop = asyncio.get_running_loop()
    stopped = loop.create_future()

    def on_signal() -> None:
        if not stopped.done():
            stopped.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    proto: Echo | Sink = Echo() if echo else Sink()
    # A socket of our own (bound, buffer set) works the same on both loops.
    sock.setblocking(False)
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, sock=sock)
    announce_ready(sock.getsockname()[1])
    await stopped
    transport.close()
    return proto.count


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    loop_name = "asyncio"
    if "--loop" in argv:
        i = argv.index("--loop")
        if i + 1 >= len(argv) or argv[i + 1] not in ("asyncio", "uvloop"):
            fail("aio", "--loop must be asyncio or uvloop")
        loop_name = argv[i + 1]
        del argv[i : i + 2]
    args = parse_args("aio", argv)
    coro = serve(bound_socket("aio", args), args.echo)
    if loop_name == "uvloop":
        try:
            import uvloop
        except ImportError:
            fail("aio", "uvloop is not installed (pip install uvloop, or the bench extra)")
        count = uvloop.run(coro)
    else:
        count = asyncio.run(coro)
    announce_count(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
