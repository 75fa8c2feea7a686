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
from typing import Any, Final, NoReturn

from . import __version__, config, control, datapaths, process, sockets
from .errors import ConfigError, ExitCode, StartupError
from .supervision import NotServing

log = logging.getLogger("shardudp")

#: Memory one more worker takes: an echo worker's private memory (USS) measured at
#: 8.0 MiB idle and 8.4 MiB after serving (CPython 3.11, Linux x86-64, datapath c;
#: its RSS of 33 MiB is mostly pages shared with the master), rounded up.
WORKER_MEMORY: Final = 10 * 1024 * 1024
#: More workers than this many per usable CPU only contend for the CPUs: warn.
OVERSUBSCRIBED: Final = 4


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ExitCode.USAGE, f"shardudp: error: {message}\n")


def _default_help(s: config.Setting) -> str:
    """`` (default: ...)`` for a setting's help, with what ``auto`` means on this host."""
    if s.default is None:
        return ""
    value = str(s.default).lower() if isinstance(s.default, bool) else str(s.default)
    here = {"workers": lambda: f"{usable_cpus()} here", "control": control.default_path}
    if s.key in here:
        value += f", {here[s.key]()}"
    return f" (default: {value})"


def _setting_arg(p: argparse.ArgumentParser, key: str, help: str | None = None,
                 metavar: str | None = None) -> None:
    """The flag of a setting, as its one declaration spells it (its help names its
    default unless ``help`` replaces it)."""
    s = config.BY_KEY[key]
    # argparse %-formats help texts.
    text = (help or s.help + _default_help(s)).replace("%", "%%")
    if s.switch:
        p.add_argument(s.flag, dest=s.key, action=argparse.BooleanOptionalAction, help=text)
        return
    # Values stay strings here: config.build validates every source alike.
    p.add_argument(s.flag, dest=s.key, metavar=metavar or s.metavar or None,
                   action="append" if s.repeat else "store", help=text)


def _add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML file with settings and [[listener]]s")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective merged config as JSON and exit")
    for s in config.SETTINGS:
        _setting_arg(p, s.key)


def _add_server_lookup(p: argparse.ArgumentParser, key: str, what: str,
                       metavar: str | None = None) -> None:
    """``--KEY`` and ``--config`` of a command that talks to a running server, which
    finds that setting as the server did (see ``_lookup``); ``what`` says what it is."""
    s = config.BY_KEY[key]
    default = "" if s.default is None else f", else {s.default}"
    _setting_arg(p, key, metavar=metavar,
                 help=f"{what} (default: ${s.env}, else the --config file's {s.key}{default})")
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

    check = sub.add_parser("check", help="refuse what run would refuse, binding nothing: "
                                         "validate the configuration, load the APPs (building "
                                         "factories, never classes)")
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
    _add_server_lookup(health, "metrics", "The server's metrics address, HOST:PORT or PORT "
                                          "(meaning 127.0.0.1:PORT)")
    health.add_argument("--http-timeout", type=_seconds, default=3.0, metavar="SECONDS",
                        help="give up on /healthz after this long (default: 3)")
    return p


def _add_control_args(p: argparse.ArgumentParser) -> None:
    # No `none` here: a server without a control socket has nothing to talk to.
    _add_server_lookup(p, "control", "The server's control socket: PATH, or auto, which is "
                                     f"{control.default_path()} here",
                       metavar="PATH|auto")
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


#: Why a slot is not serving that its state line says already.
_SAID_BY_STATE: Final = frozenset(
    w.value for w in (NotServing.BOOTING, NotServing.DOWN, NotServing.STOPPING))


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
            if why in _SAID_BY_STATE or (why == NotServing.UNRESPONSIVE.value
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
    cfg = build_config(args, environ)
    check_host(cfg)
    return cfg


def build_config(args: argparse.Namespace,
                 environ: dict[str, str] | None = None) -> config.ServerConfig:
    """The merged, validated config; ConfigError (with what was valid) if it is not."""
    cli_values = {s.key: getattr(args, s.key, None) for s in config.SETTINGS}
    labels = {}
    # The positional APP is the usual spelling of --app.
    if args.app_arg is not None:
        if args.app is not None and args.app != args.app_arg:
            raise ConfigError(f"APP {args.app_arg} and --app {args.app} disagree: give one")
        cli_values["app"] = args.app_arg
        labels["app"] = "APP"
    return config.build(file_text=_read_config(args.config),
                        environ=os.environ if environ is None else environ,
                        cli=cli_values, cli_labels=labels, cpu_count=usable_cpus())


def check_host(cfg: config.ServerConfig) -> None:
    """ConfigError for what ``host_problems`` finds."""
    errors = host_problems(cfg)
    if errors:
        raise ConfigError(errors)


def host_problems(cfg: config.ServerConfig) -> list[str]:
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
    return errors


def workers_warning(cfg: config.ServerConfig) -> str | None:
    """A warning for many more workers than usable CPUs, with the memory they take."""
    cpus = usable_cpus()
    if cfg.workers <= OVERSUBSCRIBED * cpus:
        return None
    total = cfg.workers * WORKER_MEMORY
    size = f"{total / (1 << 30):.1f} GiB" if total >= 1 << 30 else f"{total >> 20} MiB"
    return (f"{cfg.label('workers')}: {cfg.workers} workers are {cfg.workers / cpus:.0f} "
            f"times the {_plural(cpus, 'usable CPU')}: they only contend for the CPUs, and "
            f"take about {size} of memory (about {WORKER_MEMORY >> 20} MiB each); "
            "`--workers auto` starts one per CPU")


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
    """``shardudp run``: build the standard server and run it until it stops."""

    cfg = load_config(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return ExitCode.OK
    # The current directory is not put on sys.path here: the master (root,
    # perhaps) imports its own code; only workers, once they dropped
    # privileges, import from there (apploader.import_from_cwd).
    from . import logs, server

    try:
        logs.setup_master(cfg.log_level, cfg.log_file)
    except OSError as exc:
        # check_host saw it fine: the file changed since, or access() was too kind.
        raise ConfigError(f"{cfg.label('log_file')}: cannot open {cfg.log_file}: "
                          f"{exc.strerror or exc}") from None
    if (warning := workers_warning(cfg)) is not None:
        log.warning("%s", warning)
    master = server.build(cfg)
    code = master.run()
    # The last line of the master's log, as "starting" was its first.
    logging.getLogger("shardudp.master").log(
        logging.INFO if code == ExitCode.OK else logging.WARNING,
        "shardudp master pid=%d stopped, exit code %d", os.getpid(), code)
    # The log's writer thread may still hold lines: the exit line comes after them.
    logs.flush(logs.EXIT_FLUSH_TIMEOUT)
    if code != ExitCode.OK and master.exit_reason:
        print(f"shardudp: error: {master.exit_reason}", file=sys.stderr)
    return code


def _load_apps_and_exit(listeners: Sequence[config.Listener], run_as: tuple[int, int] | None,
                        fd: int) -> NoReturn:  # pragma: no cover - runs in check's child
    """Load each listener's APP as a worker would, saying how far it got: ``I import``,
    ``I build`` (a factory: only calling it tells what it returns; a class is not
    built), then ``I ok`` or ``I fail<TAB>the line run would print``."""
    code: int = ExitCode.OK
    try:
        # What the APP prints while importing must not mix into --print-config's JSON.
        os.dup2(2, 1)
        # As in a worker: our own code loads with our rights, the APP after dropping them.
        import twisted.internet.protocol  # noqa: F401

        from .apploader import AppError, boot_reason, booting, import_from_cwd, load_app

        process.drop_privileges(run_as)
        import_from_cwd()
        for i, lst in enumerate(listeners):
            os.write(fd, f"{i} import\n".encode())
            try:
                with booting(lst):
                    factory = load_app(lst.app)
                    os.write(fd, f"{i} from\t{factory.source}\n".encode(
                        errors="backslashreplace"))
                    if not factory.builds_class:
                        os.write(fd, f"{i} build\n".encode())
                        factory()
            except AppError as exc:
                code = ExitCode.BOOT
                os.write(fd, f"{i} fail\t{boot_reason(exc, run_as)}\n".encode())
            else:
                os.write(fd, f"{i} ok\n".encode())
    except BaseException as exc:
        code = ExitCode.ERROR
        with contextlib.suppress(OSError):
            os.write(fd, f"- fail\t{type(exc).__name__}: {exc}\n".encode(
                errors="backslashreplace"))
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


def check_apps(cfg: config.ServerConfig, run_as: tuple[int, int] | None,
               sources: dict[str, str] | None = None) -> list[str]:
    """Load each listener's APP as a worker will, as the worker's user (``run_as``): one
    line per problem, the very line ``run`` would print. A class is never instantiated
    (a constructor may have side effects, and its type is known); a factory is called,
    as only that tells whether it returns a protocol.

    In a forked child: this process never imports Twisted, and the APP never runs
    with rights the workers will not have. A child that takes longer than --timeout
    would have been killed as a worker too.
    """
    listeners = cfg.listeners
    if not listeners:
        return []
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        _load_apps_and_exit(listeners, run_as, write_fd)
    os.close(write_fd)
    try:
        out, finished = _read_until_eof(read_fd, time.monotonic() + cfg.timeout)
    finally:
        os.close(read_fd)
    if not finished:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    problems: list[str] = []
    reached: dict[int, str] = {}
    for line in out.decode(errors="replace").splitlines():
        head, _, problem = line.partition("\t")
        index, _, step = head.partition(" ")
        if step == "from" and index.isdigit() and sources is not None:
            sources[listeners[int(index)].app] = problem
            continue
        if index.isdigit():
            reached[int(index)] = step
        if step == "fail":
            problems.append(problem)
    # The child stopped in the first listener it did not finish: the later ones were
    # never tried.
    stuck = next((i for i in range(len(listeners)) if reached.get(i) not in ("ok", "fail")),
                 None)
    if stuck is not None:
        lst = listeners[stuck]
        doing = "building" if reached.get(stuck) == "build" else "importing"
        if not finished:
            problems.append(f"APP {lst.app!r} (listener {lst.name}): still {doing} it after "
                            f"{cfg.timeout:g} s ({cfg.label('timeout')}), when a worker would "
                            "be killed")
        else:
            problems.append(f"APP {lst.app!r} (listener {lst.name}): {doing} it ended the "
                            f"process (exit status {os.waitstatus_to_exitcode(status)})")
    return problems


def cmd_check(args: argparse.Namespace) -> int:
    """``shardudp check``: validate the configuration and load the APPs, binding nothing.

    Every problem ``run`` would stop at is reported, each as the line ``run`` would
    print, in ``run``'s order; the exit code is ``run``'s for the first one.
    """
    lines: list[str] = []
    code = ExitCode.OK

    def found(problems: Sequence[str], as_code: ExitCode) -> None:
        nonlocal code
        lines.extend(problems)
        if problems and code == ExitCode.OK:
            code = as_code

    cfg: config.ServerConfig | None = None
    #: APP -> the file it imports from, as a worker imports it.
    sources: dict[str, str] = {}
    try:
        cfg = build_config(args)
    except ConfigError as exc:
        found(exc.errors, ExitCode.USAGE)
        if isinstance(exc.partial, config.ServerConfig):
            cfg = exc.partial
    if cfg is not None:
        found(host_problems(cfg), ExitCode.USAGE)
        if (warning := workers_warning(cfg)) is not None:
            print(f"shardudp: warning: {warning}", file=sys.stderr)
        if cfg.user is None and cfg.group is None:  # else the master must be root anyway
            found([line for lst in cfg.listeners
                   if (line := sockets.privilege_refusal(lst)) is not None], ExitCode.ERROR)
        try:
            run_as = process.lookup_user(cfg.user, cfg.group, cfg.label)
        except ConfigError:
            pass  # said above; loading the APPs as anyone else could mislead
        else:
            found(check_apps(cfg, run_as, sources), ExitCode.BOOT)
    for line in lines:
        print(f"shardudp: error: {line}", file=sys.stderr)
    if code != ExitCode.OK or cfg is None:
        return code
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
    else:
        apps = sorted({lst.app for lst in cfg.listeners})
        who = f"as {cfg.user}" if cfg.user else f"as uid {os.geteuid()}"
        how = "; ".join(f"{app} from {sources.get(app, '?')}" for app in apps)
        print(f"config ok: {_plural(cfg.workers, 'worker')}, "
              f"{_plural(len(cfg.listeners), 'listener')}, APP {', '.join(apps)} imports "
              f"({who}, after dropping privileges: {how})")
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
