"""The command line end to end: `python -m shardudp ...` as a real process.

Configuration mistakes must end in exit 2 and one line per problem naming the
key as the user wrote it (flag, SHARDUDP_* variable or TOML key), never a
traceback; what is accepted must then really run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from harness import ROOT, Flows, Server, child_env, free_port, run_cli, serving, started


def shardudp(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None,
             prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """Run the CLI; ``env`` adds variables, or removes those set to None."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHARDUDP_")}
    full.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
                SHARDUDP_CONTROL="none")
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return subprocess.run([*prefix, sys.executable, "-m", "shardudp", *args],
                          capture_output=True, text=True, timeout=30, env=full,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def errors(res: subprocess.CompletedProcess[str]) -> list[str]:
    """The error lines of a failed configuration: exit 2, nothing else on stderr."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert lines and all(ln.startswith("shardudp: error: ") for ln in lines), lines
    return [ln.removeprefix("shardudp: error: ") for ln in lines]


def effective(*args: str, env: dict[str, str | None] | None = None) -> dict[str, object]:
    res = shardudp("check", "--print-config", *args, env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert isinstance(out, dict)
    return out


ECHO = ["echo", "--bind", "127.0.0.1:9"]


@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # setsockopt takes a C int: 2**31 must not get as far as a socket.
        (["--rcvbuf", "2147483648"], "--rcvbuf: 2147483648 is out of range [0, 2147483647]"),
        (["--sndbuf", "2147483648"], "--sndbuf: 2147483648 is out of range [0, 2147483647]"),
        (["--log-file", "/nonexistent-dir/shardudp.log"],
         "--log-file: directory /nonexistent-dir does not exist"),
        (["--log-file", "/"], "--log-file: / is a directory"),
        (["--metrics-interval", "-1"], "--metrics-interval: -1 is out of range [0, 3600]"),
        (["--user", "no-such-user-here"], "--user: no such user 'no-such-user-here'"),
        (["--group", "no-such-group-here"], "--group: no such group 'no-such-group-here'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_flag(command: str, args: list[str],
                                                 expected: str) -> None:
    assert errors(shardudp(command, *ECHO, *args)) == [expected]


def test_a_log_file_that_cannot_be_opened_is_a_config_error_at_run() -> None:
    # access() lets root write anything, so only open() finds out: still no traceback.
    res = shardudp("run", *ECHO, "--log-file", "/proc/version")
    (line,) = errors(res)
    assert line.startswith("--log-file: ") and "/proc/version" in line


def test_check_creates_nothing_for_a_log_file(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "shardudp.log"
    assert errors(shardudp("check", *ECHO, "--log-file", str(log))) == [
        f"--log-file: directory {log.parent} does not exist"]
    log.parent.mkdir()
    assert shardudp("check", *ECHO, "--log-file", str(log)).returncode == 0
    assert not log.exists()


def test_each_source_is_named_as_the_user_wrote_it(tmp_path: Path) -> None:
    env = {"SHARDUDP_METRICS_INTERVAL": "-1"}
    assert errors(shardudp("check", *ECHO, env=env)) == [
        "SHARDUDP_METRICS_INTERVAL: -1 is out of range [0, 3600]"]
    cfg = tmp_path / "c.toml"
    cfg.write_text('metrics_interval = -1\n[[listener]]\napp = "echo"\nbind = "127.0.0.1:9"\n'
                   "rcvbuf = 2147483648\n")
    assert errors(shardudp("check", "--config", str(cfg))) == [
        "metrics_interval: -1 is out of range [0, 3600]",
        "listener[0].rcvbuf: 2147483648 is out of range [0, 2147483647]"]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('multicast = "10.0.0.1:5000"',
         "listener[0].multicast: 10.0.0.1 is not a multicast group address"),
        ("bind = 5000", "listener[0].bind: expected HOST:PORT or [IPV6]:PORT, got 5000"),
        ('bind = "127.0.0.1:-1"',
         "listener[0].bind: expected HOST:PORT or [IPV6]:PORT, got '127.0.0.1:-1'"),
        ('bnd = "127.0.0.1:1"', "listener[0].bnd: unknown setting (did you mean "
                                "listener[0].bind?)"),
    ],
)
def test_one_error_per_problem(tmp_path: Path, table: str, expected: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[[listener]]\napp = "echo"\n{table}\n')
    assert errors(shardudp("check", "--config", str(cfg))) == [expected]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--bind", "228.0.0.5:5000"], ["--bind: 228.0.0.5 is a multicast group",
                                        "use --multicast"]),
        (["--bind", "255.255.255.255:5000"], ["--bind: 255.255.255.255 is the broadcast"]),
        (["--multicast", "228.0.0.5:5000", "--multicast-interface", "228.0.0.6"],
         ["--multicast-interface: 228.0.0.6 is not an interface address"]),
        (["--bind", "[::ffff:127.0.0.1]:5000"],
         ["--bind: ::ffff:127.0.0.1 is an IPv4-mapped IPv6 address: write it as 127.0.0.1"]),
        (["--bind", "0.0.0.0:5000", "--bind", "127.0.0.1:5000"],
         ["'udp-0.0.0.0:5000' (0.0.0.0:5000)", "'udp-127.0.0.1:5000' (127.0.0.1:5000)",
          "overlap"]),
        (["--bind", "[::1]:5000", "--bind", "[::]:5000"],
         ["([::1]:5000)", "([::]:5000)", "overlap"]),
        (["--multicast", "228.0.0.5:5000", "--multicast-ttl", "256"],
         ["--multicast-ttl: 256 is out of range [0, 255]"]),
        # A multicast setting with no multicast listener at all, as in a unicast table.
        (["--bind", "127.0.0.1:5000", "--multicast-ttl", "3"],
         ["--multicast-ttl: only valid with a multicast listener"]),
        (["--bind", "127.0.0.1:5000", "--multicast-interface", "127.0.0.1"],
         ["--multicast-interface: only valid with a multicast listener"]),
        # sun_path holds 107 bytes and a NUL.
        (["--bind", "127.0.0.1:5000", "--control", "/tmp/" + "c" * 103],
         ["--control: /tmp/ccc", "is 108 bytes long; a unix socket path takes at most 107"]),
        # A mistyped directory is refused, not created (tested at run below).
        (["--bind", "127.0.0.1:5000", "--control", "/nonexistent-shardudp/dir/c.sock"],
         ["--control: directory /nonexistent-shardudp does not exist"]),
    ],
)
def test_check_refuses_what_can_never_work(args: list[str], needles: list[str]) -> None:
    (line,) = errors(shardudp("check", "echo", *args))
    for needle in needles:
        assert needle in line, line


def test_families_and_ports_that_do_not_overlap_are_fine() -> None:
    eff = effective("apps:Upper", "--bind", "0.0.0.0:5000", "--bind", "[::]:5000",
                    "--bind", "127.0.0.1:5001", "--bind", "127.0.0.1:0", "--bind", "0.0.0.0:0")
    assert len(eff["listener"]) == 5  # type: ignore[arg-type]


def test_listeners_on_the_command_line_replace_the_files(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[listener]]\napp = "echo"\nbind = "127.0.0.1:6000"\n')
    (line,) = errors(shardudp("check", "--config", str(cfg), "--bind", "127.0.0.1:7000"))
    assert line.startswith("--bind 127.0.0.1:7000: no APP") and "--app" in line, line
    (line,) = errors(shardudp("check", "--config", str(cfg),
                              env={"SHARDUDP_BIND": "127.0.0.1:7000"}))
    assert line.startswith("SHARDUDP_BIND 127.0.0.1:7000: no APP"), line
    eff = effective("apps:WhoAmI", "--config", str(cfg), "--bind", "127.0.0.1:7000")
    assert [(x["app"], x["bind"]) for x in eff["listener"]] == [  # type: ignore[attr-defined]
        ("apps:WhoAmI", "127.0.0.1:7000")]
    # Without an APP on the command line, the file's top-level app is the default.
    cfg.write_text('app = "apps:Upper"\n[[listener]]\nbind = "127.0.0.1:6000"\n')
    eff = effective("--config", str(cfg), "--bind", "127.0.0.1:7000")
    assert [(x["app"], x["bind"]) for x in eff["listener"]] == [  # type: ignore[attr-defined]
        ("apps:Upper", "127.0.0.1:7000")]


def test_a_file_declares_listeners_one_way(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('app = "echo"\nbind = "127.0.0.1:5000"\n[[listener]]\nbind = "127.0.0.1:6000"\n')
    (line,) = errors(shardudp("check", "--config", str(cfg)))
    assert line.startswith("bind: ") and "[[listener]]" in line, line


def test_app_is_a_flag_too() -> None:
    eff = effective("--app", "apps:Upper", "--bind", "127.0.0.1:5000")
    assert eff["listener"][0]["app"] == "apps:Upper"  # type: ignore[index]
    assert effective("apps:Upper", "--app", "apps:Upper", "--bind", "127.0.0.1:5000") == eff
    (line,) = errors(shardudp("run", "a:B", "--app", "c:D", "--bind", "127.0.0.1:5000"))
    assert "a:B" in line and "--app c:D" in line, line


@pytest.mark.parametrize(
    ("value", "expected"),
    [("9100", "127.0.0.1:9100"), (":9100", "127.0.0.1:9100"),
     ("0.0.0.0:9100", "0.0.0.0:9100"), ("[::1]:9100", "[::1]:9100")],
)
def test_metrics_port_alone_means_loopback(value: str, expected: str) -> None:
    assert effective(*ECHO, "--metrics", value)["metrics"] == expected
    assert effective(*ECHO, env={"SHARDUDP_METRICS": value})["metrics"] == expected


def test_multicast_switches_on_the_command_line() -> None:
    eff = effective("apps:Upper", "--multicast", "228.0.0.5:5000", "--no-multicast-loopback",
                    "--multicast-ttl", "8")
    (lst,) = eff["listener"]  # type: ignore[misc]
    assert (lst["multicast_loopback"], lst["multicast_ttl"]) == (False, 8)
    eff = effective("apps:Upper", "--multicast", "228.0.0.5:5000", "--multicast-loopback",
                    env={"SHARDUDP_MULTICAST_LOOPBACK": "false"})
    assert eff["listener"][0]["multicast_loopback"] is True  # type: ignore[index]


def test_ctl_finds_the_control_socket_through_the_config_file(tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'control = "{sock}"\n')
    # No server: the error names the path once, and where it came from.
    res = shardudp("status", "--config", str(cfg), env={"SHARDUDP_CONTROL": None})
    assert res.returncode == 1 and res.stderr == (
        f"shardudp: error: no shardudp is listening on {sock} (from control in {cfg})\n")
    # --control, then SHARDUDP_CONTROL, win over the file, as for `run`.
    other = tmp_path / "x.sock"
    res = shardudp("ctl", "--config", str(cfg), "--control", str(other), "status")
    assert res.returncode == 1 and res.stderr == (
        f"shardudp: error: no shardudp is listening on {other}\n")
    res = shardudp("status", "--config", str(cfg), env={"SHARDUDP_CONTROL": str(other)})
    assert res.returncode == 1 and res.stderr == (
        f"shardudp: error: no shardudp is listening on {other} (from SHARDUDP_CONTROL)\n")
    res = shardudp("status", env={"SHARDUDP_CONTROL": None,
                                  "RUNTIME_DIRECTORY": str(tmp_path / "run")})
    assert res.returncode == 1 and res.stderr == (
        f"shardudp: error: no shardudp is listening on {tmp_path}/run/control.sock (auto, the "
        "default; give --control or --config FILE to reach another server)\n")
    res = shardudp("status", "--config", str(cfg), env={"SHARDUDP_CONTROL": "none"})
    assert errors(res) == [
        "SHARDUDP_CONTROL: 'none' disables the control socket; nothing to talk to"]
    cfg.write_text("control = 3\n")
    assert errors(shardudp("status", "--config", str(cfg))) == [
        "control: expected a non-empty string, got 3"]


def test_a_server_from_file_and_flags_serves_and_answers_ctl_and_health(tmp_path: Path) -> None:
    """--app, CLI listeners over the file's, the largest buffers setsockopt takes,
    `--metrics 0`, `status --config`, and a health probe that ignores http_proxy."""
    control = tmp_path / "control.sock"
    cfg = tmp_path / "shardudp.toml"
    cfg.write_text(f'control = "{control}"\nworkers = 1\n'
                   '[[listener]]\napp = "apps:Upper"\nbind = "127.0.0.1:9"\n')

    def launch() -> tuple[Server, int]:
        port = free_port()
        return Server(["run", "--config", str(cfg), "--app", "echo",
                       "--bind", f"127.0.0.1:{port}", "--rcvbuf", "2147483647",
                       "--sndbuf", "2147483647", "--metrics", "0"],
                      env={"SHARDUDP_CONTROL": str(control)}), port

    with started(launch, ready="all 1 workers ready") as (srv, port):
        srv.wait_line(r"asked SO_RCVBUF 2147483647, the kernel gave \d+")
        with Flows(1, port) as flows:
            flows.send(0, b"echo, not upper")
            assert [d for _, d in flows.collect(1, 5)] == [b"echo, not upper"]

        res = shardudp("status", "--config", str(cfg), "--json",
                       env={"SHARDUDP_CONTROL": None})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["workers"] == 1

        (m,) = srv.wait_line(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
        with socket.socket() as proxy:
            # A proxy that would swallow the probe: it must never be asked.
            proxy.bind(("127.0.0.1", 0))
            proxy.listen(1)
            proxy.setblocking(False)
            proxy_url = f"http://127.0.0.1:{proxy.getsockname()[1]}"
            res = shardudp("health", "--metrics", m.group(1), "--http-timeout", "5",
                           env={"http_proxy": proxy_url, "HTTP_PROXY": proxy_url,
                                "no_proxy": "", "NO_PROXY": ""})
            assert res.returncode == 0, res.stderr
            assert res.stdout.startswith("healthy"), res.stdout
            with pytest.raises(BlockingIOError):
                proxy.accept()
        # The address is found as the server's own setting is: here from the env.
        res = shardudp("health", env={"SHARDUDP_METRICS": m.group(1)})
        assert res.returncode == 0 and res.stdout.startswith("healthy"), res.stderr
        # The server's --metrics 0 is no address to probe: say so, do not guess.
        assert errors(shardudp("health", env={"SHARDUDP_METRICS": "0"})) == [
            'SHARDUDP_METRICS: port 0: the server picked a free port and logged it '
            '("metrics on ..."); give that one with --metrics']


def test_bare_shardudp_prints_the_usage_and_the_commands() -> None:
    res = shardudp()
    assert res.returncode == 2 and res.stderr.startswith("usage: shardudp"), res.stderr
    for command in ("run", "check", "settings", "ctl", "status", "health"):
        assert f"\n    {command} " in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["check", "run"])
def test_a_bad_positional_app_is_one_error_named_app(command: str) -> None:
    assert errors(shardudp(command, "workers.echo", "--bind", "127.0.0.1:9")) == [
        "APP: expected MODULE:ATTR (e.g. myapp:Echo) or a ready-made app (echo, sink, helloer, "
        "multicast_ping, multicast_ping_client), got 'workers.echo'"]


def test_ctl_scale_validates_like_the_workers_setting() -> None:
    # Refused before any server is asked (there is none): a usage error, as for the rest.
    assert errors(shardudp("ctl", "scale", "0")) == ["ctl scale: 0 is out of range [1, 1024]"]
    assert errors(shardudp("ctl", "scale")) == [
        "ctl scale: give the number of workers, e.g. `ctl scale 3`"]
    assert errors(shardudp("ctl", "reload", "2")) == ["ctl reload: takes no argument"]


APP_MODULE = """
import os
import sys
from twisted.internet.protocol import DatagramProtocol

print("importing", __name__)  # must not end up in --print-config's JSON

class Proto(DatagramProtocol):
    def __init__(self):
        # A side effect check must never cause: it does not build a class.
        open(os.environ["BUILT_MARKER"], "w").close()

def factory():
    return Proto.__new__(Proto)

def broken():
    raise RuntimeError("the database is down")

NOT_CALLABLE = 3
"""


def _line_of(path: Path, text: str) -> str:
    """``path:line`` of the line of ``path`` holding ``text``."""
    lines = path.read_text().splitlines()
    return f"{path}:{next(i for i, ln in enumerate(lines, 1) if text in ln)}"


def test_check_loads_every_app_as_run_does_and_fails_with_runs_line(tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(APP_MODULE)
    (tmp_path / "slowapp.py").write_text("import time\ntime.sleep(60)\n")
    marker = tmp_path / "built"
    env = {"BUILT_MARKER": str(marker)}

    # From the current directory, as `run` imports it; a class is never built, a factory is.
    res = shardudp("check", "--print-config", "--bind", "127.0.0.1:9", "--bind",
                   "127.0.0.1:10", "--app", "myapp:Proto", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["listener"]) == 2
    assert "importing myapp" in res.stderr
    res = shardudp("check", "myapp:factory", "--bind", "127.0.0.1:9", "--workers", "1",
                   cwd=tmp_path, env=env)
    # It says where the APP imports from, and as whom.
    assert (res.returncode, res.stdout) == (
        0, f"config ok: 1 worker, 1 listener, APP myapp:factory imports (as uid {os.geteuid()}, "
           f"after dropping privileges: myapp:factory from {tmp_path / 'myapp.py'})\n"), \
        res.stderr
    assert not marker.exists()

    # What run refuses with exit 3, check refuses alike, with the line run prints.
    for app, needle in [("nomod:Echo", "No module named 'nomod'"),
                        ("myapp:Nope", "has no attribute 'Nope'"),
                        ("myapp:NOT_CALLABLE", "neither a DatagramProtocol subclass nor"),
                        ("apps:NotAProtocol", "not a DatagramProtocol subclass"),
                        ("myapp:broken", f"failed in build at "
                         f"{_line_of(tmp_path / 'myapp.py', 'database is down')}: "
                         "RuntimeError: the database is down")]:
        port = free_port()
        args = [app, "--bind", f"127.0.0.1:{port}", "--workers", "1"]
        res = shardudp("check", *args, cwd=tmp_path, env=env)
        assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
        # (The module's own print goes to stderr too.)
        (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("shardudp:")]
        assert line.startswith(f"shardudp: error: APP {app!r} (listener "
                               f"udp-127.0.0.1:{port}) ") and needle in line, line
        ran = run_cli("run", *args, env=dict(child_env([tmp_path]), **env))
        assert ran.returncode == 3 and ran.stderr.splitlines()[-1] == line, ran.stderr

    # An import that never ends is bounded by the workers' own deadline.
    res = shardudp("check", "slowapp:X", "--bind", "127.0.0.1:9", "--timeout", "0.5",
                   cwd=tmp_path)
    assert res.returncode == 3 and res.stderr == (
        "shardudp: error: APP 'slowapp:X' (listener udp-127.0.0.1:9): still importing it "
        "after 0.5 s (--timeout), when a worker would be killed\n")


PLAIN = """
from twisted.internet.protocol import DatagramProtocol

def handler(data, addr):
    print(data)

def main():
    pass

class Needs(DatagramProtocol):
    def __init__(self, peer):
        self.peer = peer
"""


@pytest.mark.parametrize(("app", "where", "needle"), [
    # A plain function, not a factory: check refused it only after run did.
    ("plain:handler", "def handler", "handler(data, addr) cannot be called without "
                                     "arguments (missing a required argument: 'data')"),
    ("plain:main", "def main", "returned NoneType, not a DatagramProtocol instance"),
    ("plain:Needs", "def __init__", "Needs(peer) cannot be called without arguments"),
])
def test_check_refuses_a_plain_function_with_the_line_run_prints(tmp_path: Path, app: str,
                                                                 where: str,
                                                                 needle: str) -> None:
    (tmp_path / "plain.py").write_text(PLAIN)
    port = free_port()
    args = [app, "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    checked = shardudp("check", *args, cwd=tmp_path)
    ran = run_cli("run", *args, env=child_env([tmp_path]))
    assert (checked.returncode, ran.returncode) == (3, 3), (checked.stderr, ran.stderr)
    (line,) = checked.stderr.splitlines()
    assert line == ran.stderr.splitlines()[-1], ran.stderr
    assert line.startswith(f"shardudp: error: APP {app!r} (listener udp-127.0.0.1:{port}) "
                           f"failed in build at {_line_of(tmp_path / 'plain.py', where)}: "
                           f"{needle}"), line


def _unprivileged_port_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except (OSError, ValueError):
        return 1024


def _have_net_bind_service() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 10 & 1)
    return False


#: As nobody, still able to read the interpreter wherever it lives (under /root here).
AS_NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             "--inh-caps", "+dac_read_search", "--ambient-caps", "+dac_read_search"]


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="as root, needs setpriv to run the CLI unprivileged")
@pytest.mark.skipif(os.geteuid() != 0 and _have_net_bind_service(),
                    reason="this user has CAP_NET_BIND_SERVICE")
@pytest.mark.skipif(_unprivileged_port_start() <= 977,
                    reason="net.ipv4.ip_unprivileged_port_start lets anyone bind port 977")
def test_check_refuses_a_privileged_port_without_privilege_as_run_does() -> None:
    prefix = AS_NOBODY if os.geteuid() == 0 else []
    args = ["echo", "--bind", "127.0.0.1:977", "--workers", "1"]
    checked = shardudp("check", *args, prefix=prefix)
    ran = shardudp("run", *args, prefix=prefix)
    assert (checked.returncode, ran.returncode) == (1, 1), (checked.stderr, ran.stderr)
    (line,) = checked.stderr.splitlines()
    assert line == ran.stderr.splitlines()[-1] == (
        "shardudp: error: cannot bind 127.0.0.1:977 for listener 'udp-127.0.0.1:977': "
        "Permission denied; ports below 1024 need privilege: start as root (with --user USER "
        "to run the workers as USER), or grant CAP_NET_BIND_SERVICE (in a systemd unit: "
        "AmbientCapabilities=CAP_NET_BIND_SERVICE)")
    if os.geteuid() == 0:  # with the capability, both are fine with it
        with_cap = [*AS_NOBODY[:-4], "--inh-caps", "+dac_read_search,+net_bind_service",
                    "--ambient-caps", "+dac_read_search,+net_bind_service"]
        res = shardudp("check", *args, prefix=with_cap)
        assert res.returncode == 0, res.stderr


def test_check_reports_app_problems_together_with_config_errors(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text(PLAIN)
    cfg = tmp_path / "c.toml"
    cfg.write_text('timeout = "soon"\n'
                   '[[listener]]\napp = "plain:main"\nbind = "127.0.0.1:9"\n'
                   '[[listener]]\napp = "echo"\nbind = "127.0.0.1:10"\nrcvbuf = -1\n'
                   '[[listener]]\napp = "nomod:X"\nbind = "127.0.0.1:11"\nname = "n"\n')
    res = shardudp("check", "--config", str(cfg), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.splitlines() == [
        "shardudp: error: timeout: expected a number, got 'soon'",
        "shardudp: error: listener[1].rcvbuf: -1 is out of range [0, 2147483647]",
        "shardudp: error: APP 'plain:main' (listener udp-127.0.0.1:9) failed in build at "
        f"{_line_of(tmp_path / 'plain.py', 'def main')}: returned NoneType, not a "
        "DatagramProtocol instance (an APP names a DatagramProtocol subclass or a callable "
        "returning an instance)",
        "shardudp: error: APP 'nomod:X' (listener n) failed in import: ModuleNotFoundError: "
        "No module named 'nomod'"]


def test_check_never_imports_twisted_itself() -> None:
    """The APP is imported in a child: the checking process stays free of Twisted,
    like the master, whose reactor every worker would inherit."""
    code = ("import sys\nfrom shardudp import cli\n"
            "rc = cli.main(['check', 'echo', '--bind', '127.0.0.1:9'])\n"
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SHARDUDP_CONTROL="none")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert res.stdout.splitlines()[-1] == "0 []", (res.stdout, res.stderr)


@pytest.mark.parametrize(("datapath", "needle"), [
    ("c", "--datapath: c cannot run here: no compiler at install time"),
    ("python", "--datapath: python cannot run here: no recvmmsg here; "
               "python-loop needs no recvmmsg"),
])
def test_a_datapath_this_host_cannot_run_is_refused_before_anything_starts(
    datapath: str, needle: str
) -> None:
    """As on a host where the extension was not built (or libc lacks recvmmsg)."""
    code = ("import sys\nfrom shardudp import cli, datapaths, _pybatch\n"
            "datapaths._C_MISSING = 'no compiler at install time'\n"
            "_pybatch.MISSING = 'no recvmmsg here'\n"
            f"sys.exit(cli.main(['check', 'echo', '--bind', '127.0.0.1:9', "
            f"'--datapath', {datapath!r}]))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SHARDUDP_CONTROL="none")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, env=env, stdin=subprocess.DEVNULL)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.splitlines() == [f"shardudp: error: {needle}"], res.stderr


def test_the_start_line_names_the_datapath_auto_chose() -> None:
    from shardudp import datapaths

    with serving("echo", workers=1) as (srv, _):
        assert f"(datapath auto = {datapaths.resolve('auto')})" in srv.log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to nobody")
def test_check_imports_the_app_as_the_workers_user(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "mine.py").write_text(APP_MODULE)
    args = ["check", "mine:Proto", "--bind", "127.0.0.1:9"]
    assert shardudp(*args, cwd=private).returncode == 0
    res = shardudp(*args, "--user", "nobody", cwd=private)
    assert res.returncode == 3 and "Traceback" not in res.stderr, res.stderr
    (line,) = res.stderr.splitlines()
    assert line.startswith("shardudp: error: APP 'mine:Proto' ") and "mine" in line, line


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run the CLI as another user")
@pytest.mark.parametrize("command", ["check", "run"])
@pytest.mark.parametrize("key", ["user", "group"])
def test_user_and_group_need_a_master_started_as_root(command: str, key: str) -> None:
    value = "nobody" if key == "user" else "nogroup"
    res = shardudp(command, *ECHO, f"--{key}", value, prefix=AS_NOBODY)
    assert errors(res) == [f"--{key}: only a master started as root can run its workers as "
                           "another user or group (this runs as uid 65534)"]


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, a mistyped path used to be created")
def test_run_creates_no_tree_for_a_mistyped_control_path() -> None:
    top = Path("/nonexistent-shardudp-test")
    assert not top.exists()
    res = shardudp("run", *ECHO, "--control", str(top / "dir" / "c.sock"))
    assert errors(res) == [f"--control: directory {top} does not exist"]
    assert not top.exists()


# -- the ready-made apps, installed ---------------------------------------------


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """shardudp's Python packages as `pip install .` lays them out (setuptools' build_py
    on a copy of the sources, from pyproject.toml): the checkout is not on the path."""
    pytest.importorskip("setuptools", reason="needs setuptools to lay out the packages")
    top = tmp_path_factory.mktemp("installed")
    src, lib = top / "src", top / "site-packages"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src)
    for name in ("shardudp", "workers"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(lib)],
                         cwd=src, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    return lib


def _installed_env(lib: Path) -> dict[str, str]:
    """Run against ``lib`` alone: neither the checkout nor tests/ is importable."""
    return dict(child_env(), PYTHONPATH=str(lib))


def test_the_ready_made_apps_install_inside_shardudp_and_run_by_name_from_anywhere(
        installed: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in installed.iterdir()) == ["shardudp"]  # no top-level workers
    assert (installed / "shardudp" / "workers" / "echo.py").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def launch() -> tuple[Server, int]:
        port = free_port()
        return Server(["run", "echo", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
                      env=_installed_env(installed), cwd=elsewhere), port

    with started(launch, ready="all 1 workers ready") as (srv, port):
        assert f"udp-127.0.0.1:{port}=shardudp.workers.echo:Echo " in srv.log
        assert f"from {installed}/shardudp/" in _which_shardudp(installed, elsewhere)
        with Flows(1, port) as flows:
            flows.send(0, b"hi")
            assert [d for _, d in flows.collect(1, 5)] == [b"hi"]


def _which_shardudp(lib: Path, cwd: Path) -> str:
    code = "import shardudp.workers.echo as m; print('from', m.__file__)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, env=_installed_env(lib), cwd=cwd, stdin=subprocess.DEVNULL)
    return res.stdout + res.stderr


USERS_WORKERS = """
import os
from twisted.internet.protocol import DatagramProtocol

class App(DatagramProtocol):
    def datagramReceived(self, data, addr):
        self.transport.write(b"mine:" + data, addr)
"""


def test_a_users_own_workers_package_runs_next_to_an_installed_shardudp(
        installed: Path, tmp_path: Path) -> None:
    (tmp_path / "workers").mkdir()
    (tmp_path / "workers" / "__init__.py").write_text("")
    (tmp_path / "workers" / "myapp.py").write_text(USERS_WORKERS)
    env = _installed_env(installed)

    def launch() -> tuple[Server, tuple[int, int]]:
        mine, ours = free_port(), free_port()
        cfg = tmp_path / "shardudp.toml"
        cfg.write_text(f'workers = 1\n[[listener]]\napp = "workers.myapp:App"\n'
                       f'bind = "127.0.0.1:{mine}"\n'
                       f'[[listener]]\napp = "echo"\nbind = "127.0.0.1:{ours}"\n')
        assert shardudp("check", "--config", str(cfg), cwd=tmp_path,
                        env={"PYTHONPATH": str(installed)}).returncode == 0
        return Server(["run", "--config", str(cfg)], env=env, cwd=tmp_path), (mine, ours)

    with (started(launch, ready="all 1 workers ready") as (_, (mine, ours)),
          Flows(1, mine) as a, Flows(1, ours) as b):
        a.send(0, b"x")
        b.send(0, b"y")
        assert [d for _, d in a.collect(1, 5)] == [b"mine:x"]
        assert [d for _, d in b.collect(1, 5)] == [b"y"]

    # The old spelling of a ready-made app now names the user's package; a hint says
    # where ours went.
    res = shardudp("check", "workers.echo:Echo", "--bind", "127.0.0.1:9", cwd=tmp_path,
                   env={"PYTHONPATH": str(installed)})
    assert res.returncode == 3
    assert res.stderr == (
        "shardudp: error: APP 'workers.echo:Echo' (listener udp-127.0.0.1:9) failed in import: "
        "ModuleNotFoundError: No module named 'workers.echo'; the ready-made apps moved into "
        "shardudp: write echo (or shardudp.workers.echo:Echo)\n")


# -- help, warnings, the README's examples ---------------------------------------------


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_help_shows_the_defaults_and_ctl_offers_no_none() -> None:
    run = _flat(shardudp("run", "--help").stdout)
    for flag, default in [("--timeout SECONDS", "30.0"), ("--metrics-interval SECONDS", "1.0"),
                          ("--datapath auto|c|python|python-loop|twisted", "auto"),
                          ("--steering, --no-steering", "true"),
                          ("--rcvbuf BYTES", "4194304")]:
        head = run.index(f" {flag} ")
        assert f"(default: {default}" in run[head:run.index(" --", head + len(flag) + 2)], flag
    assert "--workers N|auto" in run and "(default: auto, " in run
    ctl = shardudp("ctl", "--help")
    assert ctl.returncode == 0
    assert "none" not in ctl.stdout, ctl.stdout
    assert "--control PATH|auto" in ctl.stdout
    flat = _flat(ctl.stdout)
    assert "(default: $SHARDUDP_CONTROL, else the --config file's control, else auto)" in flat


def test_many_more_workers_than_cpus_get_a_warning_with_the_memory_they_take() -> None:
    one_cpu = ["taskset", "-c", str(min(os.sched_getaffinity(0)))]
    warning = ("--workers: 5 workers are 5 times the 1 usable CPU: they only contend for the "
               "CPUs, and take about 50 MiB of memory (about 10 MiB each); `--workers auto` "
               "starts one per CPU")
    res = shardudp("check", "echo", "--bind", "127.0.0.1:9", "--workers", "5", prefix=one_cpu)
    assert res.returncode == 0 and res.stderr == f"shardudp: warning: {warning}\n", res.stderr
    res = shardudp("check", "echo", "--bind", "127.0.0.1:9", "--workers", "4", prefix=one_cpu)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    srv = Server(["run", "echo", "--bind", "127.0.0.1:0", "--workers", "5"], prefix=one_cpu)
    try:
        srv.wait_line(r"WARNING shardudp: " + warning.replace("(", r"\(").replace(")", r"\)"))
        srv.wait_line("all 5 workers ready")
    finally:
        srv.stop()


def test_the_readmes_multicast_listener_serves_its_group_quietly_across_a_reload(
        tmp_path: Path) -> None:
    """The ready-made multicast_ping joins the group of the listener it serves, not the
    how-to's 228.0.0.5: no CRITICAL line on start or reload."""

    def launch() -> tuple[Server, int]:
        port = free_port()
        cfg = tmp_path / "shardudp.toml"
        cfg.write_text(f'workers = 2\n[[listener]]\nname = "discovery"\napp = "multicast_ping"\n'
                       f'multicast = "239.255.0.7:{port}"\nmulticast_mode = "single"\n'
                       'multicast_interface = "127.0.0.1"\nmulticast_ttl = 0\n')
        return Server(["run", "--config", str(cfg)]), port

    with started(launch, ready="all 2 workers ready") as (srv, port):
        mark = srv.mark()
        srv.signal(signal.SIGHUP)
        srv.wait_line("reload complete", start=mark)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                              socket.inet_aton("127.0.0.1"))
            client.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)
            client.settimeout(5)
            client.sendto(b"Client: Ping", ("239.255.0.7", port))
            assert client.recv(100) == b"Server: Pong"
        srv.stop()
        assert "CRITICAL" not in srv.log and "MulticastJoinError" not in srv.log, srv.log
