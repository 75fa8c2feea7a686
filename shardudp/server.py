"""The standard server: the master with its services, wired in their fixed order.

Order matters where one service acts on what another did in the same hook:

1. ``PidFile`` (``--pid-file``): claimed first, so a second server started
   with the same pid file is refused before it claims anything else.
2. ``ControlService`` (``--control``): the control socket, claimed before any
   UDP socket is bound, so a clash is refused having bound nothing.
3. ``Steerer``: decides which slots are read and steers flows around the
   others; before the monitor, so what it publishes is what the kernel does.
4. ``Poison``: hears which source a worker died on, quarantines it after two
   deaths and keeps every worker told.
5. ``MemoryGuard`` (``max_worker_memory``): replaces a worker over the limit,
   its successor first.
6. ``Monitor``: aggregates worker reports and publishes the view that
   /metrics and /healthz serve; it republishes on ``AllReady`` before...
7. ``Announcer`` logs "all N workers ready" and tells systemd READY=1, so
   whoever acts on either finds /healthz at 200.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import control
from .commands import ControlService
from .config import ServerConfig
from .master import Master
from .memguard import MemoryGuard
from .monitor import Monitor
from .pidfile import PidFile
from .poison import Poison
from .services import Announcer, Service
from .steerer import Steerer


def build(cfg: ServerConfig, *, clock: Callable[[], float] = time.monotonic) -> Master:
    """A master for ``cfg`` with the standard services registered in order."""
    monitor = Monitor(metrics=cfg.metrics is not None)
    services: list[Service] = []
    if cfg.pid_file:
        services.append(PidFile(cfg.pid_file))
    path = control.resolve_path(cfg.control)
    if path is not None:
        services.append(ControlService(path, monitor))
    services += [Steerer(cfg.steer_grace, programs=cfg.steering), Poison(cfg.quarantine)]
    if cfg.max_worker_memory:
        services.append(MemoryGuard(cfg.max_worker_memory))
    services += [monitor, Announcer()]
    return Master(cfg, services, clock=clock)
