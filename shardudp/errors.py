"""Error types and exit codes.

Split as h11 does: ``ConfigError`` is the user's mistake (bad flags, bad
file), ``WireError`` is the peer's (a worker or control client sent bytes we
cannot accept), ``BookkeepingError`` is ours (the master's own state says
something impossible). Every error shardudp raises on purpose is a
``ShardUDPError``; anything else escaping is a bug.
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
    #: The server stopped, but had to kill workers that did not stop in time
    #: (past --graceful-timeout, or a second TERM/INT): their stopProtocol may
    #: not have run and what they held was not drained.
    FORCED = 4


class ShardUDPError(Exception):
    """Base of every error shardudp raises on purpose."""


class ConfigError(ShardUDPError):
    """The configuration (flags, environment, file) is invalid.

    ``errors`` holds every problem found, each naming its key path, so a user
    fixes them all in one pass. ``partial`` is what was valid of the
    configuration (a ``config.ServerConfig`` with defaults where values were
    bad), if it got that far: ``check`` goes on with it to report the APPs'
    problems together with these.
    """

    def __init__(self, errors: list[str] | str, partial: object = None) -> None:
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        self.partial = partial
        super().__init__("; ".join(self.errors))


class WireError(ShardUDPError):
    """A peer sent a frame that is corrupt, oversized or not in the schema."""


class StartupError(ShardUDPError):
    """The master could not start: a port in use, a socket option refused."""


class BookkeepingError(ShardUDPError):
    """The master's own records contradict themselves: a bug in shardudp, not the peer's fault."""


class ShardedSocketError(ShardUDPError, RuntimeError):
    """An operation (``connect()``) that would take a shared socket out of its reuseport group.

    Raised to the APP by the worker's transport; a ``RuntimeError`` as well,
    as it always was.
    """
