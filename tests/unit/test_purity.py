"""The sans-I/O core must stay pure: no sockets, processes, clock or Twisted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE = [
    "shardudp.wire",
    "shardudp.supervision",
    "shardudp.config",
    "shardudp.stats",
    "shardudp.metrics",
    "shardudp.drops",
]
FORBIDDEN = {"socket", "selectors", "signal", "time", "twisted", "subprocess", "threading"}


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, json; before = set(sys.modules); import {module}; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = {m.split(".")[0] for m in json.loads(out)}
    assert not loaded & FORBIDDEN, loaded & FORBIDDEN


def test_master_never_installs_a_reactor_even_after_preloading() -> None:
    code = (
        "import sys; import shardudp.cli, shardudp.master, shardudp.server; "
        "shardudp.master.preload_worker_modules(); "
        "print('twisted.internet.reactor' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "False"


def test_public_api_is_pinned() -> None:
    import shardudp

    assert sorted(shardudp.__all__) == sorted(
        [
            "SETTINGS",
            "Address",
            "ConfigError",
            "ExitCode",
            "Listener",
            "ServerConfig",
            "Setting",
            "ShardUDPError",
            "StartupError",
            "WireError",
            "__version__",
            "build_config",
        ]
    )
    for name in shardudp.__all__:
        assert hasattr(shardudp, name)
