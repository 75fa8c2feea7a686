"""Error types and exit codes.

Split as h11 does: ``ConfigError`` is the user's mistake (bad flags, bad
file), ``WireError`` is the peer's (a worker or control client sent bytes we
cannot accept). Anything else escaping is our own bug.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses with a meaning a supervisor (systemd, docker) can act on."""

    OK = 0
    #: The server failed at run time (e.g. a port already in use).
    ERROR = 1
    #: Bad command line or configuration, including a user, group or log file
    #: this host does not have or cannot use: nothing was bound. Restarting
    #: will not help (the systemd unit has RestartPreventExitStatus=2 3).
    USAGE = 2
    #: A worker could not boot the APP (import error, constructor raised).
    #: Restarting will not help, so the master halts instead of looping.
    BOOT = 3


class ShardUDPError(Exception):
    """Base of every error shardudp raises on purpose."""


class ConfigError(ShardUDPError):
    """The configuration (flags, environment, file) is invalid.

    ``errors`` holds every problem found, each naming its key path, so a user
    fixes them all in one pass.
    """

    def __init__(self, errors: list[str] | str) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))


class WireError(ShardUDPError):
    """A peer sent a frame that is corrupt, oversized or not in the schema."""


class StartupError(ShardUDPError):
    """The master could not start: a port in use, a socket option refused."""
