"""Command line. The only place that calls sys.exit and maps errors to codes."""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import pwd
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
        if s.switch:
            p.add_argument(s.flag, dest=s.key, action=argparse.BooleanOptionalAction,
                           help=s.help)
            continue
        # Values stay strings here: config.build validates every source alike.
        p.add_argument(s.flag, dest=s.key, metavar=s.metavar or None,
                       action="append" if s.repeat else "store", help=s.help)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="shardudp", description="Run Twisted DatagramProtocols on every core.")
    p.add_argument("--version", action="version", version=f"shardudp {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the server")
    run.add_argument("app_arg", nargs="?", metavar="APP",
                     help=config.BY_KEY["app"].help + " Same as --app.")
    _add_settings(run)

    check = sub.add_parser("check", help="validate the configuration without binding anything")
    check.add_argument("app_arg", nargs="?", metavar="APP", help="as for run")
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
    health.add_argument("--metrics", required=True, metavar="HOST:PORT",
                        help="the server's metrics address; PORT alone means 127.0.0.1:PORT")
    health.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS")
    return p


def _add_control_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--control", metavar="PATH",
                   help="control socket (default: $SHARDUDP_CONTROL, else the config file's "
                        "control, else the server's default)")
    p.add_argument("--config", metavar="FILE",
                   help="the server's TOML file, to find its control socket")
    p.add_argument("--json", action="store_true", help="print the raw reply as JSON")


def _control_path(args: argparse.Namespace) -> str:
    setting, label = config.lookup("control", file_text=_read_config(args.config),
                                   environ=os.environ, cli={"control": args.control})
    path = control.resolve_path(setting)
    if path is None:
        raise ConfigError(f"{label}: 'none' disables the control socket; nothing to talk to")
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
    silent = st.get("silent_slots") or []
    health = "healthy" if st["healthy"] else "NOT READY"
    if silent:
        health += f" (silent: slot {', '.join(str(s) for s in silent)})"  # type: ignore[attr-defined]
    head = (f"master pid {st['master_pid']}, up {_fmt(st['uptime'], 's')}, "
            f"{st['workers']} workers, {health}")
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    by_listener = st.get("listener_drops") or {}
    if by_listener:
        lines.append("drops by listener: " + ", ".join(
            f"{k}={v}" for k, v in sorted(by_listener.items())))  # type: ignore[attr-defined]
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


def _read_config(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: {getattr(exc, 'strerror', None) or exc}") from None


def load_config(args: argparse.Namespace,
                environ: dict[str, str] | None = None) -> config.ServerConfig:
    """The merged, validated config, checked against this host too."""
    cli_values = {s.key: getattr(args, s.key, None) for s in config.SETTINGS}
    # The positional APP is the usual spelling of --app.
    if args.app_arg is not None:
        if args.app is not None and args.app != args.app_arg:
            raise ConfigError(f"APP {args.app_arg} and --app {args.app} disagree: give one")
        cli_values["app"] = args.app_arg
    cfg = config.build(file_text=_read_config(args.config),
                       environ=os.environ if environ is None else environ,
                       cli=cli_values, cpu_count=usable_cpus())
    check_host(cfg)
    return cfg


def check_host(cfg: config.ServerConfig) -> None:
    """What the pure config cannot know: this host's users, groups and directories."""
    errors = []
    if cfg.user is not None:
        try:
            pwd.getpwnam(cfg.user)
        except KeyError:
            errors.append(f"{cfg.label('user')}: no such user {cfg.user!r}")
    if cfg.group is not None:
        try:
            grp.getgrnam(cfg.group)
        except KeyError:
            errors.append(f"{cfg.label('group')}: no such group {cfg.group!r}")
    if cfg.log_file is not None and (why := _cannot_append(Path(cfg.log_file))):
        errors.append(f"{cfg.label('log_file')}: {why}")
    if errors:
        raise ConfigError(errors)


def _cannot_append(path: Path) -> str | None:
    """Why logging could not append to ``path``, found without creating anything."""
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    if not path.parent.is_dir():
        return f"directory {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"cannot create {path.name} in {path.parent} (not writable)"
    return None


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

    try:
        logs.setup_master(cfg.log_level, cfg.log_file)
    except OSError as exc:
        # check_host saw it fine: the file changed since, or access() was too kind.
        raise ConfigError(f"{cfg.label('log_file')}: cannot open {cfg.log_file}: "
                          f"{exc.strerror or exc}") from None
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
        addr = config.BY_KEY["metrics"].parse(args.metrics)
    except ValueError as exc:
        raise ConfigError(f"--metrics: {exc}") from None
    url = f"http://{addr}/healthz"
    # No proxy, whatever http_proxy says: the probe targets this host's own port.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.timeout) as resp:
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
