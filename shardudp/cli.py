"""Command line. The only place that calls sys.exit and maps errors to codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from . import __version__, config, control
from .errors import ConfigError, ExitCode, StartupError

log = logging.getLogger("shardudp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"shardudp: error: {message}\n")


def _add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file with settings and [[listener]]s")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective merged config as JSON and exit")
    for s in config.SETTINGS:
        if s.key == "app":
            continue
        # Values stay strings here: config.build validates every source alike.
        p.add_argument(s.flag, dest=s.key, metavar=s.metavar or None,
                       action="append" if s.repeat else "store", help=s.help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardudp", description="Run Twisted DatagramProtocols on every core.")
    p.add_argument("--version", action="version", version=f"shardudp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the server")
    run.add_argument("app", nargs="?", metavar="APP",
                     help=config.BY_KEY["app"].help)
    _add_settings(run)

    check = sub.add_parser("check", help="validate the configuration without binding anything")
    check.add_argument("app", nargs="?", metavar="APP", help=argparse.SUPPRESS)
    _add_settings(check)

    sub.add_parser("settings", help="print every setting as a markdown table")

    ctl = sub.add_parser("ctl", help="send a command to a running server's control socket")
    _add_control_args(ctl)
    ctl.add_argument("cmd", choices=sorted(control.COMMANDS), metavar="COMMAND",
                     help="one of: " + ", ".join(control.COMMANDS))
    ctl.add_argument("n", nargs="?", type=int, help="for scale: the number of workers")

    status = sub.add_parser("status", help="print the running server's slots as a table")
    _add_control_args(status)

    health = sub.add_parser("health", help="exit 0 iff the server's /healthz answers 200")
    health.add_argument("--metrics", required=True, metavar="HOST:PORT")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    return p


def _add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="PATH",
                   help="control socket (default: $SHARDUDP_CONTROL, else the server's default)")
    p.add_argument("--json", action="store_true", help="print the raw reply as JSON")


def _control_path(args: argparse.Namespace) -> str:
    setting = args.control or os.environ.get("SHARDUDP_CONTROL") or "auto"
    path = control.resolve_path(setting)
    if path is None:
        raise ConfigError("--control: 'none' disables the control socket; nothing to talk to")
    return path


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}{unit}"
    return f"{v}{unit}"


def format_status(st: dict[str, object]) -> str:
    rows = [("SLOT", "PID", "STATE", "AGE", "RECEIVED", "SENT", "RATE/s", "DROPS", "HEARTBEAT")]
    for sl in st["slots"]:  # type: ignore[attr-defined]
        rows.append((str(sl["slot"]), _fmt(sl["pid"]), sl["state"] + (" (retiring)"
                     if sl["retiring"] else ""), _fmt(sl["age"], "s"), _fmt(sl["rx"]),
                     _fmt(sl["tx"]), _fmt(sl["rx_rate"]), _fmt(sl["drops"]),
                     _fmt(sl["heartbeat_age"], "s ago")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = (f"master pid {st['master_pid']}, up {_fmt(st['uptime'], 's')}, "
            f"{st['workers']} workers, {'healthy' if st['healthy'] else 'NOT READY'}")
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    return head + "\n" + "\n".join(lines)


def cmd_ctl(args: argparse.Namespace, cmd: str) -> int:
    request: dict[str, object] = {"cmd": cmd}
    if cmd == "scale":
        if args.n is None:
            raise ConfigError("ctl scale: give the number of workers, e.g. `ctl scale 3`")
        request["n"] = args.n
    elif getattr(args, "n", None) is not None:
        raise ConfigError(f"ctl {cmd}: takes no argument")
    path = _control_path(args)
    try:
        result = control.call(path, request)
    except control.ControlError as exc:
        print(f"shardudp: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except OSError as exc:
        print(f"shardudp: error: {path}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.ERROR
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif cmd == "status":
        print(format_status(result))
    else:
        print(result if isinstance(result, str) else json.dumps(result))
    return ExitCode.OK


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_config(args: argparse.Namespace,
                environ: dict[str, str] | None = None) -> config.ServerConfig:
    file_text = None
    if args.config:
        try:
            file_text = Path(args.config).read_text()
        except OSError as exc:
            raise ConfigError(f"--config {args.config}: {exc.strerror or exc}") from None
    cli_values = {s.key: getattr(args, s.key, None) for s in config.SETTINGS}
    return config.build(file_text=file_text, environ=os.environ if environ is None else environ,
                        cli=cli_values, cpu_count=usable_cpus())


def _print_errors(exc: ConfigError) -> None:
    for line in exc.errors:
        print(f"shardudp: error: {line}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return ExitCode.OK
    # Like gunicorn: APP modules in the current directory import without
    # PYTHONPATH. Workers inherit this before importing the APP.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from . import logs
    from .server import Server

    logs.setup_master(cfg.log_level, cfg.log_file)
    server = Server(cfg)
    code = server.run()
    if code != ExitCode.OK and server.exit_reason:
        print(f"shardudp: error: {server.exit_reason}", file=sys.stderr)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        print(f"config ok: {cfg.workers} workers, {len(cfg.listeners)} listeners")
    return ExitCode.OK


def cmd_health(args: argparse.Namespace) -> int:
    try:
        addr = config.parse_address(args.metrics)
    except ValueError as exc:
        raise ConfigError(f"--metrics: {exc}") from None
    host = f"[{addr.host}]" if ":" in addr.host else addr.host
    url = f"http://{host}:{addr.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            ok = resp.status == 200
            body = resp.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        ok, body = False, exc.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        print(f"shardudp: unhealthy: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return ExitCode.ERROR
    print(("healthy: " if ok else "unhealthy: ") + body.strip())
    return ExitCode.OK if ok else ExitCode.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        if args.command == "check":
            return cmd_check(args)
        if args.command == "settings":
            print(config.settings_markdown(), end="")
            return ExitCode.OK
        if args.command == "health":
            return cmd_health(args)
        if args.command == "ctl":
            return cmd_ctl(args, args.cmd)
        if args.command == "status":
            return cmd_ctl(args, "status")
    except ConfigError as exc:
        _print_errors(exc)
        return ExitCode.USAGE
    except StartupError as exc:
        print(f"shardudp: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return ExitCode.ERROR
    return ExitCode.USAGE
