"""UDP load generator: the C one when a compiler exists, else pure Python.

    python -m bench.loadgen --target 127.0.0.1:9999 [--flows 64] [--rate PPS|0]
        [--mode echo|sink] [--size 64] [--duration 5] [--impl auto|c|python]

Prints one JSON object (sent, received, lost, loss, sent_pps, recv_pps, ...).
The Python implementation mirrors bench/loadgen.c option for option; it
costs far more CPU per datagram, so use it only for correctness checks or
when no compiler is available, never to measure a fast server.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType

MAX_FLOWS = 4096
MAX_SIZE = 65507


class TargetError(ValueError):
    """The target is malformed or not a loopback address."""


def parse_target(text: str) -> tuple[str, int]:
    """Split HOST:PORT / [V6]:PORT and refuse anything that is not loopback."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise TargetError(f"target must look like [::1]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise TargetError(f"target must be HOST:PORT, e.g. 127.0.0.1:9999, got {text!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise TargetError(
            f"target host {host!r} is not an IP literal (use 127.0.0.1 or [::1])"
        ) from None
    if not addr.is_loopback or (addr.version == 6 and addr.ipv4_mapped is not None):
        raise TargetError(f"refusing non-loopback target {host} (only 127.0.0.0/8 or ::1)")
    try:
        port = int(port_text)
    except ValueError:
        raise TargetError(f"target port must be an integer, got {port_text!r}") from None
    if not 1 <= port <= 65535:
        raise TargetError(f"target port must be in [1, 65535], got {port}")
    return host, port


@dataclass
class Options:
    host: str
    port: int
    flows: int = 64
    rate: float = 0.0
    echo: bool = True
    size: int = 64
    duration: float = 5.0
    batch: int = 32
    drain: float = 1.0
    drain_idle: float = 0.1
    rcvbuf: int = 4 << 20


@dataclass
class Counters:
    sent: int = 0
    received: int = 0
    received_in_window: int = 0
    send_errors: int = 0
    recv_errors: int = 0


def _open_flows(opts: Options) -> list[socket.socket]:
    family = socket.AF_INET6 if ":" in opts.host else socket.AF_INET
    flows = []
    for _ in range(opts.flows):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setblocking(False)
        if opts.rcvbuf:
            # Replies come in bursts while we send; a small buffer would show
            # our own drops as server loss.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, opts.rcvbuf)
        s.connect((opts.host, opts.port))
        flows.append(s)
    return flows


def _drain(sock: socket.socket, c: Counters) -> int:
    n = 0
    for _ in range(4096):  # bounded: a flood must not starve the sender
        try:
            sock.recv(65535)
        except BlockingIOError:
            break
        except OSError:
            c.recv_errors += 1  # e.g. ECONNREFUSED while nobody listens
            break
        n += 1
    c.received += n
    return n


def run(opts: Options) -> dict[str, object]:
    """Generate load as configured; return the JSON report as a dict."""
    stop = False

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    flows = _open_flows(opts)
    sel = selectors.DefaultSelector()
    for s in flows:
        sel.register(s, selectors.EVENT_READ)
    payload = b"x" * opts.size
    c = Counters()
    flow = 0
    max_burst = max(opts.batch, opts.rate * 0.001)
    start = t0 = time.monotonic()
    end = start + opts.duration
    t = start
    try:
        while not stop and t < end:
            if opts.rate > 0:
                due = (t - start) * opts.rate - c.sent
                if due > max_burst:
                    # Descheduled: forget the backlog instead of bursting it
                    # into the server's queue (see loadgen.c).
                    start += (due - max_burst) / opts.rate
                    due = max_burst
                if due < 1:
                    # Ahead of schedule: wait for the next slot, taking
                    # replies meanwhile.
                    wait = (1 - due) / opts.rate
                    for key, _ in sel.select(wait):
                        _drain(key.fileobj, c)  # type: ignore[arg-type]
                    t = time.monotonic()
                    continue
                want = min(opts.batch, int(due))
            else:
                want = opts.batch
            sock = flows[flow]
            for _ in range(want):
                try:
                    sock.send(payload)
                except OSError:
                    c.send_errors += 1
                    break
                c.sent += 1
            flow = (flow + 1) % len(flows)
            if opts.echo and (flow == 0 or opts.rate > 0):
                if opts.rate > 0:
                    _drain(flows[flow], c)
                else:
                    for s in flows:
                        _drain(s, c)
            t = time.monotonic()
        send_end = time.monotonic()
        if opts.echo:
            for s in flows:
                _drain(s, c)
        c.received_in_window = c.received
        # Late replies: stop when all are back, after `drain` seconds, or after
        # `drain_idle` seconds with nothing arriving.
        if opts.echo and opts.drain > 0:
            deadline = send_end + opts.drain
            last_rx = time.monotonic()
            while not stop and c.received < c.sent:
                now = time.monotonic()
                if now >= deadline or now - last_rx > opts.drain_idle:
                    break
                got = 0
                for key, _ in sel.select(0.02):
                    got += _drain(key.fileobj, c)  # type: ignore[arg-type]
                if got:
                    last_rx = time.monotonic()
    finally:
        sel.close()
        for s in flows:
            s.close()
    elapsed = send_end - t0
    lost = max(0, c.sent - c.received) if opts.echo else 0
    target = f"[{opts.host}]:{opts.port}" if ":" in opts.host else f"{opts.host}:{opts.port}"
    return {
        "impl": "python",
        "target": target,
        "mode": "echo" if opts.echo else "sink",
        "flows": opts.flows,
        "size": opts.size,
        "rate": opts.rate,
        "duration_s": round(elapsed, 6),
        "sent": c.sent,
        "received": c.received,
        "received_in_window": c.received_in_window,
        "lost": lost,
        "loss": lost / c.sent if opts.echo and c.sent else 0.0,
        "send_errors": c.send_errors,
        "recv_errors": c.recv_errors,
        "sent_pps": c.sent / elapsed if elapsed > 0 else 0.0,
        "recv_pps": c.received_in_window / elapsed if opts.echo and elapsed > 0 else 0.0,
    }


def _in_range(kind: type[int] | type[float], lo: float, hi: float) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo:g}, {hi:g}], got {text}")
        return v

    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT on loopback (127.0.0.1 / [::1])")
    p.add_argument(
        "--flows",
        type=_in_range(int, 1, MAX_FLOWS),
        default=64,
        help="source sockets, each its own port (default 64)",
    )
    p.add_argument(
        "--rate",
        type=_in_range(float, 0, 1e9),
        default=0.0,
        help="datagrams/s over all flows; 0 = flat out (default)",
    )
    p.add_argument("--mode", choices=("echo", "sink"), default="echo")
    p.add_argument("--size", type=_in_range(int, 1, MAX_SIZE), default=64, help="payload bytes")
    p.add_argument("--duration", type=_in_range(float, 0.01, 3600), default=5.0, help="seconds")
    p.add_argument(
        "--batch", type=_in_range(int, 1, 256), default=32, help="datagrams per flow per turn"
    )
    p.add_argument(
        "--drain",
        type=_in_range(float, 0, 60),
        default=1.0,
        help="max seconds to wait for late replies",
    )
    p.add_argument(
        "--drain-idle",
        type=_in_range(float, 0, 60),
        default=0.1,
        help="stop waiting for late replies after this long with none arriving",
    )
    p.add_argument("--rcvbuf", type=_in_range(int, 0, 1 << 30), default=4 << 20)
    p.add_argument(
        "--impl",
        choices=("auto", "c", "python"),
        default="auto",
        help="auto: the C generator if a compiler exists, else Python",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        host, port = parse_target(args.target)
    except TargetError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    if args.impl != "python":
        from bench.build import BuildError, build

        try:
            binary = build("loadgen")
        except BuildError as e:
            if args.impl == "c":
                print(f"loadgen: {e}", file=sys.stderr)
                return 2
            print(f"loadgen: {e}; using the Python generator", file=sys.stderr)
        else:
            argv_c = [str(binary)]
            for name in (
                "target",
                "flows",
                "rate",
                "mode",
                "size",
                "duration",
                "batch",
                "drain",
                "drain_idle",
                "rcvbuf",
            ):
                argv_c += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            sys.stdout.flush()
            os.execv(binary, argv_c)
    opts = Options(
        host=host,
        port=port,
        flows=args.flows,
        rate=args.rate,
        echo=args.mode == "echo",
        size=args.size,
        duration=args.duration,
        batch=args.batch,
        drain=args.drain,
        drain_idle=args.drain_idle,
        rcvbuf=args.rcvbuf,
    )
    try:
        report = run(opts)
    except OSError as e:
        print(f"loadgen: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
