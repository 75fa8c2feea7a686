"""What this round's mechanisms cost, and how fast a faulty slot's flows are served again.

``features``: one worker, echo of 64 B, the servers interleaved repetition by
repetition (as the metrics scenario does), every ratio the median of
per-repetition pairs against ``--no-steering``:

- ``steering`` (the default): the reuseport program in place;
- ``sessions``: session keeping on (``--session-idle 30``): flows tracked;
- ``tree NAME`` (each ``--before TREE``): a checkout of an earlier commit,
  e.g. the ones before and after this round's house refactor, with its own C
  extension built (``python setup.py build_ext --inplace`` in it); trees are
  also compared with the first one.

``recovery``: two workers, 32 flows at 1000 datagrams a second; a fault hits
the slot of flow 0; per flow of that slot, the gap between its last reply
before the fault and its first one after, median and max:

- ``kill -9``: the replacement is READY within steer_grace, so the flows wait
  for it (nothing steered);
- ``SIGSTOP`` with ``--timeout 2``: the worker is silent; its flows go to the
  other slot after half the timeout plus steer_grace.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import statistics
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import replace
from pathlib import Path

from bench import harness
from bench.harness import HOST, BenchError, Load
from bench.scenarios import (
    ECHO_APP,
    METRICS_REPS_FACTOR,
    PID_APP,
    Context,
    Row,
    Starter,
    _interleaved,
    _pair_ratios,
    _row,
    _shard,
)

#: The echo APP as a checkout from before the ready-made apps moved spells it.
OLD_ECHO_APP = "workers.echo:Echo"


def _in_tree(ctx: Context, tree: Path) -> Starter:
    rcvbuf = ["--rcvbuf", str(ctx.rcvbuf)] if ctx.rcvbuf else []

    def start() -> harness.Server:
        return harness.ShardServer(OLD_ECHO_APP, 1, rcvbuf, ctx.server_cpus, tree=tree)

    return start


def features(ctx: Context, before: Sequence[Path]) -> list[Row]:
    load = Load("echo", 64, ctx.duration, ctx.flows)
    configs: list[tuple[str, Starter]] = [
        ("--no-steering", _shard(ctx, ECHO_APP, 1, ["--no-steering"])),
        ("steering (default)", _shard(ctx, ECHO_APP, 1, [])),
        ("sessions (--session-idle 30)", _shard(ctx, ECHO_APP, 1, ["--session-idle", "30"])),
    ]
    for tree in before:
        configs.append((f"tree {tree.name}", _in_tree(ctx, tree)))
    more = replace(ctx, reps=ctx.reps * METRICS_REPS_FACTOR)
    samples, errors = _interleaved(more, "features", configs, [load])
    ref_name = configs[0][0]
    rows = []
    for name, _ in configs:
        row = _row(ctx, {"config": name}, name, load, samples, errors)
        if name != ref_name and "pps" in row and ref_name not in errors:
            pps, cheaper = _pair_ratios(samples[(name, load)], samples[(ref_name, load)])
            # Positive: this config costs that much more CPU per datagram than the reference.
            row["cpu_vs_no_steering"] = statistics.median([1 / c for c in cheaper]) - 1 \
                if cheaper else None
            row["cpu_vs_no_steering_range"] = [min(1 / c for c in cheaper) - 1,
                                               max(1 / c for c in cheaper) - 1] if cheaper else None
            row["pps_vs_no_steering"] = statistics.median(pps) if pps else None
            row["pairs"] = len(pps)
        rows.append(row)
    # Trees against each other (the first is the oldest): what changed between them.
    trees = [name for name, _ in configs if name.startswith("tree ")]
    for name in trees[1:]:
        first = trees[0]
        if (name, load) in samples and (first, load) in samples:
            _, cheaper = _pair_ratios(samples[(name, load)], samples[(first, load)])
            if cheaper:
                rows.append({"config": f"{name} vs {first}",
                             "cpu_change": statistics.median([1 / c for c in cheaper]) - 1,
                             "pairs": len(cheaper)})
    return rows


def recovery(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for fault in ("kill -9", "SIGSTOP"):
        extra = ["--timeout", "2"] if fault == "SIGSTOP" else []
        try:
            server = harness.ShardServer(PID_APP, 2, extra, ctx.server_cpus)
        except (BenchError, OSError) as e:
            rows.append({"fault": fault, "error": str(e)})
            continue
        try:
            rows.append(_recover(ctx, server, fault))
        except (BenchError, OSError) as e:
            rows.append({"fault": fault, "error": str(e)})
        finally:
            server.stop()
        ctx.log(f"recovery after {fault}: {rows[-1]}")
    return rows


def _recover(ctx: Context, server: harness.ShardServer, fault: str) -> Row:
    socks = []
    for _ in range(32):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((HOST, 0))
        s.setblocking(False)
        socks.append(s)
    try:
        last: dict[int, float] = {}
        pid_of: dict[int, int] = {}
        gaps: dict[int, float] = {}
        fault_at = 0.0
        victim = 0
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 6.0:
            now = time.monotonic()
            if not fault_at and now - start >= 1.0:
                victim = pid_of.get(0) or next(iter(server.slot_pids().values()))
                os.kill(victim, signal.SIGKILL if fault == "kill -9" else signal.SIGSTOP)
                fault_at = now
            socks[i % 32].sendto(b"%d" % i, (HOST, server.port))
            i += 1
            ready, _, _ = select.select(socks, [], [], 0.001)
            now = time.monotonic()
            for s in ready:
                flow = socks.index(s)
                for _ in range(64):
                    try:
                        data = s.recv(256)
                    except BlockingIOError:
                        break
                    pid = int(data.split(b":", 1)[0])
                    if fault_at and flow not in gaps and pid_of.get(flow) == victim and \
                            now > fault_at:
                        gaps[flow] = now - last.get(flow, fault_at)
                    if not fault_at:
                        pid_of[flow] = pid
                    last[flow] = now
        hit = sorted(gaps.values())
        if fault == "SIGSTOP":
            with suppress(ProcessLookupError):  # KILLed at its deadline already
                os.kill(victim, signal.SIGCONT)
        return {"fault": fault, "flows_of_the_slot": sum(1 for p in pid_of.values()
                                                         if p == victim),
                "gap_median_s": round(statistics.median(hit), 3) if hit else None,
                "gap_max_s": round(max(hit), 3) if hit else None}
    finally:
        for s in socks:
            s.close()
