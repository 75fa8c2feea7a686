"""A listening socket in the master's selector that stops being watched while accept() fails.

The HTTP endpoint and the control socket accept on the master's loop. A
connection waiting in the backlog keeps a listener readable, so an accept()
failing for want of descriptors or memory would fail again on every turn: the
loop would spin, starving the workers' pipes. ``AcceptGate`` takes the
listener out of the selector instead, for a pause that doubles while the
failures go on, and puts it back from its owner's ``expire()``.

Imported by the control socket's client side too (``shardudp ctl``): it stays
free of h11 and the rest of the HTTP endpoint.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import selectors
import socket
from collections.abc import Callable
from typing import Final

#: The first pause after accept() fails, doubled on each failure in a row up
#: to BACKOFF_MAX: short enough that a passing shortage costs clients little,
#: long enough that a lasting one costs the loop nothing.
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 1.0
#: The same warning is logged at most once per this many seconds (with the
#: count of those held back): a failure repeating every turn must not flood the log.
WARN_INTERVAL: Final = 60.0
#: accept() failures that belong to one pending connection (accept(2): Linux
#: hands the new socket's pending network error to accept): skip it, accept on.
#: Any other failure (EMFILE, ENFILE, ENOBUFS, ENOMEM, ...) would repeat at
#: once, so it pauses the listener.
PER_CONNECTION: Final = frozenset({
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH,
})


class Throttle:
    """One kind of message, logged to ``logger`` at most once per WARN_INTERVAL."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        self.logger = logger
        self.level = level
        self.next_at = -math.inf
        self.held = 0

    def log(self, now: float, msg: str, *args: object, exc_info: bool = False) -> None:
        if now < self.next_at:
            self.held += 1
            return
        if self.held:
            msg += f" ({self.held} more like this in the last {WARN_INTERVAL:.0f}s)"
        self.logger.log(self.level, msg, *args, exc_info=exc_info, stacklevel=2)
        self.next_at = now + WARN_INTERVAL
        self.held = 0


def _strerror(exc: OSError) -> str:
    return exc.strerror or f"{type(exc).__name__}: {exc}"


class AcceptGate:
    """Watches ``listener`` in ``selector`` (calling ``on_accept``) except while paused.

    The owner calls ``accepted()`` after each accept() that succeeded,
    ``pause()`` after one that failed, bounds its select timeout by
    ``deadline`` and calls ``expire()`` once per loop turn. ``what`` names the
    listener in the log (``logger``); ``prepare`` runs just before the listener
    is watched again.
    """

    def __init__(self, what: str, listener: socket.socket, selector: selectors.BaseSelector,
                 on_accept: Callable[[int], None], logger: logging.Logger, *,
                 prepare: Callable[[], None] | None = None) -> None:
        self._what = what
        self._listener = listener
        self._selector = selector
        self._on_accept = on_accept
        self._prepare = prepare
        self._backoff = BACKOFF_MIN
        #: When the paused listener is watched again; None while it is watched
        #: (or closed).
        self._rearm_at: float | None = None
        self._warning = Throttle(logger, logging.WARNING)
        selector.register(listener, selectors.EVENT_READ, on_accept)

    @property
    def deadline(self) -> float | None:
        """When ``expire()`` watches the listener again; None unless paused."""
        return self._rearm_at

    def accepted(self) -> None:
        self._backoff = BACKOFF_MIN

    def pause(self, now: float, exc: OSError | None = None) -> None:
        """Stop watching the listener for the current back-off, then double it.

        ``exc``, the accept() failure, is logged (throttled); without it the
        caller has said what went wrong.
        """
        if exc is not None:
            self._warning.log(now, "%s cannot accept connections: %s; pausing accepts for %.2fs",
                              self._what, _strerror(exc), self._backoff)
        if self._rearm_at is None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(self._listener)
        self._rearm_at = now + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def expire(self, now: float) -> None:
        """Watch the listener again once its pause is over."""
        if self._rearm_at is None or now < self._rearm_at:
            return
        if self._prepare is not None:
            self._prepare()
        try:
            self._selector.register(self._listener, selectors.EVENT_READ, self._on_accept)
        except OSError as exc:
            # epoll_ctl out of memory, say: raising would end the master's
            # loop, so this is one more failure to back off from.
            self._warning.log(now, "%s cannot watch its socket: %s", self._what, _strerror(exc))
            self.pause(now)
        else:
            self._rearm_at = None

    def close(self) -> None:
        """Stop watching the listener for good (the owner closes it); idempotent."""
        self._rearm_at = None
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(self._listener)
