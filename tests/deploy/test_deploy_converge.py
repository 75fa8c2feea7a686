"""The Ansible role for real: converge this machine into a temporary prefix with
a temporary user, converge again (nothing may change), then run the server the
way the rendered unit would (as its User= and Group=, with its environment,
runtime directories and ExecStartPre), from the rendered config, and talk to it
on loopback. The venv is made with this machine's own python3, as on a fresh
host, and the prefix is traversable like /opt: so a file the service user
cannot read fails the test, as it would fail the service.

Needs root (it creates a system user) and a host where systemd is not the
running init (the service tasks must skip; on a systemd host they would install
a real service). Everything it makes is removed at the end: the user, the
group, the prefix with its venv, config, unit and sysctl drop-in.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from deploytools import ANSIBLE, REPO, local_inventory, run, tool, tool_env
from harness import STARTED_SESSIONS, free_port, free_tcp_port, session_pids, wait_pid_gone
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates a system user: needs root"),
    pytest.mark.skipif(Path("/run/systemd/system").exists(),
                       reason="systemd runs here: the role would install a real service"),
]

#: What a copy of the repository for `pip install` leaves out.
NOT_SOURCE = {".git", ".ci", "tests", "bench", "deploy", "build", "dist", "__pycache__",
              ".mypy_cache", ".ruff_cache", ".pytest_cache", ".venv", "venv"}
WORKERS = 2
SKIP_MESSAGE = "systemd is not running on this host (no /run/systemd/system)"


def recap(output: str) -> dict[str, int]:
    m = re.search(r"^localhost\s*:\s*(.*)$", output, re.MULTILINE)
    assert m, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}


def read_sysctl(name: str) -> int:
    return int(Path("/proc/sys/net/core", name).read_text())


@dataclass
class Converged:
    root: Path
    user: str
    ports: dict[str, int]
    variables: dict[str, object]
    first_output: str
    env: dict[str, str] = field(repr=False)

    @property
    def prefix(self) -> Path:
        return self.root / "prefix"

    @property
    def venv(self) -> Path:
        return self.prefix / "opt" / "venv"

    @property
    def config(self) -> Path:
        return self.prefix / "etc" / "shardudp.toml"

    @property
    def unit(self) -> Path:
        return self.prefix / "systemd" / "shardudp.service"

    @property
    def sysctl_file(self) -> Path:
        return self.prefix / "sysctl.d" / "60-shardudp.conf"

    def playbook(self, **override: object) -> subprocess.CompletedProcess[str]:
        vars_file = self.root / "vars.json"
        vars_file.write_text(json.dumps({**self.variables, **override}))
        return run([tool("ansible-playbook"), "-i", str(self.root / "inventory.yml"),
                    "-e", f"@{vars_file}", str(ANSIBLE / "site.yml")], env=self.env)


def copy_source(dest: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> set[str]:
        return {n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")}

    shutil.copytree(REPO, dest, ignore=ignore)


def remove_account(user: str) -> None:
    # userdel also drops a same-named group with no other members; groupdel
    # covers the case where it did not.
    subprocess.run(["userdel", user], capture_output=True, check=False, timeout=30)
    subprocess.run(["groupdel", user], capture_output=True, check=False, timeout=30)


def system_python() -> str | None:
    """This machine's own python3 (3.11 or newer, with venv), as a fresh host
    has it: unlike the test's interpreter, every user can run it."""
    probe = "import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))"
    for path in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(path, os.X_OK) and run([path, "-c", probe], timeout=30).returncode == 0:
            return path
    return None


@pytest.fixture(scope="module")
def converged() -> Iterator[Converged]:
    python = system_python()
    if python is None:
        pytest.skip("no system python3 >= 3.11 with venv (apt-get install python3-venv)")
    # Not under pytest's basetemp, whose directories are 0700: the prefix must
    # be as reachable as /opt is, so that only what the role creates decides
    # whether the service user can read its venv and config.
    root = Path(tempfile.mkdtemp(prefix="shardudp-converge-"))
    root.chmod(0o755)
    user = "sdtest" + secrets.token_hex(4)
    with contextlib.suppress(KeyError):
        pwd.getpwnam(user)
        pytest.fail(f"user {user} exists already")
    copy_source(root / "src")
    local_inventory(root / "inventory.yml")
    ports = {"udp4": free_port(socket.AF_INET), "udp6": free_port(socket.AF_INET6),
             "metrics": free_tcp_port()}
    prefix = root / "prefix"
    variables: dict[str, object] = {
        "shardudp_source": str(root / "src"),
        "shardudp_python": python,
        # It has venv already; no apt-get inside a test.
        "shardudp_system_packages": [],
        "shardudp_prefix": str(prefix / "opt"),
        "shardudp_config_dir": str(prefix / "etc"),
        "shardudp_sysctl_dir": str(prefix / "sysctl.d"),
        "shardudp_systemd_unit_dir": str(prefix / "systemd"),
        "shardudp_user": user,
        "shardudp_group": user,
        # The handler really writes these: today's values, so the host is unchanged.
        "shardudp_rmem_max": read_sysctl("rmem_max"),
        "shardudp_rmem_default": read_sysctl("rmem_default"),
        "shardudp_workers": WORKERS,
        "shardudp_metrics": f"127.0.0.1:{ports['metrics']}",
        "shardudp_listeners": [
            {"name": "echo4", "app": "echo",
             "bind": f"127.0.0.1:{ports['udp4']}", "rcvbuf": 1048576},
            {"name": "echo6", "app": "echo", "bind": f"[::1]:{ports['udp6']}"},
        ],
    }
    env = {k: v for k, v in tool_env(root).items() if not k.startswith("SHARDUDP_")}
    state = Converged(root, user, ports, variables, "", env)
    try:
        res = state.playbook()
        assert res.returncode == 0, res.stdout
        state.first_output = res.stdout
        yield state
    finally:
        remove_account(user)
        shutil.rmtree(root, ignore_errors=True)
        with contextlib.suppress(KeyError):
            pwd.getpwnam(user)
            pytest.fail(f"could not remove user {user}")
        assert not root.exists()


def test_first_run_installs_everything(converged: Converged) -> None:
    assert recap(converged.first_output)["changed"] > 0
    assert SKIP_MESSAGE in converged.first_output
    account = pwd.getpwnam(converged.user)
    assert account.pw_shell == "/usr/sbin/nologin"
    assert grp.getgrgid(account.pw_gid).gr_name == converged.user
    assert os.access(converged.venv / "bin" / "shardudp", os.X_OK)
    config = converged.config.read_text()
    assert f'bind = "127.0.0.1:{converged.ports["udp4"]}"' in config
    assert f'bind = "[::1]:{converged.ports["udp6"]}"' in config
    assert f"workers = {WORKERS}\n" in config
    sysctl = converged.sysctl_file.read_text()
    assert f"net.core.rmem_max = {read_sysctl('rmem_max')}\n" in sysctl
    assert f"net.core.rmem_default = {read_sysctl('rmem_default')}\n" in sysctl
    unit = converged.unit.read_text()
    assert f"User={converged.user}\n" in unit
    assert f"ExecStart={converged.venv}/bin/shardudp run --config {converged.config}\n" in unit


def test_second_run_changes_nothing(converged: Converged) -> None:
    res = converged.playbook()
    assert res.returncode == 0, res.stdout
    counts = recap(res.stdout)
    assert counts["changed"] == 0, res.stdout
    assert counts["failed"] == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_rendered_unit_passes_systemd_analyze_verify(converged: Converged) -> None:
    # verify also checks that ExecStart's binary exists and User= resolves.
    res = run(["systemd-analyze", "verify", str(converged.unit)])
    assert res.returncode == 0, res.stdout
    assert converged.unit.name not in res.stdout, res.stdout


def test_a_config_the_server_rejects_never_lands(converged: Converged) -> None:
    before = converged.config.read_bytes()
    bad = [{"name": "echo4", "app": "echo", "bind": "127.0.0.1:70000"}]
    res = converged.playbook(shardudp_listeners=bad)
    assert res.returncode != 0, res.stdout
    assert "Render the shardudp config" in res.stdout
    assert "bind" in res.stdout and "70000" in res.stdout, res.stdout
    assert converged.config.read_bytes() == before


# -- the server, started from what the role rendered


#: systemd's PATH for services, and the variables it sets for User=.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"
#: The *Directory= settings: systemd creates each, owned by User=, and says where.
UNIT_DIRECTORIES = {"RuntimeDirectory": "RUNTIME_DIRECTORY", "StateDirectory": "STATE_DIRECTORY",
                    "CacheDirectory": "CACHE_DIRECTORY", "LogsDirectory": "LOGS_DIRECTORY",
                    "ConfigurationDirectory": "CONFIGURATION_DIRECTORY"}


def unit_service(path: Path) -> dict[str, list[str]]:
    """The [Service] section: each key with its values, in order."""
    section = ""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@dataclass
class UnitProcess:
    """What systemd would run for the unit: commands, credentials, environment."""

    exec_start_pre: list[list[str]]
    exec_start: list[str]
    exec_reload: list[list[str]]  # $MAINPID not yet substituted
    uid: int
    gid: int
    env: dict[str, str]
    cwd: str


def as_systemd_would(converged: Converged) -> UnitProcess:
    svc = unit_service(converged.unit)
    for key in svc:
        assert key in KNOWN_UNIT_KEYS or key in UNIT_DIRECTORIES, f"unit key {key} not emulated"
    account = pwd.getpwnam(svc["User"][-1])
    gid = grp.getgrnam(svc["Group"][-1]).gr_gid
    env = {"PATH": SYSTEMD_PATH, "HOME": account.pw_dir, "USER": account.pw_name,
           "LOGNAME": account.pw_name, "SHELL": account.pw_shell}
    for value in svc.get("Environment", []):
        env.update(item.split("=", 1) for item in shlex.split(value))
    for value in svc.get("EnvironmentFile", []):
        env_file = Path(value.removeprefix("-"))
        if env_file.exists() or not value.startswith("-"):
            env.update(line.split("=", 1) for line in env_file.read_text().splitlines()
                       if line.strip() and not line.startswith("#"))
    for key, var in UNIT_DIRECTORIES.items():
        for name in svc.get(key, []):
            made = converged.root / "systemd" / key / name
            made.mkdir(parents=True, exist_ok=True)
            os.chown(made, account.pw_uid, gid)
            env[var] = str(made)

    def command(value: str) -> list[str]:
        argv = shlex.split(value)
        assert argv[0].startswith("/"), f"special ExecStart prefixes are not emulated: {value}"
        return argv

    return UnitProcess([command(v) for v in svc.get("ExecStartPre", [])],
                       command(svc["ExecStart"][-1]),
                       [command(v) for v in svc.get("ExecReload", [])], account.pw_uid, gid,
                       env, svc.get("WorkingDirectory", ["/"])[-1])


#: Keys that do not change how the process is started here (capabilities,
#: sandboxing, restart policy, limits) or that as_systemd_would handles.
KNOWN_UNIT_KEYS = {
    "Type", "NotifyAccess", "User", "Group", "AmbientCapabilities", "CapabilityBoundingSet",
    "Environment", "EnvironmentFile", "ExecStartPre", "ExecStart", "ExecReload", "KillMode",
    "KillSignal",
    "TimeoutStopSec", "Restart", "RestartSec", "RestartPreventExitStatus", "LimitNOFILE",
    "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
    "RestrictAddressFamilies", "RestrictNamespaces", "LockPersonality",
}


class RunningServer:
    """The unit's ExecStart, started as systemd would (after its ExecStartPre)."""

    def __init__(self, converged: Converged, config: Path, log: Path) -> None:
        unit = as_systemd_would(converged)
        self.unit = unit

        def with_config(argv: list[str]) -> list[str]:
            return [str(config) if a == str(converged.config) else a for a in argv]

        creds = {"user": unit.uid, "group": unit.gid, "extra_groups": [], "umask": 0o022}
        for pre in unit.exec_start_pre:
            res = subprocess.run(with_config(pre), env=unit.env, cwd=unit.cwd,
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=60, check=False, **creds)
            assert res.returncode == 0, f"ExecStartPre {pre}: {res.stdout}{res.stderr}"
        self.log_path = log
        self.log_file = log.open("wb")
        self.proc = subprocess.Popen(
            with_config(unit.exec_start), stdin=subprocess.DEVNULL, stdout=self.log_file,
            stderr=subprocess.STDOUT, env=unit.env, cwd=unit.cwd, start_new_session=True,
            **creds)
        STARTED_SESSIONS.add(self.proc.pid)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        for pid in session_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.log_file.close()


def echo_once(family: socket.AddressFamily, addr: tuple[str, int], timeout: float) -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.sendto(b"probe", addr)
        r, _, _ = select.select([s], [], [], timeout)
        return bool(r) and s.recv(64) == b"probe"


def wait_until_echoing(srv: RunningServer, addr: tuple[str, int], timeout: float) -> bool:
    """True once the listener echoes; False if the server exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            return False
        if echo_once(socket.AF_INET, addr, 0.2):
            return True
    raise AssertionError(f"no echo from {addr} within {timeout} s; log:\n{srv.log}")


@contextlib.contextmanager
def serving(converged: Converged, tries: int = 5) -> Iterator[tuple[RunningServer, dict[str, int]]]:
    """Start the server from the rendered config; on a port clash, move to new ports."""
    ports = dict(converged.ports)
    config = converged.config
    for attempt in range(tries):
        srv = RunningServer(converged, config, converged.root / f"server-{attempt}.log")
        try:
            if wait_until_echoing(srv, ("127.0.0.1", ports["udp4"]), 30.0):
                yield srv, ports
                return
            if "in use" not in srv.log or attempt == tries - 1:
                raise AssertionError(f"server exited ({srv.proc.returncode}):\n{srv.log}")
        finally:
            srv.kill_all()
        # Someone took a port between the converge and now: same config, new ports.
        text = converged.config.read_text()
        new = {"udp4": free_port(socket.AF_INET), "udp6": free_port(socket.AF_INET6),
               "metrics": free_tcp_port()}
        for old_addr, new_addr in (
                (f'"127.0.0.1:{converged.ports["udp4"]}"', f'"127.0.0.1:{new["udp4"]}"'),
                (f'"[::1]:{converged.ports["udp6"]}"', f'"[::1]:{new["udp6"]}"'),
                (f'"127.0.0.1:{converged.ports["metrics"]}"', f'"127.0.0.1:{new["metrics"]}"')):
            assert text.count(old_addr) == 1, text
            text = text.replace(old_addr, new_addr)
        ports = new
        config = converged.root / f"shardudp-retry{attempt}.toml"
        config.write_text(text)
    raise AssertionError("could not find free ports")


def echo_many(family: socket.AddressFamily, addr: tuple[str, int], flows: int, each: int,
              timeout: float) -> tuple[set[bytes], set[bytes]]:
    """Send ``each`` datagrams from each of ``flows`` sockets; (sent, echoed back)."""
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(flows)]
    sent: set[bytes] = set()
    got: set[bytes] = set()
    try:
        for i, s in enumerate(socks):
            s.setblocking(False)
            for j in range(each):
                payload = b"flow%d-msg%d" % (i, j)
                s.sendto(payload, addr)
                sent.add(payload)
        deadline = time.monotonic() + timeout
        while got != sent and time.monotonic() < deadline:
            readable, _, _ = select.select(socks, [], [], max(0.0, deadline - time.monotonic()))
            for s in readable:
                for _ in range(each):
                    try:
                        data, src = s.recvfrom(256)
                    except BlockingIOError:
                        break
                    assert src[:2] == addr, src
                    got.add(data)
    finally:
        for s in socks:
            s.close()
    return sent, got


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def received(text: str) -> dict[str, float]:
    """Datagrams received per listener, summed over slots."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "shardudp_datagrams_received_total":
                name = sample.labels.get("listener", "")
                out[name] = out.get(name, 0.0) + sample.value
    return out


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check()`` (bounded by count and time) until it returns true."""
    deadline = time.monotonic() + timeout
    last: object = None
    for _ in range(1000):
        try:
            last = check()
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        if last is True:
            return
        if time.monotonic() >= deadline:
            break
        # Wait for the next metrics report, not a fixed time: a short select is the clock.
        select.select([], [], [], 0.2)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def test_server_runs_from_the_rendered_config(converged: Converged) -> None:
    with serving(converged) as (srv, ports):
        for family, host, port in ((socket.AF_INET, "127.0.0.1", ports["udp4"]),
                                   (socket.AF_INET6, "::1", ports["udp6"])):
            sent, got = echo_many(family, (host, port), flows=4, each=10, timeout=10.0)
            assert got == sent, f"[{host}]:{port}: {len(sent - got)} of {len(sent)} not echoed"

        health = [str(converged.venv / "bin" / "shardudp"), "health", "--metrics",
                  f"127.0.0.1:{ports['metrics']}"]
        wait_for(lambda: run(health, env=converged.env, timeout=30).returncode == 0, 20.0,
                 "shardudp health")

        def counted() -> bool:
            counts = received(scrape(ports["metrics"]))
            return counts.get("echo4", 0) >= 40 and counts.get("echo6", 0) >= 40

        # Counters arrive with the workers' periodic reports.
        wait_for(counted, 20.0, "datagram counters in /metrics")

        # It runs as the unit's user, and its control socket is in the unit's
        # RuntimeDirectory, where `shardudp status` finds it.
        assert os.stat(f"/proc/{srv.proc.pid}").st_uid == pwd.getpwnam(converged.user).pw_uid
        runtime = Path(srv.unit.env["RUNTIME_DIRECTORY"])
        status = run([str(converged.venv / "bin" / "shardudp"), "status", "--json",
                      "--control", str(runtime / "control.sock")], env=converged.env, timeout=30)
        assert status.returncode == 0, status.stdout
        assert json.loads(status.stdout)["workers"] == WORKERS

        # `systemctl reload`: the unit's ExecReload, with $MAINPID, is a rolling
        # restart that replaces every worker and keeps serving.
        before = set(session_pids(srv.proc.pid)) - {srv.proc.pid}
        assert srv.unit.exec_reload, "the unit has no ExecReload"
        for argv in srv.unit.exec_reload:
            argv = [a.replace("$MAINPID", str(srv.proc.pid)) for a in argv]
            assert run(argv, env=converged.env, timeout=30).returncode == 0, argv
        wait_for(lambda: "reload complete" in srv.log, 30.0, "the rolling restart")
        after = set(session_pids(srv.proc.pid)) - {srv.proc.pid}
        assert len(after) >= WORKERS and not after & before, (before, after)
        sent, got = echo_many(socket.AF_INET, ("127.0.0.1", ports["udp4"]), flows=4, each=10,
                              timeout=10.0)
        assert got == sent

        workers = [p for p in session_pids(srv.proc.pid) if p != srv.proc.pid]
        assert len(workers) >= WORKERS, workers
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=30)
        assert code == 0, srv.log
        # The master reaped its workers before it exited.
        assert all(wait_pid_gone(pid, 10.0) for pid in workers)
        assert session_pids(srv.proc.pid) == []


# -- the sysctl handler where /proc/sys is read-only


SYSCTL_PLAY = """\
- name: Apply the role's sysctl part only
  hosts: shardudp
  gather_facts: false
  tasks:
    - name: Run the role's sysctl tasks
      ansible.builtin.include_role:
        name: shardudp
        tasks_from: sysctl
"""


def read_only_in_a_new_netns() -> bool:
    """Whether net.core.rmem_max is read-only in a fresh network namespace here."""
    if shutil.which("unshare") is None or run(["unshare", "--net", "true"], timeout=30).returncode:
        return False
    probe = ["unshare", "--net", "test", "-w", "/proc/sys/net/core/rmem_max"]
    return run(probe, timeout=30).returncode != 0


def test_sysctl_apply_warns_instead_of_failing_in_a_network_namespace(tmp_path: Path) -> None:
    """In a new network namespace net.core.rmem_* are visible but read-only,
    as in a container: the role must warn and go on, and leave the file."""
    if not read_only_in_a_new_netns():
        pytest.skip("no network namespace here, or net.core.rmem_max is writable in one")
    play = tmp_path / "sysctl.yml"
    play.write_text(SYSCTL_PLAY)
    inventory = local_inventory(tmp_path / "inventory.yml")
    drop_in = tmp_path / "sysctl.d" / "60-shardudp.conf"

    def apply(**variables: object) -> subprocess.CompletedProcess[str]:
        vars_file = tmp_path / "vars.json"
        vars_file.write_text(json.dumps({"shardudp_sysctl_dir": str(drop_in.parent),
                                         **variables}))
        return run(["unshare", "--net", tool("ansible-playbook"), "-i", str(inventory),
                    "-e", f"@{vars_file}", str(play)], env=tool_env(tmp_path))

    before = (read_sysctl("rmem_max"), read_sysctl("rmem_default"))
    # Today's values: nothing would change even if a write got through.
    res = apply(shardudp_rmem_max=before[0], shardudp_rmem_default=before[1])
    assert res.returncode == 0, res.stdout
    assert "WARNING: could not apply" in res.stdout, res.stdout
    assert "shardudp_sysctl_apply=false" in res.stdout
    assert recap(res.stdout)["failed"] == 0
    assert f"net.core.rmem_max = {before[0]}\n" in drop_in.read_text()
    # The host's own values were not touched from inside the namespace.
    assert (read_sysctl("rmem_max"), read_sysctl("rmem_default")) == before

    # With applying switched off, a changed file is written and nothing is tried.
    res = apply(shardudp_rmem_max=before[0] + 8192, shardudp_rmem_default=before[1],
                shardudp_sysctl_apply=False)
    assert res.returncode == 0, res.stdout
    assert "WARNING" not in res.stdout, res.stdout
    assert f"net.core.rmem_max = {before[0] + 8192}\n" in drop_in.read_text()
