"""Run real shardudp servers on loopback and talk to them, with deadlines.

Waiting is always on an event (a log line, a readable socket, a pidfd) with
a deadline, never a bare sleep.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

#: Every server a test started, by session id, for the leak check.
STARTED_SESSIONS: set[int] = set()
_COUNTER = itertools.count()


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) of session ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[3]) == sid:
            out.append(int(name))
    return out


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait for any process (not only our child) to exit, via a pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        r, _, _ = select.select([fd], [], [], timeout)
        return bool(r)
    finally:
        os.close(fd)


T = TypeVar("T")


class Server:
    """A ``python -m shardudp run ...`` process and its captured log."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, prefix: Sequence[str] = ()) -> None:
        full_env = child_env()
        full_env.update(env or {})
        self.control = full_env["SHARDUDP_CONTROL"]
        self.args = list(args)
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "shardudp", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=full_env, cwd=cwd or ROOT, start_new_session=True)
        STARTED_SESSIONS.add(self.proc.pid)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = 15.0, start: int = 0,
                  count: int = 1) -> list[re.Match[str]]:
        """Wait until ``count`` log lines from index ``start`` match ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        found: list[re.Match[str]] = []
        seen = start
        with self._cond:
            while True:
                # Only lines not scanned yet: a chatty server logs thousands.
                found += [m for ln in self.lines[seen:] if (m := rx.search(ln))]
                seen = len(self.lines)
                if len(found) >= count:
                    return found[:count]
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(
                        f"timed out waiting for {count}x {pattern!r}; log:\n" + "\n".join(
                            self.lines[-60:]))
                self._cond.wait(left)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def ready_pids(self, start: int = 0, count: int = 1, timeout: float = 15.0) -> dict[int, int]:
        """slot -> pid of the next ``count`` READY lines."""
        ms = self.wait_line(r"worker slot=(\d+) pid=(\d+) ready", timeout, start, count)
        return {int(m.group(1)): int(m.group(2)) for m in ms}

    def wait_exit(self, timeout: float = 15.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill_all()
        self.kill_all()
        self._reader.join(5)
        assert "BUG:" not in self.log, self.log

    def kill_all(self) -> None:
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def control_path() -> str:
    """A control socket path of the test's own, never used before in this run."""
    return f"/tmp/shardudp-test-{os.getpid()}-{next(_COUNTER)}.sock"


def child_env(extra_path: Sequence[Path] = ()) -> dict[str, str]:
    """The environment a shardudp subprocess gets: this checkout and tests/ importable,
    its own control socket, and none of the host's settings.

    No test touches a host default: a shardudp that an operator runs on this host
    (as root it serves /run/shardudp/control.sock) must not make the suite fail,
    nor the suite's servers disturb it. Tests and benches may overlap too.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDUDP_")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (ROOT, TESTS, *extra_path))
    env["SHARDUDP_CONTROL"] = control_path()
    env.pop("NOTIFY_SOCKET", None)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30,
            preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m shardudp ARGS`` to completion in its own session.

    The session is recorded, so the leak check also covers what it started.
    """
    proc = subprocess.Popen([sys.executable, "-m", "shardudp", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or child_env(), cwd=ROOT, start_new_session=True,
                            preexec_fn=preexec_fn)
    STARTED_SESSIONS.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in session_pids(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=5)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def started(launch: Callable[[], tuple[Server, T]], ready: str = r"all \d+ workers ready",
            tries: int = 5, timeout: float = 15.0) -> Iterator[tuple[Server, T]]:
    """Run ``launch`` (which picks its own free ports and returns the server and
    whatever it picked) until the server logs ``ready``; a port taken in between
    is retried, any other failure is raised. The server is stopped on the way out."""
    for attempt in range(tries):
        srv, picked = launch()
        try:
            try:
                srv.wait_line(ready, timeout=timeout)
            except AssertionError:
                if "already in use" in srv.log and attempt < tries - 1:
                    continue
                raise
            yield srv, picked
            return
        finally:
            srv.stop()
    raise AssertionError("could not find a free port")


@contextlib.contextmanager
def serving(app: str, workers: int = 2, extra: Sequence[str] = (),
            family: socket.AddressFamily = socket.AF_INET, ready: bool = True,
            env: dict[str, str] | None = None, tries: int = 5) -> Iterator[tuple[Server, int]]:
    """Start ``app`` on a free loopback port, retrying if the port was taken."""
    host = "[::1]" if family == socket.AF_INET6 else "127.0.0.1"

    def launch() -> tuple[Server, int]:
        port = free_port(family)
        return Server(["run", app, "--bind", f"{host}:{port}", "--workers", str(workers),
                       *extra], env=env), port

    if not ready:
        srv, port = launch()
        try:
            yield srv, port
        finally:
            srv.stop()
        return
    with started(launch, tries=tries, timeout=20) as running:
        yield running


def metrics_port(srv: Server) -> int:
    """The port a server started with ``--metrics 127.0.0.1:0`` picked (race-free,
    unlike a port chosen here first: a client connection may take that one)."""
    return int(srv.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")[0].group(1))


def http_get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """(status, body) of GET ``path`` on a local HTTP port (errors included)."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def metric_sum(port: int, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` on ``/metrics`` whose labels include ``labels``."""
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    total = 0.0
    for line in body.splitlines():
        if (line.startswith((name + "{", name + " "))
                and all(f'{k}="{v}"' in line for k, v in labels.items())):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Flows:
    """``n`` client sockets, each its own flow (source port)."""

    def __init__(self, n: int, port: int, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        self.port = port
        self.socks = []
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((self.host, 0))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.setblocking(False)
            self.socks.append(s)

    def close(self) -> None:
        for s in self.socks:
            s.close()

    def __enter__(self) -> Flows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, i: int, data: bytes) -> None:
        self.socks[i].sendto(data, (self.host, self.port))

    def collect(self, want: int, timeout: float, bufsize: int = 65536) -> list[tuple[int, bytes]]:
        """Receive until ``want`` replies or the deadline: (flow, data)."""
        got: list[tuple[int, bytes]] = []
        index = {s.fileno(): i for i, s in enumerate(self.socks)}
        deadline = time.monotonic() + timeout
        while len(got) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select(self.socks, [], [], left)
            for s in r:
                for _ in range(1000):
                    try:
                        data = s.recv(bufsize)
                    except BlockingIOError:
                        break
                    got.append((index[s.fileno()], data))
        return got

    def stream(self, rate: float, duration: float, on_tick: dict[float, object] | None = None,
               prefix: bytes = b"") -> tuple[int, set[bytes]]:
        """Send at ``rate``/s for ``duration`` s round-robin over the flows,
        receiving replies as they come; ``on_tick`` maps a fraction of the
        duration to a callable run once when reached. Returns (sent, replies).
        """
        actions = sorted((on_tick or {}).items())
        interval = 1.0 / rate
        total = int(rate * duration)
        replies: set[bytes] = set()
        start = time.monotonic()
        index = 0
        while index < total:
            now = time.monotonic()
            while actions and (now - start) >= actions[0][0] * duration:
                _, fn = actions.pop(0)
                fn()  # type: ignore[operator]
            due = start + index * interval
            if now >= due:
                self.send(index % len(self.socks), prefix + b"%08d" % index)
                index += 1
                continue
            r, _, _ = select.select(self.socks, [], [], due - now)
            for s in r:
                for _ in range(100):
                    try:
                        replies.add(s.recv(65536))
                    except BlockingIOError:
                        break
        for _, data in self.collect(total - len(replies), timeout=10.0):
            replies.add(data)
            if len(replies) >= total:
                break
        return total, replies


def ctl(srv: Server, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    env = dict(child_env(), SHARDUDP_CONTROL=srv.control)
    return run_cli("ctl", *args, env=env, timeout=timeout)


class McastSenders(Flows):
    """``n`` loopback-only multicast senders, each its own flow (source port).

    ``send(i, data)`` goes to ``group:port``; replies come back by unicast and
    ``collect`` / ``replies`` read them.
    """

    def __init__(self, n: int, group: str = "", port: int = 0) -> None:
        super().__init__(n, port)
        self.host = group
        for s in self.socks:
            # Never leave the machine: send the group out of lo only.
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)

    def send_many(self, addr: tuple[str, int], count: int, prefix: bytes = b"",
                  start: int = 0) -> None:
        """Datagram i (``prefix`` + 6 digits) for i in start..start+count, from sender i % n."""
        for i in range(start, start + count):
            self.socks[i % len(self.socks)].sendto(b"%s%06d" % (prefix, i), addr)
            if i % 50 == 49:
                time.sleep(0.005)  # pacing the sender, not synchronising

    def replies(self, want: int, timeout: float) -> list[tuple[int, bytes]]:
        """(pid, payload) of each reply of an APP answering ``PID:payload``."""
        out = []
        for _, data in self.collect(want, timeout):
            pid, _, payload = data.partition(b":")
            out.append((int(pid), payload))
        return out
