"""The bench's scenarios. Each returns plain dicts that go straight into the
JSON report; an error in one server or scenario is recorded, not raised, so
one broken server does not cost the rest of the run.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

from bench import harness
from bench.harness import HOST, BenchError, Load, Sample, Server
from bench.servers import Baseline

ECHO_APP = "echo"  # shardudp.workers.echo:Echo
SINK_APP = "sink"  # shardudp.workers.sink:Sink
PID_APP = "bench.pidreply:PidReply"

Row = dict[str, object]
Log = Callable[[str], None]


@dataclass
class Context:
    loadgen: list[str]
    loadgen_cpus: frozenset[int] | None
    server_cpus: frozenset[int] | None
    reps: int
    duration: float
    flows: int
    workers: int  # "N" in the shardudp-N scenarios
    log: Log
    baselines: list[Baseline] = field(default_factory=list)
    shardudp_error: str | None = None  # why shardudp scenarios are skipped
    only: frozenset[str] | None = None  # matrix servers to run (None: all)
    rcvbuf: int = 0  # SO_RCVBUF for every server; 0 = each server's own default


def summarize(samples: list[Sample]) -> Row:
    """Medians over repetitions, plus the raw samples."""
    cpus = [s.cpu_us_per_dgram for s in samples if s.cpu_us_per_dgram is not None]
    return {
        "pps": statistics.median(s.pps for s in samples),
        "cpu_us_per_dgram": statistics.median(cpus) if cpus else None,
        "loss": statistics.median(s.loss for s in samples),
        "cpu_share": statistics.median(s.cpu_share for s in samples),
        "samples": [s.as_dict() for s in samples],
    }


def _fmt(row: Row) -> str:
    cpu = row.get("cpu_us_per_dgram")
    cpu_s = f"{cpu:.2f} us/dgram" if isinstance(cpu, float) else "-"
    return f"{float(row['pps']) / 1e3:8.1f} kpps  {cpu_s}  loss {float(row['loss']):.1%}"  # type: ignore[arg-type]


@contextmanager
def _started(start: Callable[[], Server]) -> Iterator[Server]:
    server = start()
    try:
        yield server
    finally:
        server.stop()


def _shard(ctx: Context, app: str, workers: int, extra: Sequence[str] = ()) -> Callable[[], Server]:
    rcvbuf = ["--rcvbuf", str(ctx.rcvbuf)] if ctx.rcvbuf else []

    def start() -> Server:
        if ctx.shardudp_error:
            raise BenchError(ctx.shardudp_error)
        return harness.ShardServer(app, workers, [*rcvbuf, *extra], ctx.server_cpus)

    return start


Starter = Callable[[], Server]
ERRORS = (BenchError, subprocess.SubprocessError, OSError)


def _interleaved(
    ctx: Context, label: str, starters: Sequence[tuple[str, Starter]], loads: Sequence[Load]
) -> tuple[dict[tuple[str, Load], list[Sample]], dict[str, str]]:
    """Measure every load against every server, repetitions going round them.

    All servers run at once (idle ones block in recv, on the server CPUs), so
    a burst of noise from whatever else runs on the machine lands on one
    sample of several servers instead of every sample of one, and ratios
    between servers of one call compare like with like.
    """
    running: dict[str, Server] = {}
    errors: dict[str, str] = {}
    samples: dict[tuple[str, Load], list[Sample]] = {}
    try:
        for name, start in starters:
            try:
                running[name] = start()
            except ERRORS as e:
                errors[name] = str(e)
                ctx.log(f"{label}: {name} FAILED: {str(e).splitlines()[0]}")
        for rep in range(ctx.reps):
            ctx.log(f"{label}: repetition {rep + 1} of {ctx.reps}")
            for load in loads:
                for name, server in running.items():
                    if name in errors:
                        continue
                    try:
                        sample = harness.measure(server, ctx.loadgen, load, ctx.loadgen_cpus)
                    except ERRORS as e:
                        errors[name] = str(e)
                        ctx.log(f"{label}: {name} FAILED: {str(e).splitlines()[0]}")
                        continue
                    samples.setdefault((name, load), []).append(sample)
    finally:
        for server in running.values():
            server.stop()
    return samples, errors


def _row(
    ctx: Context,
    head: Row,
    name: str,
    load: Load,
    samples: dict[tuple[str, Load], list[Sample]],
    errors: dict[str, str],
) -> Row:
    row = dict(head)
    if name in errors:
        row["error"] = errors[name]
    else:
        row.update(summarize(samples[(name, load)]))
        ctx.log(f"{load.mode}-{load.size:<5} {name:<28} {_fmt(row)}")
    return row


def matrix(ctx: Context, modes: Sequence[str], sizes: Sequence[int]) -> list[Row]:
    """echo/sink x sizes against every baseline and shardudp with 1 and N workers."""
    rows: list[Row] = []
    for mode in modes:
        starters: list[tuple[str, Starter]] = []
        titles: dict[str, str] = {}
        for b in ctx.baselines:
            starters.append((b.name, _baseline(ctx, b, mode)))
            titles[b.name] = b.title
        app = ECHO_APP if mode == "echo" else SINK_APP
        for n in sorted({1, ctx.workers}):
            name = f"shardudp-{n}"
            starters.append((name, _shard(ctx, app, n)))
            titles[name] = f"shardudp, {n} worker{'s' if n > 1 else ''}"
        if ctx.only is not None:
            starters = [(name, start) for name, start in starters if name in ctx.only]
        loads = [Load(mode, size, ctx.duration, ctx.flows) for size in sizes]
        samples, errors = _interleaved(ctx, mode, starters, loads)
        for name, _ in starters:
            for load in loads:
                head: Row = {"server": name, "title": titles[name], "mode": mode, "size": load.size}
                rows.append(_row(ctx, head, name, load, samples, errors))
    return rows


def _baseline(ctx: Context, b: Baseline, mode: str) -> Starter:
    argv = b.command(HOST, mode, ctx.rcvbuf)
    return lambda: harness.BaselineServer(b.name, argv, ctx.server_cpus)


def datapath(ctx: Context, modes: Sequence[str] = ("echo", "sink")) -> list[Row]:
    """shardudp, 1 worker, 64 B, per --datapath, next to stock Twisted and the C
    recvmmsg server, all in one interleaved run per mode.

    The ratios are per worker: pps (noise-sensitive) and CPU per datagram
    (the reference's µs over this one's, >1 = cheaper than the reference).
    """
    rows: list[Row] = []
    for mode in modes:
        rows += _datapath_mode(ctx, mode)
    return rows


def _datapath_mode(ctx: Context, mode: str) -> list[Row]:
    load = Load(mode, 64, ctx.duration, ctx.flows)
    app = ECHO_APP if mode == "echo" else SINK_APP
    starters: list[tuple[str, Starter]] = [
        (dp, _shard(ctx, app, 1, ["--datapath", dp]))
        for dp in ("twisted", "python-loop", "python", "c")
    ]
    titles = {"stock": "stock Twisted listenUDP", "c-echo": "C recvmmsg/sendmmsg server"}
    refs = {"stock": "twisted", "c-echo": "c"}
    for name, baseline in reversed(refs.items()):
        found = [b for b in ctx.baselines if b.name == baseline]
        if found:
            starters.insert(0, (name, _baseline(ctx, found[0], mode)))
    # Echo decides issue 7's ratio bars: more repetitions, as for metrics.
    run = replace(ctx, reps=ctx.reps * DATAPATH_REPS_FACTOR) if mode == "echo" else ctx
    samples, errors = _interleaved(run, f"datapath {mode}", starters, [load])
    measured = {name for name, _ in starters if name not in errors}
    rows = []
    for name, _ in starters:
        head: Row = {"datapath": titles.get(name, name), "mode": mode}
        row = _row(ctx, head, name, load, samples, errors)
        for key, suffix in (("stock", "twisted"), ("c-echo", "c_echo")):
            if key in measured and "pps" in row:
                row.update(_paired_ratios(samples[(name, load)], samples[(key, load)], suffix))
        rows.append(row)
    return rows


#: Repetitions of the datapath scenario's echo run, times ctx.reps.
DATAPATH_REPS_FACTOR = 3


def _pair_ratios(this: Sequence[Sample], ref: Sequence[Sample]) -> tuple[list[float], list[float]]:
    """Per repetition: this pps / ref pps, and ref CPU per datagram / this one
    (>1 = this is cheaper); pairs missing a measurement are left out."""
    pairs = list(zip(this, ref, strict=False))
    pps = [a.pps / b.pps for a, b in pairs if b.pps]
    cpu = [b.cpu_us_per_dgram / a.cpu_us_per_dgram for a, b in pairs
           if a.cpu_us_per_dgram and b.cpu_us_per_dgram]
    return pps, cpu


def _paired_ratios(this: Sequence[Sample], ref: Sequence[Sample], suffix: str) -> Row:
    """This server against a reference, as medians of per-repetition ratios.

    Within one repetition the servers run one after the other, seconds apart,
    so a slow spell of the (shared) machine hits both and cancels out; a ratio
    of two medians taken over the whole run does not cancel it. The range of
    the per-repetition ratios goes with each median.
    """
    pps, cpu = _pair_ratios(this, ref)
    out: Row = {f"ratio_pairs_vs_{suffix}": min(len(this), len(ref))}
    for key, values in ((f"ratio_vs_{suffix}", pps), (f"cpu_ratio_vs_{suffix}", cpu)):
        if values:
            out[key] = statistics.median(values)
            out[f"{key}_range"] = [min(values), max(values)]
    return out


def scaling(ctx: Context, counts: Sequence[int]) -> list[Row]:
    """shardudp echo 64 B with 1, 2, 4... workers: CPU per datagram per worker.

    With fewer server CPUs than workers the pps cannot grow; what must hold is
    that a datagram costs the same CPU whatever N is (no per-worker overhead
    on the data path).
    """
    load = Load("echo", 64, ctx.duration, ctx.flows)
    starters = [(f"shardudp-{n}", _shard(ctx, ECHO_APP, n)) for n in counts]
    samples, errors = _interleaved(ctx, "scaling", starters, [load])
    rows = []
    base: float | None = None
    for n, (name, _) in zip(counts, starters, strict=True):
        row = _row(ctx, {"workers": n}, name, load, samples, errors)
        cpu = row.get("cpu_us_per_dgram")
        if base is None and isinstance(cpu, float):
            base = cpu
        row["cpu_vs_1"] = _ratio(cpu, base)
        rows.append(row)
    return rows


def _ratio(num: object, den: object) -> float | None:
    if isinstance(num, int | float) and isinstance(den, int | float) and den:
        return float(num) / float(den)
    return None


#: The metrics scenario compares two near-equal numbers, so it takes more
#: repetitions than the others (times ctx.reps).
METRICS_REPS_FACTOR = 3


def metrics(ctx: Context) -> list[Row]:
    """shardudp, 1 worker, echo 64 B: per-datagram counting on vs off.

    The overhead is the median of per-repetition ratios: the two servers of
    one repetition run back to back, so a slow spell of the machine hits both
    and cancels out, which the ratio of two medians does not do.
    """
    load = Load("echo", 64, ctx.duration, ctx.flows)
    configs = {
        "metrics on (--metrics 127.0.0.1:0 --metrics-interval 1)": [
            "--metrics",
            f"{HOST}:0",
            "--metrics-interval",
            "1",
        ],
        "metrics off (--metrics-interval 0)": ["--metrics-interval", "0"],
    }
    starters = [(label, _shard(ctx, ECHO_APP, 1, extra)) for label, extra in configs.items()]
    more = replace(ctx, reps=ctx.reps * METRICS_REPS_FACTOR)
    samples, errors = _interleaved(more, "metrics", starters, [load])
    rows = [_row(ctx, {"config": label}, label, load, samples, errors) for label in configs]
    on, off = rows
    if "pps" in on and "pps" in off:
        on_s, off_s = (samples[(label, load)] for label in configs)
        pps, cheaper = _pair_ratios(on_s, off_s)
        # Positive = metrics cost that much; pps is noisier than CPU/dgram.
        on["overhead_pps"] = 1 - statistics.median(pps) if pps else None
        on["overhead_cpu"] = statistics.median([1 / c for c in cheaper]) - 1 if cheaper else None
        on["overhead_pairs"] = min(len(on_s), len(off_s))
    return rows


def kill_worker(
    ctx: Context, capacity: float, fractions: Sequence[float], duration: float, kill_at: float
) -> list[Row]:
    """kill -9 one of N workers under a fixed echo load; count what is lost.

    Each fraction gets a fresh server, a control run without a kill at the
    same rate (loss the load causes by itself), then the kill run.
    """
    rows: list[Row] = []
    for frac in fractions:
        rate = round(capacity * frac)
        load = Load("echo", 64, duration, ctx.flows, rate=rate, drain=3.0)
        row: Row = {"fraction": frac, "rate": rate, "workers": ctx.workers}
        try:
            with _started(_shard(ctx, ECHO_APP, ctx.workers)) as server:
                assert isinstance(server, harness.ShardServer)
                control = harness.measure(server, ctx.loadgen, load, ctx.loadgen_cpus)
                row["control_lost"] = control.sent - control.received
                row.update(_kill_run(ctx, server, load, kill_at))
            ctx.log(
                f"kill at {frac:.0%} ({rate / 1e3:.0f} kpps): lost {row.get('lost')}"
                f" (control {row.get('control_lost')}), ready after"
                f" {row.get('ready_after_s')}"
            )
        except (BenchError, subprocess.SubprocessError, OSError) as e:
            ctx.log(f"kill at {frac:.0%} FAILED: {str(e).splitlines()[0]}")
            row["error"] = str(e)
        rows.append(row)
    return rows


def _kill_run(ctx: Context, server: harness.ShardServer, load: Load, kill_at: float) -> Row:
    slots = server.slot_pids()
    slot = min(slots)
    victim = slots[slot]
    proc = harness.start_loadgen(ctx.loadgen, server.port, load, ctx.loadgen_cpus)
    try:
        # Scheduling the kill inside the load window, not synchronising.
        time.sleep(kill_at)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        ready = server.wait_replacement(slot, victim, killed_at, timeout=load.duration + 15)
        report = harness.finish_loadgen(proc, load)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sent = int(report["sent"])  # type: ignore[call-overload]
    received = int(report["received"])  # type: ignore[call-overload]
    return {
        "killed_slot": slot,
        "killed_pid": victim,
        "replacement_pid": ready.pid if ready else None,
        "ready_after_s": round(ready.at - killed_at, 4) if ready else None,
        "sent": sent,
        "received": received,
        "lost": sent - received,
        "loss": (sent - received) / sent if sent else 0.0,
    }


def evenness(ctx: Context, workers: int, flows: int) -> Row:
    """How the kernel spreads `flows` source ports over N workers.

    Counted twice: by the pid each flow's reply names, and by the per-slot
    ``shardudp_datagrams_received_total`` series of the metrics endpoint.
    """
    row: Row = {"workers": workers, "flows": flows}
    metrics_port = harness.free_tcp_port()
    extra = ["--metrics", f"{HOST}:{metrics_port}", "--metrics-interval", "0.2"]
    try:
        with _started(_shard(ctx, PID_APP, workers, extra)) as server:
            assert isinstance(server, harness.ShardServer)
            pid_to_slot = {pid: slot for slot, pid in server.slot_pids().items()}
            by_port, sent = _pids_per_flow(server.port, flows)
            row["per_worker_metrics"] = _metrics_per_slot(metrics_port, sent)
        counts = Counter(by_port.values())
        per_slot = {str(pid_to_slot.get(pid, f"pid {pid}")): n for pid, n in counts.items()}
        row["per_worker"] = dict(sorted(per_slot.items()))
        row["answered"] = sum(counts.values())
        values = list(counts.values()) + [0] * (workers - len(counts))
        row["max_over_min"] = max(values) / min(values) if min(values) else None
        ctx.log(
            f"evenness {workers} workers, {flows} flows: {row['per_worker']}"
            f" max/min {row['max_over_min']}; from /metrics: {row['per_worker_metrics']}"
        )
    except (BenchError, OSError) as e:
        ctx.log(f"evenness FAILED: {str(e).splitlines()[0]}")
        row["error"] = str(e)
    return row


_RX_SERIES = re.compile(r"^shardudp_datagrams_received_total\{([^}]*)\} (\S+)$", re.M)
_SLOT_LABEL = re.compile(r'slot="(\d+)"')


def _metrics_per_slot(port: int, expected: int, timeout: float = 5.0) -> dict[str, int] | str:
    """Per-slot received counts from /metrics once they add up to `expected`.

    Workers report every interval, so poll until the totals catch up; return
    a note instead of counts if the endpoint or the series is missing.
    """
    deadline = time.monotonic() + timeout
    per_slot: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError as e:
            return f"metrics endpoint unavailable: {e}"
        per_slot = {}
        for labels, value in _RX_SERIES.findall(text):
            if m := _SLOT_LABEL.search(labels):
                per_slot[m.group(1)] = per_slot.get(m.group(1), 0) + int(float(value))
        if per_slot and sum(per_slot.values()) >= expected:
            return dict(sorted(per_slot.items()))
        time.sleep(0.1)
    if not per_slot:
        return "no shardudp_datagrams_received_total series"
    return dict(sorted(per_slot.items()))


def _pids_per_flow(
    port: int, flows: int, tries: int = 5, wait: float = 0.3
) -> tuple[dict[int, int], int]:
    """Send one datagram from each of `flows` sockets; map source port -> pid.

    Also returns how many datagrams were sent (a flow is retried if its reply
    did not come back in time).
    """
    socks = []
    answered: dict[int, int] = {}
    sent = 0
    try:
        for _ in range(flows):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.bind((HOST, 0))  # all open at once: every flow a distinct port
            s.connect((HOST, port))
            socks.append(s)
        with selectors.DefaultSelector() as sel:
            for s in socks:
                sel.register(s, selectors.EVENT_READ)
            for _ in range(tries):
                pending = [s for s in socks if s.getsockname()[1] not in answered]
                if not pending:
                    break
                for s in pending:
                    s.send(b"which worker?")
                    sent += 1
                deadline = time.monotonic() + wait
                while (left := deadline - time.monotonic()) > 0 and len(answered) < flows:
                    for key, _ in sel.select(left):
                        sock: socket.socket = key.fileobj  # type: ignore[assignment]
                        try:
                            reply = sock.recv(64)
                        except OSError:
                            continue
                        answered[sock.getsockname()[1]] = int(reply)
    finally:
        for s in socks:
            s.close()
    return answered, sent
