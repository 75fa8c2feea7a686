"""shardudp: run Twisted DatagramProtocols on every core.

The public surface is what this module lists; everything else is private
and may change. Layout, for readers of the source:

- pure decisions (no I/O; ``tests/unit/test_purity.py`` pins it):
  ``config`` (settings, declared once), ``wire`` (the pipe protocol),
  ``supervision`` (when workers start, stop, are replaced), ``metrics``,
  ``stats`` and ``drops`` (counting);
- the master, an I/O shell: ``master`` (fork, signals, the loop) with its
  ``services`` (``pidfile``, ``commands`` over ``control``, ``monitor`` over
  ``exporter``), wired by ``server``; its sockets: ``socketset``,
  ``sockets``, ``sockstats``;
- the worker, after fork: ``worker``, ``process`` (hygiene, privileges),
  ``apploader``, ``pipewriter``, ``reactor``, ``port`` (the data paths, with
  ``membership``, ``_pybatch`` and the C ``_batchio``), ``datapaths``;
- ``cli``, the only place that exits.
"""

from __future__ import annotations

# isort: off
# First of all: as root, nothing may be imported from a path another user can write.
from . import _pathguard  # noqa: F401
# isort: on

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .apploader import AppError
from .config import SETTINGS, Address, Listener, ServerConfig, Setting
from .config import build as build_config
from .errors import (
    BookkeepingError,
    ConfigError,
    ExitCode,
    ShardedSocketError,
    ShardUDPError,
    StartupError,
    WireError,
)

if TYPE_CHECKING:
    from .master import Master
    from .server import build as build_server
    from .services import Service

__all__ = [
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

#: Loaded on first use: importing a pure module (``shardudp.wire``) must not
#: pull in the master's sockets, signals and selectors.
_LAZY = {"Master": ("master", "Master"), "build_server": ("server", "build"),
         "Service": ("services", "Service")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'shardudp' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
