"""shardudp: run Twisted DatagramProtocols on every core.

The public surface is what this module lists; everything else is private.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import SETTINGS, Address, Listener, ServerConfig, Setting
from .config import build as build_config
from .errors import ConfigError, ExitCode, ShardUDPError, StartupError, WireError

__all__ = [
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
