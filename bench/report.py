"""Render a bench result (the JSON written by bench.run) as markdown and a PNG.

python -m bench.report bench/results/latest.json   # re-render from JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def _kpps(v: Any) -> str:
    return f"{v / 1e3:.0f}k" if isinstance(v, int | float) else "-"


def _us(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def _pct(v: Any) -> str:
    return f"{v:.1%}" if isinstance(v, int | float) else "-"


def _cells(row: Result | None) -> list[str]:
    if row is None:
        return ["-", "-", "-", "-"]
    if "error" in row:
        return ["failed", "-", "-", "-"]
    share = row.get("cpu_share")
    return [
        _kpps(row["pps"]),
        _us(row["cpu_us_per_dgram"]),
        _pct(row["loss"]),
        f"{share:.0%}" if isinstance(share, int | float) else "-",
    ]


def matrix_tables(result: Result) -> list[str]:
    rows: list[Result] = result.get("matrix", [])
    if not rows:
        return []
    sizes = sorted({r["size"] for r in rows})
    servers = list(dict.fromkeys(r["server"] for r in rows))
    titles = {r["server"]: r["title"] for r in rows}
    out: list[str] = []
    for mode in ("echo", "sink"):
        by = {(r["server"], r["size"]): r for r in rows if r["mode"] == mode}
        if not by:
            continue
        head = ["server"]
        for size in sizes:
            head += [f"{size} B pps", "µs CPU/dgram", "loss", "server CPU"]
        out.append(f"### {mode}")
        out.append("")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for server in servers:
            cells = [titles[server]]
            for size in sizes:
                cells += _cells(by.get((server, size)))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        "pps: replies/s for echo, datagrams handled/s for sink. Flat-out load, so loss is"
        " what the server could not take; a sink row with ~0% loss is bounded by the load"
        " generator, not the server (a lower bound). server CPU: the server's CPU seconds"
        " per second of load; well under 100% on a row with heavy loss means other work on"
        " the machine took its CPU, so its pps is low and µs CPU/dgram is the figure to use."
    )
    out.append("")
    return out


def _ratio_cell(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def datapath_table(result: Result) -> list[str]:
    rows: list[Result] = result.get("datapath", [])
    out: list[str] = []
    for mode in ("echo", "sink"):
        of_mode = [r for r in rows if r.get("mode", "echo") == mode]
        if not of_mode:
            continue
        out += [
            f"### shardudp --datapath (1 worker, {mode} 64 B), one interleaved run",
            "",
            "| datapath | pps | µs CPU/dgram | loss | server CPU | pps ÷ stock Twisted"
            " | CPU: Twisted ÷ this | pps ÷ C server | CPU: C server ÷ this |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in of_mode:
            cells = [r["datapath"], *_cells(r)]
            for key in ("ratio_vs_twisted", "cpu_ratio_vs_twisted", "ratio_vs_c_echo",
                        "cpu_ratio_vs_c_echo"):
                cells.append(_ratio_cell(r.get(key)))
            out.append("| " + " | ".join(cells) + " |")
        pairs = max((r.get("ratio_pairs_vs_twisted", 0) for r in of_mode), default=0)
        if pairs:
            out += ["", f"Ratios: medians of {pairs} per-repetition pairs (each server against"
                    " the reference run seconds before it), so a slow spell of the machine"
                    " cancels out; pps and CPU columns: medians of the same repetitions."]
        out.append("")
    return out


def metrics_table(result: Result) -> list[str]:
    rows: list[Result] = result.get("metrics", [])
    if not rows:
        return []
    out = [
        "### Metrics on vs off (shardudp, 1 worker, echo 64 B)",
        "",
        "| config | pps | µs CPU/dgram | loss | server CPU |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        out.append("| " + " | ".join([r["config"], *_cells(r)]) + " |")
    on = rows[0]
    if "overhead_cpu" in on:
        out += [
            "",
            f"Cost of metrics: {_pct(on.get('overhead_cpu'))} more CPU per datagram,"
            f" {_pct(on.get('overhead_pps'))} fewer datagrams per second: medians of"
            f" {on.get('overhead_pairs', '?')} back-to-back on/off pairs (pps is the noisier"
            " of the two on a shared machine).",
        ]
    out.append("")
    return out


def scaling_table(result: Result) -> list[str]:
    rows: list[Result] = result.get("scaling", [])
    if not rows:
        return []
    out = [
        "### CPU per datagram against the number of workers (echo 64 B)",
        "",
        "| workers | pps | µs CPU/dgram | loss | server CPU | CPU/dgram ÷ 1 worker |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            "| " + " | ".join([str(r["workers"]), *_cells(r), _ratio_cell(r.get("cpu_vs_1"))])
            + " |"
        )
    out.append("")
    return out


def _find(rows: list[Result], key: str, value: Any) -> Result | None:
    return next((r for r in rows if r.get(key) == value and "error" not in r), None)


def targets_table(result: Result) -> list[str]:
    """Issue 7's bars, each with the number from this run that decides it."""
    checks: list[tuple[str, str, Any, bool | None]] = []

    def add(what: str, bar: str, value: Any, ok: bool | None, fmt: str = "{:.2f}") -> None:
        shown = fmt.format(value) if isinstance(value, int | float) else "-"
        checks.append((what, bar, shown, ok))

    dp = [r for r in result.get("datapath", []) if r.get("mode", "echo") == "echo"]

    def add_ratio(r: Result | None, key: str, what: str, bar: float) -> None:
        v = r.get(key) if r else None
        spread = r.get(f"{key}_range") if r else None
        if not isinstance(v, int | float):
            checks.append((what, f">= {bar}", "-", None))
            return
        shown = f"{v:.2f}"
        if isinstance(spread, list) and len(spread) == 2:
            shown += f" (pairs: {spread[0]:.2f}-{spread[1]:.2f})"
        checks.append((what, f">= {bar}", shown, v >= bar))

    for name, bar_tw, bar_c in (("python", 1.4, None), ("c", 1.8, 0.8)):
        r = _find(dp, "datapath", name)
        for key, label in (("ratio_vs_twisted", "pps"), ("cpu_ratio_vs_twisted", "CPU")):
            add_ratio(r, key, f"{name} datapath ÷ stock Twisted ({label})", bar_tw)
        if bar_c is not None:
            for key, label in (("ratio_vs_c_echo", "pps"), ("cpu_ratio_vs_c_echo", "CPU")):
                add_ratio(r, key, f"{name} datapath ÷ C echo ({label})", bar_c)
    m = result.get("metrics", [])
    if m:
        for key, label in (("overhead_cpu", "CPU/dgram"), ("overhead_pps", "pps")):
            v = m[0].get(key)
            add(f"metrics overhead ({label})", "<= 5%", v,
                v <= 0.05 if isinstance(v, int | float) else None, "{:.1%}")
    k = _find(result.get("kill", []), "fraction", 0.5)
    if k:
        add("lost across kill -9 at 50% load", "0", k.get("lost"), k.get("lost") == 0, "{}")
    sc = [r for r in result.get("scaling", []) if isinstance(r.get("cpu_vs_1"), int | float)]
    if len(sc) > 1:
        worst = max(abs(r["cpu_vs_1"] - 1) for r in sc)
        add(f"CPU/dgram for N = {', '.join(str(r['workers']) for r in sc)}, worst vs N=1",
            "within noise (±10%)", worst, worst <= 0.10, "±{:.0%}")
    if not checks:
        return []
    out = ["### Targets (issue 7), from this run", "", "| what | bar | measured | |",
           "|---|---|---|---|"]
    for what, bar, shown, ok in checks:
        verdict = "-" if ok is None else "met" if ok else "missed"
        out.append(f"| {what} | {bar} | {shown} | {verdict} |")
    out.append("")
    return out


def kill_table(result: Result) -> list[str]:
    rows: list[Result] = result.get("kill", [])
    if not rows:
        return []
    n = rows[0].get("workers")
    out = [
        f"### kill -9 of one worker of {n} (echo 64 B, fixed rate)",
        "",
        "| load | rate | lost, no kill | lost with kill | replacement ready after |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['fraction']:.0%} | {_kpps(r['rate'])} | failed | - | - |")
            continue
        ready = r.get("ready_after_s")
        out.append(
            f"| {r['fraction']:.0%} | {_kpps(r['rate'])} | {r.get('control_lost', '-')}"
            f" | {r['lost']} of {r['sent']} | {f'{ready * 1e3:.0f} ms' if ready else 'never'} |"
        )
    out.append("")
    return out


def evenness_table(result: Result) -> list[str]:
    r: Result | None = result.get("evenness")
    if not r:
        return []
    out = [f"### Evenness: {r['flows']} flows over {r['workers']} workers", ""]
    if "error" in r:
        return [*out, f"failed: {r['error'].splitlines()[0]}", ""]
    ratio = r.get("max_over_min")
    per = ", ".join(f"slot {k}: {v}" for k, v in r["per_worker"].items())
    out.append(
        f"Flows per worker, by the pid each reply names: {per} ({r['answered']} answered);"
        f" max/min {f'{ratio:.2f}' if ratio else 'inf'}."
    )
    from_metrics = r.get("per_worker_metrics")
    if isinstance(from_metrics, dict):
        per_m = ", ".join(f"slot {k}: {v}" for k, v in from_metrics.items())
        out.append(f"Datagrams per slot from `/metrics`: {per_m}.")
    elif from_metrics:
        out.append(f"`/metrics` cross-check: {from_metrics}.")
    out.append("For a uniform random hash, kernel-facts.md measured max/min 1.09-1.24 at N=4.")
    out.append("")
    return out


def markdown(result: Result, plot_name: str | None) -> str:
    meta = result["meta"]
    out = [
        f"Run {meta['date']} on {meta['machine']}; `{meta['command']}`.",
        f"Load generator: {meta['loadgen']} ({meta['flows']} flows) on CPUs"
        f" {meta['loadgen_cpus']}, server on CPUs {meta['server_cpus']}; medians of"
        f" {meta['reps']} runs of {meta['duration']} s. CPU = server utime+stime per datagram"
        " handled (shardudp: summed over its workers).",
        "",
    ]
    for note in meta.get("notes", []):
        out.append(f"- {note}")
    if meta.get("notes"):
        out.append("")
    for part in (targets_table, matrix_tables, datapath_table, metrics_table, scaling_table,
                 kill_table, evenness_table):
        out += part(result)
    if plot_name:
        out += [f"![bench plot]({plot_name})", ""]
    return "\n".join(out)


def plot(result: Result, path: Path) -> str | None:
    """Write the PNG; return None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not importable: plot skipped (pip install 'shardudp[bench]')"
    rows = [r for r in result.get("matrix", []) if "error" not in r]
    if not rows:
        return "no successful matrix rows: plot skipped"
    servers = list(dict.fromkeys(r["server"] for r in rows))
    sizes = sorted({r["size"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), squeeze=False)
    width = 0.8 / len(sizes)
    for col, mode in enumerate(("echo", "sink")):
        by = {(r["server"], r["size"]): r for r in rows if r["mode"] == mode}
        for row_i, (key, label, scale) in enumerate(
            (("pps", "kpps", 1e-3), ("cpu_us_per_dgram", "µs CPU / datagram", 1.0))
        ):
            ax = axes[row_i][col]
            for k, size in enumerate(sizes):
                xs, ys = [], []
                for i, server in enumerate(servers):
                    r = by.get((server, size))
                    if r is not None and isinstance(r.get(key), int | float):
                        xs.append(i + (k - (len(sizes) - 1) / 2) * width)
                        ys.append(r[key] * scale)
                ax.bar(xs, ys, width, label=f"{size} B")
            ax.set_xticks(range(len(servers)), servers, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{mode}: {label}")
            ax.grid(axis="y", alpha=0.3)
            ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"shardudp bench, {meta['machine']} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.report RESULT.json", file=sys.stderr)
        return 2
    src = Path(args[0])
    try:
        result = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"report: cannot read {src}: {e}", file=sys.stderr)
        return 2
    png = src.with_suffix(".png")
    skipped = plot(result, png)
    if skipped:
        print(skipped, file=sys.stderr)
    src.with_suffix(".md").write_text(markdown(result, None if skipped else png.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
