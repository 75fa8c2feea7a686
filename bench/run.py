"""Run the whole benchmark: every scenario against every server, one command.

    python -m bench.run                     # everything, a few minutes
    python -m bench.run --scenarios matrix --servers c,twisted --reps 1

Writes <out>/latest.json, latest.md and latest.png (default bench/results/),
and with --update-readme rewrites the results section of bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import features, report, scenarios
from bench.build import BuildError, build
from bench.harness import REPO, Load, measure
from bench.scenarios import Context
from bench.servers import baselines

ALL_SCENARIOS = ("matrix", "datapath", "metrics", "scaling", "kill", "evenness", "features",
                 "recovery")
README = Path(__file__).resolve().parent / "README.md"
START, END = "<!-- bench:results:start -->", "<!-- bench:results:end -->"


def _cpus(text: str) -> frozenset[int]:
    try:
        cpus = frozenset(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected CPU numbers like 0 or 1,2, got {text!r}"
        ) from None
    if not cpus:
        raise argparse.ArgumentTypeError("empty CPU list")
    return cpus


def _positive(kind: type[int] | type[float]) -> Any:
    def check(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return check


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument(
        "--scenarios",
        type=_list,
        default=list(ALL_SCENARIOS),
        help=f"comma list of {','.join(ALL_SCENARIOS)} (default: all)",
    )
    p.add_argument(
        "--servers",
        type=_list,
        default=None,
        help="matrix servers to run, e.g. c,twisted,shardudp-1 (default: all)",
    )
    p.add_argument("--modes", type=_list, default=["echo", "sink"])
    p.add_argument("--sizes", type=_list, default=["64", "1200"], help="payload bytes")
    p.add_argument("--reps", type=_positive(int), default=3, help="repetitions (median)")
    p.add_argument("--duration", type=_positive(float), default=2.0, help="seconds per run")
    p.add_argument("--flows", type=_positive(int), default=64, help="source ports")
    p.add_argument(
        "--workers",
        type=_positive(int),
        default=None,
        help="N for shardudp-N (default: server CPUs, at least 2)",
    )
    p.add_argument(
        "--rcvbuf",
        type=int,
        default=4 << 20,
        help="SO_RCVBUF for every server (default 4 MiB, shardudp's default); 0 = each"
        " server's own default",
    )
    p.add_argument("--loadgen", choices=("auto", "c", "python"), default="auto")
    p.add_argument("--loadgen-cpus", type=_cpus, default=None)
    p.add_argument("--server-cpus", type=_cpus, default=None)
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--kill-fractions", type=_list, default=["0.25", "0.5", "0.75"])
    p.add_argument("--kill-duration", type=_positive(float), default=4.0)
    p.add_argument(
        "--kill-at",
        type=_positive(float),
        default=1.0,
        help="seconds into the load to kill the worker",
    )
    p.add_argument(
        "--scaling-workers",
        type=_list,
        default=["1", "2", "4"],
        help="worker counts of the scaling scenario",
    )
    p.add_argument("--even-workers", type=_positive(int), default=4)
    p.add_argument("--even-flows", type=_positive(int), default=1000)
    p.add_argument(
        "--before",
        type=Path,
        action="append",
        default=[],
        help="features: also run the echo server of this checkout (an earlier commit, its C"
        " extension built in place) for a before/after ratio; repeatable",
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the report's notes (e.g. what else ran on the machine); repeatable",
    )
    p.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the results section of bench/README.md",
    )
    return p


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _rmem_max() -> str:
    try:
        return Path("/proc/sys/net/core/rmem_max").read_text().strip()
    except OSError:
        return "unknown"


def _plan_cpus(
    args: argparse.Namespace,
) -> tuple[frozenset[int] | None, frozenset[int] | None, list[str]]:
    if args.no_pin:
        return None, None, ["not pinned (--no-pin)"]
    avail = sorted(os.sched_getaffinity(0))
    if args.loadgen_cpus or args.server_cpus:
        lg = args.loadgen_cpus or frozenset(avail[:1])
        sv = args.server_cpus or frozenset(c for c in avail if c not in lg)
        return lg, sv, []
    if len(avail) < 2:
        return None, None, ["only one CPU available: load generator and server share it"]
    return frozenset(avail[:1]), frozenset(avail[1:]), []


def _loadgen(impl: str) -> tuple[list[str], str, list[str]]:
    if impl != "python":
        try:
            return [str(build("loadgen"))], "C sendmmsg/recvmmsg", []
        except BuildError as e:
            if impl == "c":
                raise SystemExit(f"bench: {e}") from None
            note = f"C load generator unavailable ({e}); the Python one caps what is measured"
            return (
                [sys.executable, "-m", "bench.loadgen", "--impl", "python"],
                "Python fallback",
                [note],
            )
    return [sys.executable, "-m", "bench.loadgen", "--impl", "python"], "Python fallback", []


def _shardudp_error() -> str | None:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "shardudp", "run", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"shardudp CLI not runnable: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"shardudp CLI not runnable ({last})"
    return None


def _save(result: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(result, indent=1) + "\n")


def _median_pps(rows: list[dict[str, Any]], server: str) -> float | None:
    for r in rows:
        if r["server"] == server and r["mode"] == "echo" and r["size"] == 64 and "pps" in r:
            return float(r["pps"])
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unknown = set(args.scenarios) - set(ALL_SCENARIOS)
    if unknown:
        print(
            f"bench: unknown scenario(s) {', '.join(sorted(unknown))};"
            f" known: {', '.join(ALL_SCENARIOS)}",
            file=sys.stderr,
        )
        return 2
    try:
        sizes = [int(s) for s in args.sizes]
        fractions = [float(f) for f in args.kill_fractions]
        counts = [int(n) for n in args.scaling_workers]
    except ValueError as e:
        print(
            f"bench: bad number in --sizes/--kill-fractions/--scaling-workers: {e}",
            file=sys.stderr,
        )
        return 2
    if args.rcvbuf < 0:
        print(f"bench: --rcvbuf must be >= 0, got {args.rcvbuf}", file=sys.stderr)
        return 2
    if bad := set(args.modes) - {"echo", "sink"}:
        print(f"bench: --modes takes echo,sink; got {', '.join(sorted(bad))}", file=sys.stderr)
        return 2

    lg_cpus, sv_cpus, notes = _plan_cpus(args)
    if lg_cpus is not None:
        # The harness itself idles on the load generator's CPU, away from the server.
        os.sched_setaffinity(0, lg_cpus)
    loadgen, loadgen_name, lg_notes = _loadgen(args.loadgen)
    notes += lg_notes
    found, missing = baselines()
    notes += [f"baseline {name} skipped: {why}" for name, why in missing.items()]
    workers = args.workers or max(2, len(sv_cpus or os.sched_getaffinity(0)))
    n_rows = "matrix" in args.scenarios and (
        not args.servers or f"shardudp-{workers}" in args.servers
    )
    if sv_cpus is not None and n_rows and workers > len(sv_cpus):
        notes.append(
            f"shardudp-{workers}: {workers} workers share {len(sv_cpus)} server"
            f" CPU(s), so N-worker rows show overhead, not scaling"
        )
    if args.rcvbuf:
        notes.append(
            f"every server gets SO_RCVBUF {args.rcvbuf} (the kernel caps it at rmem_max"
            f" {_rmem_max()}), so queue length is the same for all"
        )
    if args.note:
        notes += args.note
    shard_err = _shardudp_error()
    if shard_err:
        notes.append(f"shardudp scenarios skipped: {shard_err}")

    def log(msg: str) -> None:
        print(msg, flush=True)

    ctx = Context(
        loadgen=loadgen,
        loadgen_cpus=lg_cpus,
        server_cpus=sv_cpus,
        reps=args.reps,
        duration=args.duration,
        flows=args.flows,
        workers=workers,
        log=log,
        baselines=found,
        shardudp_error=shard_err,
        only=frozenset(args.servers) if args.servers else None,
        rcvbuf=args.rcvbuf,
    )
    command = (
        "python -m bench.run"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    result: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPUs, {_cpu_model()}, Linux {platform.release()}",
            "python": platform.python_version(),
            "command": command.strip(),
            "loadgen": loadgen_name,
            "loadgen_cpus": sorted(lg_cpus) if lg_cpus else "any",
            "server_cpus": sorted(sv_cpus) if sv_cpus else "any",
            "reps": args.reps,
            "duration": args.duration,
            "flows": args.flows,
            "workers": workers,
            "notes": notes,
        }
    }
    for note in notes:
        log(f"note: {note}")

    if "matrix" in args.scenarios:
        result["matrix"] = scenarios.matrix(ctx, args.modes, sizes)
        _save(result, args.out)
    matrix_rows: list[dict[str, Any]] = result.get("matrix", [])
    if "datapath" in args.scenarios:
        result["datapath"] = scenarios.datapath(ctx)
        _save(result, args.out)
    if "metrics" in args.scenarios:
        result["metrics"] = scenarios.metrics(ctx)
        _save(result, args.out)
    if "scaling" in args.scenarios:
        result["scaling"] = scenarios.scaling(ctx, counts)
        _save(result, args.out)

    if "kill" in args.scenarios:
        capacity = _median_pps(matrix_rows, f"shardudp-{workers}")
        if capacity is None and not shard_err:
            capacity = _measure_capacity(ctx)
        if capacity:
            result["kill"] = scenarios.kill_worker(
                ctx, capacity, fractions, args.kill_duration, args.kill_at
            )
        else:
            log("kill: skipped, no shardudp capacity measured")
        _save(result, args.out)
    if "evenness" in args.scenarios:
        result["evenness"] = scenarios.evenness(ctx, args.even_workers, args.even_flows)
        _save(result, args.out)
    if "features" in args.scenarios:
        result["features"] = features.features(ctx, args.before)
        _save(result, args.out)
    if "recovery" in args.scenarios:
        result["recovery"] = features.recovery(ctx)
        _save(result, args.out)

    png = args.out / "latest.png"
    skipped = report.plot(result, png)
    if skipped:
        log(skipped)
    md = report.markdown(result, None if skipped else png.name)
    (args.out / "latest.md").write_text(md + "\n")
    if args.update_readme:
        _update_readme(md, args.out, png if not skipped else None)
    log(f"wrote {args.out / 'latest.json'}, latest.md" + ("" if skipped else ", latest.png"))
    return 0


def _measure_capacity(ctx: Context) -> float | None:
    from bench.harness import ShardServer

    try:
        server = ShardServer(scenarios.ECHO_APP, ctx.workers, [], ctx.server_cpus)
    except Exception as e:  # report and go on: the kill scenario is then skipped
        ctx.log(f"capacity: FAILED: {str(e).splitlines()[0]}")
        return None
    try:
        return measure(
            server, ctx.loadgen, Load("echo", 64, ctx.duration, ctx.flows), ctx.loadgen_cpus
        ).pps
    finally:
        server.stop()


def _update_readme(md: str, out: Path, png: Path | None) -> None:
    text = README.read_text() if README.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        text += f"\n{START}\n{END}\n"
    body = md
    if png is not None:
        rel = os.path.relpath(png, README.parent)
        body = re.sub(r"!\[bench plot\]\([^)]*\)", f"![bench plot]({rel})", body)
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{START}\n{body}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
