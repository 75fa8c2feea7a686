"""The master's composition seam: services with no-op hooks.

Everything that hangs off the master (the pid file, the control socket, the
metrics endpoint, systemd notification, and the mechanisms that come next)
is a ``Service``: an object with the hooks below, each a no-op unless
overridden, registered with the master in a list (trio's ``Instrument``,
gunicorn's server hooks). Nobody subclasses the master.

The master calls every hook on every service, in list order, from its one
thread. ``server.build`` wires the standard services and documents why they
come in that order.

Hooks, in the order a server's life calls them:

``attach(master)``
    At construction. The default keeps ``self.master``.
``preflight()``
    Before any UDP socket is bound: claim what must be exclusive (pid file,
    control socket). Raise ``StartupError`` to refuse to start; ``close`` is
    called on every service then.
``started()``
    Sockets bound and the supervisor created, before the first worker is forked.
``for_new_worker(slot)``
    Just before a worker is forked for ``slot``: messages it must apply before
    it reads its first datagram (they travel in its spec, not its pipe).
``after_action(action)``
    After the master carried out one supervisor action.
``on_message(child, msg, now)``
    A worker's message that the master does not handle itself; return True
    if this service took it. Raise ``WireError`` to treat the worker as faulty.
``after_turn(now)``
    Once per loop turn, after events and deadlines were handled.
``deadline()``
    The earliest monotonic time at which the service needs a turn, or None;
    the master's select never sleeps past it.
``close()``
    Every worker is gone and the sockets are about to close, or the start
    failed. Must be idempotent.

A service also declares ``fds``, the most file descriptors it may hold at
once: the master counts them in the fd budget it checks at start, so that
however busy the services are, a worker can always be respawned.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import notify, supervision, wire

if TYPE_CHECKING:
    from .master import Child, Master

log = logging.getLogger("shardudp.master")


class Service:
    """Base of everything registered with the master; every hook is a no-op."""

    master: Master
    #: The most file descriptors this service may hold at once.
    fds: int = 0

    def attach(self, master: Master) -> None:
        self.master = master

    def preflight(self) -> None:
        pass

    def started(self) -> None:
        pass

    def for_new_worker(self, slot: int) -> list[wire.Message]:
        return []

    def after_action(self, action: supervision.Action) -> None:
        pass

    def on_message(self, child: Child, msg: wire.Message, now: float) -> bool:
        return False

    def after_turn(self, now: float) -> None:
        pass

    def deadline(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class Announcer(Service):
    """Says when the server is ready or stopping: the log line and systemd's sd_notify.

    Registered after the metrics service, so that whoever acts on "all N
    workers ready" or READY=1 (a test, systemd, a deploy script) already
    finds /healthz at 200.
    """

    def after_action(self, action: supervision.Action) -> None:
        if isinstance(action, supervision.AllReady):
            assert self.master.sup is not None
            log.info("all %d workers ready", self.master.sup.size)
            notify.notify("READY=1")
        elif isinstance(action, supervision.Stopping):
            notify.notify("STOPPING=1")
