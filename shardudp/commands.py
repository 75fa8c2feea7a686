"""The control socket as a service: each command a ``cmd_<name>`` method.

``control.COMMANDS`` declares the commands and their arguments (and
validates requests); this service answers them. A command named ``a-b``
is answered by ``cmd_a_b``, as a signal ``SIGX`` is handled by the master's
``handle_x``. ``test_every_command_has_a_handler`` pins that every declared
command has one.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from . import control, logs
from .config import BY_KEY
from .monitor import Monitor
from .services import Service
from .steerer import Steerer

if TYPE_CHECKING:
    from .master import Master

log = logging.getLogger("shardudp.master")


def handler_name(cmd: str) -> str:
    """The method answering control command ``cmd``."""
    return "cmd_" + cmd.replace("-", "_")


class ControlService(Service):
    """Owns the control socket (claimed in ``preflight``) and answers its commands.

    ``monitor`` supplies the traffic numbers and health of ``status``.
    """

    #: Its listening socket, its clients and one being accepted to evict another.
    fds = control.MAX_CLIENTS + 2

    def __init__(self, path: str, monitor: Monitor | None = None) -> None:
        self.path = path
        self.monitor = monitor
        self.server: control.ControlServer | None = None

    def preflight(self) -> None:
        self.server = control.ControlServer(self.path, self.handle, self.master.selector,
                                            self.master.clock)
        log.info("control socket %s", self.path)

    def after_turn(self, now: float) -> None:
        if self.server is not None:
            self.server.expire()

    def deadline(self) -> float | None:
        return self.server.deadline() if self.server is not None else None

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def handle(self, req: control.Request) -> Any:
        """Answer one validated request (``control.ControlServer`` calls this)."""
        method = getattr(self, handler_name(req.cmd), None)
        if method is None:  # declared in COMMANDS, but nobody here answers it: our bug
            raise control.ControlError(f"unhandled command {req.cmd!r}")
        return method(**req.args)

    # -- the commands

    def cmd_status(self) -> dict[str, Any]:
        return status(self.master, self.monitor)

    def cmd_scale(self, n: int) -> dict[str, int]:
        sup = self.master.sup
        assert sup is not None
        try:
            n = BY_KEY["workers"].parse(n)
        except ValueError as exc:
            raise control.ControlError(f"scale: {exc}") from None
        self.master.apply(sup.scale(n, self.master.clock()))
        return {"workers": n}

    def cmd_reload(self) -> str:
        sup = self.master.sup
        assert sup is not None
        self.master.apply(sup.reload(self.master.clock()))
        return "reloading"

    def cmd_stop(self) -> str:
        self.master.shutdown("stop requested on the control socket")
        return "stopping"

    def cmd_reopen_logs(self) -> str:
        return "reopened" if logs.reopen() else "logging to stderr: nothing to reopen"


def status(master: Master, monitor: Monitor | None) -> dict[str, Any]:
    """What ``shardudp status`` shows: the master, each slot, and drops by listener."""
    sup = master.sup
    assert sup is not None
    now = master.clock()
    traffic = monitor.traffic(now) if monitor is not None else {}
    steerer = master.service(Steerer)
    not_serving = steerer.not_serving() if steerer is not None else {}
    steered = steerer.steered() if steerer is not None else {}
    silent = monitor.silent if monitor is not None else frozenset()
    counting = monitor.counting if monitor is not None else False
    # The exporter's numbers: per slot what its own sockets dropped; the
    # listener total adds what belongs to no one slot (single, shard).
    drops: dict[int, int] = collections.defaultdict(int)
    listener_drops: dict[str, int] = collections.defaultdict(int)
    for (label, name), n in master.sockets.kernel_stats().drops.items():
        listener_drops[name] += n
        if label.isdigit():
            drops[int(label)] += n
    slots = []
    for index, sl in sorted(sup.slots.items()):
        w = sup.workers.get(sl.current) if sl.current is not None else None
        t = traffic.get(index)
        slots.append({
            "slot": index,
            "pid": w.pid if w else None,
            "state": w.state.value if w else "down",
            "age": round(now - w.started, 3) if w else None,
            # None, not 0, when nothing counts: zero would read as no traffic.
            "rx": t.rx if t else None,
            "tx": t.tx if t else None,
            "rx_rate": t.rx_rate if t else None,
            "drops": drops.get(index, 0),
            "heartbeat_age": round(now - w.last_seen, 3) if w else None,
            "retiring": sl.retiring,
            # listener -> why no worker reads the slot's sockets of it.
            "not_serving": {name: why.value for (slot, name), why in sorted(not_serving.items())
                            if slot == index},
            "steered": sorted(name for slot, name in steered if slot == index),
        })
    return {
        "master_pid": master.pid,
        "uptime": round(now - master.started_at, 3),
        "workers": sup.size,
        "healthy": sup.healthy() and not silent and not not_serving,
        "silent_slots": sorted(silent),
        "counting": counting,
        "stopping": sup.stopping,
        "listeners": [lst.name for lst in master.cfg.listeners],
        "metrics_port": monitor.metrics_port if monitor is not None else None,
        "slots": slots,
        "listener_drops": dict(listener_drops),
        # What the steering program computes (shardudp.steering), for tools
        # and tests that want to know where a flow goes: the secret seed and
        # each bucket's home slot. Only the master's own user can read this.
        "steering": None if steerer is None or steerer.table is None or not steerer.programs
        else {"seed": steerer.seed, "table": list(steerer.table.owners)},
    }
