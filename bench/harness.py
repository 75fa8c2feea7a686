"""Start servers, drive the load generator at them, and measure one sample.

A sample is one load-generator run against a running server:
- datagrams the server handled = sent - the kernel's drop count on the
  server's port (after its queue drained), so no server has to report;
- CPU = utime + stime of the server's measured processes (the process itself
  for a baseline, the master's children = the workers for shardudp);
- pps = replies per second for echo, handled per second for sink.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class BenchError(RuntimeError):
    """A server or the load generator did not do what the bench needs."""


@contextmanager
def affinity(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the body (typically a Popen) with this thread pinned to `cpus`.

    A child inherits the forking thread's mask, so the program is pinned from
    its first instruction: no window where it runs elsewhere, no taskset.
    """
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def spawn(
    argv: Sequence[str], cpus: frozenset[int] | None, *, merge_stderr: bool = False,
    new_session: bool = False, tree: Path | None = None,
) -> subprocess.Popen[str]:
    """Start a bench process from the repository (or another checkout, ``tree``),
    pinned to ``cpus``, text pipes."""
    with affinity(cpus):
        return subprocess.Popen(
            list(argv),
            cwd=tree or REPO,
            env=_env(tree),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )


def _env(tree: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Servers import bench.* (and shardudp itself) from the repository, or the tree.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree or REPO), env.get("PYTHONPATH"))
                                        if p)
    return env


def _kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, sig)


class BaselineServer:
    """A single-process server that prints READY <port> and COUNT <n>."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        cpus: frozenset[int] | None,
        start_timeout: float = 15.0,
    ) -> None:
        self.name = name
        self.proc = spawn(argv, cpus)
        self.port = self._wait_ready(start_timeout)
        self.count: int | None = None

    def _wait_ready(self, timeout: float) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    continue
                line = self.proc.stdout.readline()
                if not line:
                    break  # EOF: the server exited
                if line.startswith("READY "):
                    return int(line.split()[1])
        self.stop()
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise BenchError(f"{self.name} did not become ready: {err.strip()[-500:]}")

    def measured_pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        m = re.search(r"^COUNT (\d+)$", out or "", re.M)
        self.count = int(m.group(1)) if m else None


READY_RE = re.compile(r"worker slot=(\d+) pid=(\d+) ready")


@dataclass
class LogLine:
    at: float  # time.monotonic() when the harness read it
    text: str


@dataclass
class ReadyEvent:
    at: float
    slot: int
    pid: int


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


class ShardServer:
    """``python -m shardudp run APP --bind 127.0.0.1:PORT --workers N ...``.

    Readiness is the master's ``worker slot=<n> pid=<pid> ready`` log line for
    every slot; the same lines time a replacement after a kill.
    """

    def __init__(
        self,
        app: str,
        workers: int,
        extra: Sequence[str],
        cpus: frozenset[int] | None,
        start_timeout: float = 20.0,
        attempts: int = 3,
        tree: Path | None = None,
    ) -> None:
        self.name = f"shardudp({app}, {workers}w)"
        self.workers = workers
        self.log: list[LogLine] = []
        self.ready_events: list[ReadyEvent] = []
        self._cond = threading.Condition()
        last_error = ""
        for _ in range(attempts):
            self.port = free_udp_port()
            argv = [
                sys.executable,
                "-m",
                "shardudp",
                "run",
                app,
                "--bind",
                f"{HOST}:{self.port}",
                "--workers",
                str(workers),
                # The default control socket is one per host: two servers of
                # one scenario, or anyone else's shardudp, would collide.
                "--control",
                "none",
                *extra,
            ]
            self.argv = argv
            self.proc = spawn(argv, cpus, merge_stderr=True, new_session=True, tree=tree)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            try:
                self.wait_ready(workers, start_timeout)
                return
            except BenchError as e:
                last_error = str(e)
                self.stop()
                # Someone took the port between our probe and the bind: retry
                # with another; any other failure is final.
                if "in use" not in last_error.lower():
                    break
                self.log = []
                self.ready_events = []
        raise BenchError(last_error)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            now = time.monotonic()
            text = raw.rstrip("\n")
            with self._cond:
                self.log.append(LogLine(now, text))
                if m := READY_RE.search(text):
                    self.ready_events.append(ReadyEvent(now, int(m.group(1)), int(m.group(2))))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def tail(self, n: int = 15) -> str:
        with self._cond:
            return "\n".join(line.text for line in self.log[-n:])

    def slot_pids(self) -> dict[int, int]:
        """The latest pid announced ready for each slot."""
        with self._cond:
            return {e.slot: e.pid for e in self.ready_events}

    def wait_ready(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len({e.slot for e in self.ready_events}) < n:
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise BenchError(
                        f"shardudp exited with {self.proc.returncode} before {n} workers were"
                        f" ready:\n{self.tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(
                        f"shardudp: no 'worker slot=<n> pid=<pid> ready' line for all {n} slots"
                        f" within {timeout:.0f}s:\n{self.tail()}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait_replacement(
        self, slot: int, old_pid: int, after: float, timeout: float
    ) -> ReadyEvent | None:
        """The first ready event for `slot` with a new pid, or None on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for e in self.ready_events:
                    if e.slot == slot and e.pid != old_pid and e.at >= after:
                        return e
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.2))

    def measured_pids(self) -> list[int]:
        return procstat.children(self.proc.pid)

    def stop(self) -> None:
        workers = procstat.children(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        # A worker the master failed to reap must not outlive the bench.
        for pid in workers:
            _kill_quietly(pid)
        self._reader.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()


Server = BaselineServer | ShardServer


@dataclass(frozen=True)
class Load:
    mode: str  # "echo" | "sink"
    size: int
    duration: float
    flows: int = 64
    rate: float = 0.0  # 0 = flat out
    drain: float = 1.0


@dataclass
class Sample:
    sent: int
    received: int
    handled: int
    drops: int
    cpu_s: float
    duration_s: float
    pps: float
    cpu_us_per_dgram: float | None
    cpu_share: float  # server CPU seconds per second of load: < 1 = starved or idle
    loss: float
    loadgen: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "loadgen"}


def _loadgen_argv(loadgen: Sequence[str], port: int, load: Load) -> list[str]:
    return [
        *loadgen,
        "--target",
        f"{HOST}:{port}",
        "--mode",
        load.mode,
        "--size",
        str(load.size),
        "--duration",
        str(load.duration),
        "--flows",
        str(load.flows),
        "--rate",
        str(load.rate),
        "--drain",
        str(load.drain),
    ]


def start_loadgen(
    loadgen: Sequence[str], port: int, load: Load, cpus: frozenset[int] | None
) -> subprocess.Popen[str]:
    return spawn(_loadgen_argv(loadgen, port, load), cpus)


def finish_loadgen(proc: subprocess.Popen[str], load: Load) -> dict[str, object]:
    try:
        out, err = proc.communicate(timeout=load.duration + load.drain + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError("loadgen did not finish in time") from None
    if proc.returncode != 0:
        raise BenchError(f"loadgen failed ({proc.returncode}): {err.strip()[-500:]}")
    report: dict[str, object] = json.loads(out)
    return report


def run_loadgen(
    loadgen: Sequence[str], port: int, load: Load, cpus: frozenset[int] | None
) -> dict[str, object]:
    return finish_loadgen(start_loadgen(loadgen, port, load, cpus), load)


def wait_drained(port: int, timeout: float = 3.0) -> bool:
    """Poll until the server's sockets on `port` have nothing queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procstat.udp_queued(port) == 0:
            return True
        time.sleep(0.01)
    return False


def measure(
    server: Server, loadgen: Sequence[str], load: Load, loadgen_cpus: frozenset[int] | None
) -> Sample:
    drops0 = procstat.udp_drops(server.port)
    cpu0 = procstat.cpu_snapshot(server.measured_pids())
    report = run_loadgen(loadgen, server.port, load, loadgen_cpus)
    wait_drained(server.port)
    cpu1 = procstat.cpu_snapshot(server.measured_pids())
    drops = procstat.udp_drops(server.port) - drops0
    sent = int(report["sent"])  # type: ignore[call-overload]
    received = int(report["received"])  # type: ignore[call-overload]
    duration = float(report["duration_s"])  # type: ignore[arg-type]
    handled = max(0, sent - drops)
    cpu_s = procstat.cpu_seconds_between(cpu0, cpu1)
    if load.mode == "echo":
        pps = float(report["recv_pps"])  # type: ignore[arg-type]
        loss = (sent - received) / sent if sent else 0.0
    else:
        pps = handled / duration if duration > 0 else 0.0
        loss = drops / sent if sent else 0.0
    return Sample(
        sent=sent,
        received=received,
        handled=handled,
        drops=drops,
        cpu_s=cpu_s,
        duration_s=duration,
        pps=pps,
        cpu_us_per_dgram=cpu_s * 1e6 / handled if handled else None,
        cpu_share=cpu_s / duration if duration > 0 else 0.0,
        loss=loss,
        loadgen=report,
    )
