"""Command line. The only place that calls sys.exit and maps errors to codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, config, control, datapaths, process
from .errors import ConfigError, ExitCode, StartupError

log = logging.getLogger("shardudp")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"shardudp: error: {message}\n")


def _setting_arg(p: argparse.ArgumentParser, key: str, help: str | None = None) -> None:
    """The flag of a setting, as its one declaration spells it."""
    s = config.BY_KEY[key]
    if s.switch:
        p.add_argument(s.flag, dest=s.key, action=argparse.BooleanOptionalAction,
                       help=help or s.help)
        return
    # Values stay strings here: config.build validates every source alike.
    p.add_argument(s.flag, dest=s.key, metavar=s.metavar or None,
                   action="append" if s.repeat else "store", help=help or s.help)


def _add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file with settings and [[listener]]s")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective merged config as JSON and exit")
    for s in config.SETTINGS:
        _setting_arg(p, s.key)


def _add_server_lookup(p: argparse.ArgumentParser, key: str) -> None:
    """``--KEY`` and ``--config`` of a command that talks to a running server, which
    finds that setting as the server did (see ``_lookup``)."""
    s = config.BY_KEY[key]
    default = "" if s.default is None else f", else {s.default}"
    _setting_arg(p, key, help=f"As for run: {s.help} Default here: ${s.env}, else the "
                              f"--config file's {s.key}{default}.")
    p.add_argument("--config", metavar="FILE",
                   help=f"the server's TOML file, to find its {s.key} setting")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0, 3600]")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: run, check, settings, ctl, status, health."""

    p = _Parser(prog="shardudp", description="Run Twisted DatagramProtocols on every core.")
    p.add_argument("--version", action="version", version=f"shardudp {__version__}")
    # Not required: a bare `shardudp` gets the whole help, not a one-line complaint.
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    run = sub.add_parser("run", help="run the server")
    run.add_argument("app_arg", nargs="?", metavar="APP",
                     help=config.BY_KEY["app"].help + " Same as --app.")
    _add_settings(run)

    check = sub.add_parser("check", help="validate the configuration and import the APPs, "
                                         "binding nothing")
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
    _add_server_lookup(health, "metrics")
    health.add_argument("--http-timeout", type=_seconds, default=3.0, metavar="SECONDS",
                        help="give up on /healthz after this long (default: 3)")
    return p


def _add_control_args(p: argparse.ArgumentParser) -> None:
    _add_server_lookup(p, "control")
    p.add_argument("--json", action="store_true", help="print the raw reply as JSON")


def _lookup(args: argparse.Namespace, key: str) -> tuple[Any, str | None]:
    """A running server's setting, found as it found it: the flag, else SHARDUDP_*, else
    the --config file, else the default; and how its source names it (None: default)."""
    return config.lookup(key, file_text=_read_config(args.config), environ=os.environ,
                         cli={key: getattr(args, key)})


def _origin(args: argparse.Namespace, key: str, value: object, label: str | None) -> str:
    """Where a looked-up value came from, unless the command line gave it: for errors."""
    parts = [str(value)] if value == "auto" else []
    if label is None:
        parts.append(f"the default; give {config.flag_of(key)} or --config FILE to reach "
                     "another server")
    elif label != config.flag_of(key):
        parts.append(f"from {label}" + (f" in {args.config}" if label == key else ""))
    return f" ({', '.join(parts)})" if parts else ""


def _control_path(args: argparse.Namespace) -> tuple[str, str]:
    """The control socket's path, and where that came from (for errors)."""
    setting, label = _lookup(args, "control")
    path = control.resolve_path(setting)
    if path is None:
        raise ConfigError(f"{label}: 'none' disables the control socket; nothing to talk to")
    return path, _origin(args, "control", setting, label)


def _plural(n: object, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}{unit}"
    return f"{v}{unit}"


def _health(st: dict[str, Any]) -> str:
    if st.get("stopping"):
        return "stopping"
    if st["healthy"]:
        return "healthy"
    silent = set(st.get("silent_slots") or [])
    problems = []
    for sl in st["slots"]:
        if sl["slot"] in silent:
            problems.append(f"slot {sl['slot']} silent for {_fmt(sl['heartbeat_age'], 's')}")
        elif sl["state"] != "ready":
            problems.append(f"slot {sl['slot']} {sl['state']}")
        for name, why in sorted((sl.get("not_serving") or {}).items()):
            # What the state or the silence above says already is not repeated.
            if why in ("booting", "no worker", "stopping") or (why == "not responding"
                                                               and sl["slot"] in silent):
                continue
            steered = " (steered)" if name in (sl.get("steered") or []) else ""
            problems.append(f"slot {sl['slot']} not serving {name}: {why}{steered}")
    return "UNHEALTHY" + (f" ({', '.join(problems)})" if problems else "")


def format_status(st: dict[str, Any]) -> str:
    """The table ``shardudp status`` prints from the control socket's status reply."""

    rows = [("SLOT", "PID", "STATE", "AGE", "RECEIVED", "SENT", "RATE/s", "DROPS", "HEARTBEAT")]
    for sl in st["slots"]:
        rows.append((str(sl["slot"]), _fmt(sl["pid"]), sl["state"] + (" (retiring)"
                     if sl["retiring"] else ""), _fmt(sl["age"], "s"), _fmt(sl["rx"]),
                     _fmt(sl["tx"]), _fmt(sl["rx_rate"]), _fmt(sl["drops"]),
                     _fmt(sl["heartbeat_age"], "s ago")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    head = (f"master pid {st['master_pid']}, up {_fmt(st['uptime'], 's')}, "
            f"{_plural(st['workers'], 'worker')}, {_health(st)}")
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    by_listener = st.get("listener_drops") or {}
    if by_listener:
        lines.append("drops by listener: " + ", ".join(
            f"{k}={v}" for k, v in sorted(by_listener.items())))
    if st.get("counting") is False:
        lines.append("traffic is not counted (metrics_interval is 0)")
    return head + "\n" + "\n".join(lines)


def cmd_ctl(args: argparse.Namespace, cmd: str) -> int:
    """Send ``cmd`` to the running server's control socket and print its answer."""

    request: dict[str, object] = {"cmd": cmd}
    if cmd == "scale":
        if args.n is None:
            raise ConfigError("ctl scale: give the number of workers, e.g. `ctl scale 3`")
        try:
            request["n"] = config.BY_KEY["workers"].parse(args.n)
        except ValueError as exc:
            raise ConfigError(f"ctl scale: {exc}") from None
    elif getattr(args, "n", None) is not None:
        raise ConfigError(f"ctl {cmd}: takes no argument")
    path, origin = _control_path(args)
    try:
        result = control.call(path, request)
    except control.ControlError as exc:
        print(f"shardudp: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except control.NotListening as exc:
        print(f"shardudp: error: {exc.strerror}{origin}", file=sys.stderr)
        return ExitCode.ERROR
    except OSError as exc:
        print(f"shardudp: error: {path}{origin}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.ERROR
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif cmd == "status":
        print(format_status(result))
    elif cmd == "scale":
        print(f"scaling to {_plural(request['n'], 'worker')}")
    else:
        print(result if isinstance(result, str) else json.dumps(result))
    return ExitCode.OK


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), what ``workers = auto`` means."""

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
    labels = {}
    # The positional APP is the usual spelling of --app.
    if args.app_arg is not None:
        if args.app is not None and args.app != args.app_arg:
            raise ConfigError(f"APP {args.app_arg} and --app {args.app} disagree: give one")
        cli_values["app"] = args.app_arg
        labels["app"] = "APP"
    cfg = config.build(file_text=_read_config(args.config),
                       environ=os.environ if environ is None else environ,
                       cli=cli_values, cli_labels=labels, cpu_count=usable_cpus())
    check_host(cfg)
    return cfg


def check_host(cfg: config.ServerConfig) -> None:
    """What the pure config cannot know: this host's users, groups, directories, and who we
    are."""
    errors = process.user_problems(cfg.user, cfg.group, cfg.label)[1]
    if cfg.log_file is not None and (why := _cannot_append(Path(cfg.log_file))):
        errors.append(f"{cfg.label('log_file')}: {why}")
    path = control.resolve_path(cfg.control)
    if path is not None and (why := control.path_problem(path)):
        errors.append(f"{cfg.label('control')}: {why}")
    try:
        datapaths.resolve(cfg.datapath)
    except RuntimeError as exc:
        errors.append(f"{cfg.label('datapath')}: {exc}")
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


def _apps_import_from_cwd() -> None:
    """Like gunicorn: APP modules in the current directory import without PYTHONPATH.

    Workers (and check's child) inherit this before importing the APP.
    """
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def cmd_run(args: argparse.Namespace) -> int:
    """``shardudp run``: build the standard server and run it until it stops."""

    cfg = load_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return ExitCode.OK
    _apps_import_from_cwd()
    from . import logs, server

    try:
        logs.setup_master(cfg.log_level, cfg.log_file)
    except OSError as exc:
        # check_host saw it fine: the file changed since, or access() was too kind.
        raise ConfigError(f"{cfg.label('log_file')}: cannot open {cfg.log_file}: "
                          f"{exc.strerror or exc}") from None
    master = server.build(cfg)
    code = master.run()
    # The log's writer thread may still hold lines: the exit line comes after them.
    logs.flush(logs.EXIT_FLUSH_TIMEOUT)
    if code != ExitCode.OK and master.exit_reason:
        print(f"shardudp: error: {master.exit_reason}", file=sys.stderr)
    return code


def _load_apps_and_exit(apps: Sequence[str], run_as: tuple[int, int] | None,
                        fd: int) -> NoReturn:  # pragma: no cover - runs in check's child
    """Write ``APP<TAB>problem`` (empty if none) for each APP as a worker would load it."""
    code: int = ExitCode.OK
    try:
        # What the APP prints while importing must not mix into --print-config's JSON.
        os.dup2(2, 1)
        # As in a worker: our own code loads with our rights, the APP after dropping them.
        import twisted.internet.protocol  # noqa: F401

        from .apploader import AppError, load_app

        process.drop_privileges(run_as)
        for app in apps:
            problem = ""
            try:
                load_app(app)  # resolves the attribute; builds nothing
            except AppError as exc:  # its text reads after the APP's name
                problem, code = " ".join(f"APP {app!r} {exc}".split()), ExitCode.BOOT
            os.write(fd, f"{app}\t{problem}\n".encode())
    except BaseException as exc:
        code = ExitCode.ERROR
        with contextlib.suppress(OSError):
            os.write(fd, f"\t{type(exc).__name__}: {exc}\n".encode())
    finally:
        for stream in (sys.stdout, sys.stderr):  # what the APP printed, on stderr
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _read_until_eof(fd: int, deadline: float) -> tuple[bytes, bool]:
    """What ``fd`` gives until EOF or ``deadline``; and whether EOF came."""
    out = bytearray()
    for _ in range(1 << 16):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            data = os.read(fd, 65536)
            if not data:
                return bytes(out), True
            out += data
    return bytes(out), False


def check_apps(cfg: config.ServerConfig) -> list[str]:
    """Import each listener's APP and resolve its attribute as a worker will, as the
    worker's user; never build it (a constructor may have side effects). One line per
    problem, as ``run`` reports it.

    In a forked child: this process never imports Twisted, and the APP's import never
    runs with rights the workers will not have. A child that takes longer than
    --timeout would have been killed as a worker too.
    """
    apps = sorted({lst.app for lst in cfg.listeners})
    run_as = process.lookup_user(cfg.user, cfg.group, cfg.label)
    _apps_import_from_cwd()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        _load_apps_and_exit(apps, run_as, write_fd)
    os.close(write_fd)
    try:
        out, finished = _read_until_eof(read_fd, time.monotonic() + cfg.timeout)
    finally:
        os.close(read_fd)
    if not finished:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    problems, done = [], set()
    for line in out.decode(errors="replace").splitlines():
        app, _, problem = line.partition("\t")
        done.add(app)
        if problem:
            problems.append(problem)
    # The child stopped at the first APP it did not report: the later ones were never tried.
    stuck = next((app for app in apps if app not in done), None)
    if stuck is not None and not finished:
        problems.append(f"APP {stuck!r}: still importing after {cfg.timeout:g} s "
                        f"({cfg.label('timeout')}), when a worker would be killed")
    elif stuck is not None:
        problems.append(f"APP {stuck!r}: importing it ended the process "
                        f"(exit status {os.waitstatus_to_exitcode(status)})")
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    """``shardudp check``: validate the configuration and import the APPs, binding nothing."""

    cfg = load_config(args)
    problems = check_apps(cfg)
    for line in problems:
        print(f"shardudp: error: {line}", file=sys.stderr)
    if problems:
        return ExitCode.BOOT
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        apps = sorted({lst.app for lst in cfg.listeners})
        print(f"config ok: {_plural(cfg.workers, 'worker')}, "
              f"{_plural(len(cfg.listeners), 'listener')}, APP {', '.join(apps)} imports")
    return ExitCode.OK


def cmd_health(args: argparse.Namespace) -> int:
    """``shardudp health``: exit 0 iff the server's /healthz answers 200."""

    addr, label = _lookup(args, "metrics")
    if addr is None:
        raise ConfigError("health: no metrics address: give --metrics HOST:PORT, or "
                          "--config FILE of a server that serves metrics")
    if addr.port == 0:
        raise ConfigError(f"{label}: port 0: the server picked a free port and logged it "
                          "(\"metrics on ...\"); give that one with --metrics")
    url = f"http://{addr}/healthz"
    # No proxy, whatever http_proxy says: the probe targets this host's own port.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=args.http_timeout) as resp:
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
    """The ``shardudp`` command; returns the exit code (errors mapped to ``ExitCode``)."""

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help(sys.stderr)
            return ExitCode.USAGE
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
        from . import logs

        logs.flush(logs.EXIT_FLUSH_TIMEOUT)
        print(f"shardudp: error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return ExitCode.ERROR
    return ExitCode.USAGE
