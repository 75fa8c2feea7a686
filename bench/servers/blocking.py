"""Baseline: plain Python, one blocking socket, recvfrom/sendto in a loop."""

from __future__ import annotations

import signal
import sys
from types import FrameType

from bench.servers.common import BUFSIZE, announce_count, announce_ready, bound_socket, parse_args


class _Stop(Exception):
    pass


def _on_term(_sig: int, _frame: FrameType | None) -> None:
    # Raising from the handler is the only way out of a blocking recvfrom:
    # Python retries the call after EINTR (PEP 475) unless the handler raises.
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    args = parse_args("blocking", argv)
    sock = bound_socket("blocking", args)
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, _on_term)
    announce_ready(sock.getsockname()[1])
    count = 0
    recvfrom = sock.recvfrom
    sendto = sock.sendto
    try:
        if args.echo:
            while True:
                data, addr = recvfrom(BUFSIZE)
                count += 1
                # try/except, not contextlib.suppress: this is the per-datagram
                # path and a context manager would cost more than the send.
                try:  # noqa: SIM105
                    sendto(data, addr)
                except OSError:
                    pass  # a vanished peer must not end the server
        else:
            recv = sock.recv
            while True:
                recv(BUFSIZE)
                count += 1
    except _Stop:
        pass
    announce_count(count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
