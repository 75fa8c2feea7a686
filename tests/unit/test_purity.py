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
            "AppError",
            "BookkeepingError",
            "ConfigError",
            "ExitCode",
            "Listener",
            "Master",
            "ServerConfig",
            "Service",
            "Setting",
            "ShardUDPError",
            "ShardedSocketError",
            "StartupError",
            "WireError",
            "__version__",
            "build_config",
            "build_server",
        ]
    )
    for name in shardudp.__all__:
        assert hasattr(shardudp, name)


def test_every_public_exception_is_a_shardudp_error_and_exported() -> None:
    import shardudp

    raised = [getattr(shardudp, n) for n in shardudp.__all__
              if isinstance(getattr(shardudp, n), type)
              and issubclass(getattr(shardudp, n), BaseException)]
    assert raised and all(issubclass(e, shardudp.ShardUDPError) for e in raised)
    from shardudp import errors

    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert name in shardudp.__all__, name


def test_importing_the_cli_imports_no_twisted() -> None:
    """``check`` imports APPs in a forked child: the command itself stays Twisted-free."""
    code = "import sys, shardudp.cli; print(any(m.startswith('twisted') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
