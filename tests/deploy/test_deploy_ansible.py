"""deploy/ansible and deploy/systemd without touching the host: syntax, lint,
clear errors for bad variables, the source fingerprint, and the unit file
kept in step with the role's template.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from deploytools import (
    ANSIBLE,
    REPO,
    ROLE,
    TOOL_TIMEOUT,
    UNIT,
    local_inventory,
    run,
    tool,
    tool_env,
)


def test_playbook_syntax_check(tmp_path: Path) -> None:
    res = run([tool("ansible-playbook"), "--syntax-check", "-i", "inventory/example.yml",
               "site.yml"], env=tool_env(tmp_path), cwd=ANSIBLE)
    assert res.returncode == 0, res.stdout
    assert "playbook: site.yml" in res.stdout


def test_example_inventory_has_several_hosts(tmp_path: Path) -> None:
    res = run([tool("ansible-inventory"), "-i", "inventory/example.yml", "--list"],
              env=tool_env(tmp_path), cwd=ANSIBLE)
    assert res.returncode == 0, res.stdout
    inv = json.loads(res.stdout[res.stdout.index("{"):])
    hosts = set(inv["_meta"]["hostvars"])
    assert len(hosts) >= 3
    # group_vars next to the inventory reach the hosts, and each says where
    # shardudp comes from: a URL or a path, never a name looked up on PyPI.
    for host, hostvars in inv["_meta"]["hostvars"].items():
        assert hostvars["shardudp_listeners"], host
        assert re.search(r"^/|://|@", hostvars["shardudp_source"]), host
        if "git+" in hostvars["shardudp_source"]:
            assert "git" in hostvars["shardudp_system_packages"], host


def test_ansible_lint_passes_offline(tmp_path: Path) -> None:
    # --offline and the config's `offline: true`: no galaxy, no schema refresh.
    env = tool_env(tmp_path, ANSIBLE_LINT_SKIP_VERSION_CHECK="1",
                   XDG_CACHE_HOME=str(tmp_path / "cache"))
    res = run([tool("ansible-lint"), "--offline", "--nocolor", "-c", ".ansible-lint",
               "site.yml", "inventory", "roles/shardudp"], env=env, cwd=ANSIBLE)
    assert res.returncode == 0, res.stdout
    m = re.search(r"Passed: 0 failure\(s\), 0 warning\(s\) in (\d+) files", res.stdout)
    assert m, res.stdout
    # Every task, handler, template and meta file was looked at.
    assert int(m.group(1)) >= 15
    assert "Profile 'production' was required, and it passed" in res.stdout


#: Stands for "this variable is not set at all".
UNSET = object()

BAD_INPUTS: dict[str, tuple[dict[str, object], str]] = {
    "unknown listener key": (
        {"shardudp_listeners": [{"app": "echo", "bind": "127.0.0.1:1",
                                 "colour": "red"}]},
        "shardudp_listeners.colour"),
    "bind and multicast": (
        {"shardudp_listeners": [{"app": "echo", "bind": "127.0.0.1:1",
                                 "multicast": "239.255.42.99:5000"}]},
        "mutually exclusive: bind|multicast"),
    "zero workers": ({"shardudp_workers": 0}, "shardudp_workers must be a positive integer"),
    "no source": ({"shardudp_source": UNSET}, "missing required arguments: shardudp_source"),
    "relative source": ({"shardudp_source": "./shardudp"}, 'shardudp_source="./shardudp"'),
    # Resolved on PyPI, where shardudp is not published: a stranger's package.
    "plain requirement": ({"shardudp_source": "shardudp==0.1.0"},
                          "would be looked up on PyPI, where shardudp is not published"),
    "duplicate names": (
        {"shardudp_listeners": [{"name": "a", "app": "x:Y", "bind": "127.0.0.1:1"},
                                {"name": "a", "app": "x:Y", "bind": "127.0.0.1:2"}]},
        "duplicate listener name"),
}


def test_bad_variables_fail_early_naming_the_problem(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    base: dict[str, object] = {
        "shardudp_source": str(REPO),
        "shardudp_prefix": str(prefix / "opt"), "shardudp_config_dir": str(prefix / "etc"),
        "shardudp_sysctl_dir": str(prefix / "sysctl.d"),
        "shardudp_systemd_unit_dir": str(prefix / "systemd"),
        # Must not be created: validation comes before the first change.
        "shardudp_user": "shardudp-never", "shardudp_group": "shardudp-never",
        "shardudp_system_packages": [],
    }
    inventory = local_inventory(tmp_path / "inv.yml")
    # The cases run side by side: each is a whole ansible-playbook start-up.
    procs = {}
    for i, (case, (bad, _)) in enumerate(sorted(BAD_INPUTS.items())):
        variables = {k: v for k, v in {**base, **bad}.items() if v is not UNSET}
        vars_file = tmp_path / f"vars{i}.json"
        vars_file.write_text(json.dumps(variables))
        procs[case] = subprocess.Popen(
            [tool("ansible-playbook"), "-i", str(inventory), "-e", f"@{vars_file}",
             str(ANSIBLE / "site.yml")], env=tool_env(tmp_path / f"home{i}"),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
    try:
        outputs = {case: proc.communicate(timeout=TOOL_TIMEOUT) for case, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for case, (out, _) in outputs.items():
        expected = BAD_INPUTS[case][1]
        flat = " ".join(out.split())  # messages are folded over lines
        assert procs[case].returncode != 0, f"{case}:\n{out}"
        assert expected in flat, f"{case}:\n{out}"
        assert re.search(r"changed=0\s", out), f"{case}:\n{out}"
    assert not prefix.exists()


def test_unit_file_is_the_role_template_with_defaults(tmp_path: Path) -> None:
    rendered = tmp_path / "shardudp.service"
    res = run([tool("ansible"), "localhost", "-i", "localhost,", "-c", "local",
               "-e", f"ansible_python_interpreter={sys.executable}",
               "-e", f"@{ROLE / 'defaults' / 'main.yml'}",
               "-m", "ansible.builtin.template",
               "-a", f"src={ROLE / 'templates' / 'shardudp.service.j2'} dest={rendered}"],
              env=tool_env(tmp_path))
    assert res.returncode == 0, res.stdout

    def settings(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]

    assert settings(rendered.read_text()) == settings(UNIT.read_text())


def test_unit_hands_sigterm_to_the_master_alone() -> None:
    lines = set(UNIT.read_text().splitlines())
    assert {"Type=notify", "KillMode=mixed", "KillSignal=SIGTERM"} <= lines


# -- the fingerprint that makes installing from a source tree idempotent


def load_fingerprint() -> ModuleType:
    path = ROLE / "files" / "source_fingerprint.py"
    spec = importlib.util.spec_from_file_location("source_fingerprint", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check(mod: ModuleType, src: Path, stamp: Path, capsys: pytest.CaptureFixture[str]
          ) -> dict[str, object]:
    assert mod.main(["x", str(src), str(stamp)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out, dict)
    return out


PYPROJECT = """\
[project]
name = "x"
readme = "README.md"

[tool.setuptools]
packages = ["pkg", "pkg.sub", "other"]
"""


def test_fingerprint_goes_stale_only_when_what_pip_packages_changes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = load_fingerprint()
    src = tmp_path / "src"
    for rel, text in {"pyproject.toml": PYPROJECT, "README.md": "x\n", "setup.py": "",
                      "pkg/a.py": "A = 1\n", "pkg/sub/b.py": "", "other/c.py": "",
                      "tests/test_a.py": "", "bench/results/run.json": "{}",
                      "deploy/docker/Dockerfile": "FROM x\n", ".ci/run": ""}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    stamp = tmp_path / "stamp"

    first = check(mod, src, stamp, capsys)
    assert first["stale"] is True  # nothing installed yet
    assert "files=6\n" in str(first["stamp"])  # pyproject, setup.py, readme, 3 modules
    stamp.write_text(str(first["stamp"]))
    assert check(mod, src, stamp, capsys)["stale"] is False

    # What the wheel is not built from: a new bench result, a test, the deploy
    # files; pip's in-tree build products, bytecode, an in-place extension.
    for rel in ("bench/results/run2.json", "tests/test_b.py", "deploy/docker/compose.yaml",
                ".ci/other", "build/lib/pkg/a.py", "x.egg-info/PKG-INFO",
                "pkg/__pycache__/a.cpython-311.pyc", "pkg/_ext.cpython-311-x86_64-linux-gnu.so"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("changed\n")
    (src / "tests" / "test_a.py").write_text("changed\n")
    assert check(mod, src, stamp, capsys)["stale"] is False

    # What it is built from: a changed, added or renamed module, the readme,
    # the build files.
    for change in (lambda: (src / "pkg" / "a.py").write_text("A = 2\n"),
                   lambda: (src / "pkg" / "sub" / "new.py").write_text(""),
                   lambda: (src / "other" / "c.py").rename(src / "other" / "d.py"),
                   lambda: (src / "README.md").write_text("y\n"),
                   lambda: (src / "setup.py").write_text("# changed\n")):
        change()
        out = check(mod, src, stamp, capsys)
        assert out["stale"] is True
        stamp.write_text(str(out["stamp"]))


def test_fingerprint_refuses_a_missing_source(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    mod = load_fingerprint()
    assert mod.main(["x", str(tmp_path / "nope"), str(tmp_path / "stamp")]) == 1
    assert "no pyproject.toml there" in capsys.readouterr().err


def test_fingerprint_of_this_repository_covers_its_packages() -> None:
    paths = load_fingerprint().packaged_paths(str(REPO))
    assert {"pyproject.toml", "README.md", "shardudp", "workers"} <= set(paths)
    assert not {"tests", "bench", "deploy", ".ci"} & set(paths)


def render_config(tmp_path: Path, variables: dict[str, object]) -> dict[str, object]:
    """The role's TOML template rendered with its defaults plus ``variables``, parsed."""
    vars_file = tmp_path / "vars.json"
    vars_file.write_text(json.dumps(variables))
    rendered = tmp_path / "shardudp.toml"
    res = run([tool("ansible"), "localhost", "-i", "localhost,", "-c", "local",
               "-e", f"ansible_python_interpreter={sys.executable}",
               "-e", f"@{ROLE / 'defaults' / 'main.yml'}", "-e", f"@{vars_file}",
               "-m", "ansible.builtin.template",
               "-a", f"src={ROLE / 'templates' / 'shardudp.toml.j2'} dest={rendered}"],
              env=tool_env(tmp_path))
    assert res.returncode == 0, res.stdout
    return tomllib.loads(rendered.read_text())


def test_config_template_writes_typed_toml(tmp_path: Path) -> None:
    doc = render_config(tmp_path, {
        "shardudp_workers": "4",  # a string from -e workers=4 still becomes an integer
        "shardudp_extra_settings": {"datapath": "python", "graceful_timeout": 2.5,
                                    "metrics_interval": 0},
        "shardudp_listeners": [
            {"name": 'quote"and\\backslash', "app": "echo",
             "bind": "[::1]:9999", "rcvbuf": 4194304},
            {"app": "echo", "multicast": "239.255.42.99:5000",
             "multicast_mode": "fanout", "multicast_interface": "127.0.0.1"},
        ],
    })
    assert doc["workers"] == 4
    assert doc["timeout"] == 30.0
    assert doc["metrics"] == "127.0.0.1:29110"
    assert (doc["datapath"], doc["graceful_timeout"], doc["metrics_interval"]) == ("python", 2.5, 0)
    assert "user" not in doc and "pid_file" not in doc  # only when asked for
    assert doc["listener"] == [
        {"name": 'quote"and\\backslash', "app": "echo", "bind": "[::1]:9999",
         "rcvbuf": 4194304},
        {"app": "echo", "multicast": "239.255.42.99:5000",
         "multicast_mode": "fanout", "multicast_interface": "127.0.0.1"},
    ]


def test_config_template_defaults_and_privilege_drop(tmp_path: Path) -> None:
    doc = render_config(tmp_path, {"shardudp_drop_privileges": True,
                                   "shardudp_pid_file": "/run/shardudp/shardudp.pid"})
    assert doc["workers"] == "auto"
    assert (doc["user"], doc["group"]) == ("shardudp", "shardudp")
    assert doc["pid_file"] == "/run/shardudp/shardudp.pid"
    assert doc["listener"] == [{"name": "echo", "app": "echo",
                                "bind": "0.0.0.0:9999"}]
