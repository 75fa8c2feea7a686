"""Shared helpers for the deploy/ tests: where things are, and how to run the tools.

The linters and Ansible come from the `test` extra (pip install -e '.[test]');
a missing tool fails the test with that hint rather than skipping it, so a CI
that forgot the extra goes red instead of silently green.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"
ANSIBLE = DEPLOY / "ansible"
ROLE = ANSIBLE / "roles" / "shardudp"
UNIT = DEPLOY / "systemd" / "shardudp.service"

#: Every external command gets a deadline: a hung tool must fail the test.
TOOL_TIMEOUT = 240.0


def tool(name: str) -> str:
    """A tool installed next to this interpreter (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extra (pip install -e '.[test]')")
    return found


def tool_env(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment that keeps Ansible's state inside ``tmp`` and its output plain."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ansible_home = tmp / "ansible-home"
    ansible_home.mkdir(parents=True, exist_ok=True)
    env.update(
        ANSIBLE_HOME=str(ansible_home),
        ANSIBLE_LOCAL_TEMP=str(ansible_home / "tmp"),
        ANSIBLE_REMOTE_TEMP=str(ansible_home / "remote-tmp"),
        ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(ANSIBLE / "roles"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0",
        NO_COLOR="1",
        PY_COLORS="0",
    )
    env.pop("NOTIFY_SOCKET", None)
    env.update(extra)
    return env


def run(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and return its merged output."""
    return subprocess.run(
        list(cmd), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False)


def local_inventory(path: Path) -> Path:
    """An inventory with just this machine, reached without SSH and without sudo."""
    path.write_text(
        "all:\n"
        "  children:\n"
        "    shardudp:\n"
        "      hosts:\n"
        "        localhost:\n"
        "          ansible_connection: local\n"
        f"          ansible_python_interpreter: {sys.executable}\n"
        "          ansible_become: false\n")
    return path
