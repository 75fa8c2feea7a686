"""The master's seams: services in order, commands and actions dispatched exhaustively."""

from __future__ import annotations

import typing

from shardudp import commands, config, control, master, server, supervision
from shardudp.commands import ControlService
from shardudp.monitor import Monitor
from shardudp.pidfile import PidFile
from shardudp.poison import Poison
from shardudp.services import Announcer, Service
from shardudp.steerer import Steerer


def test_every_command_has_a_handler() -> None:
    for cmd in control.COMMANDS:
        method = getattr(ControlService, commands.handler_name(cmd), None)
        assert callable(method), f"control command {cmd!r} has no {commands.handler_name(cmd)}"
        params = set(typing.get_type_hints(method)) - {"return"}
        assert params == set(control.COMMANDS[cmd]), cmd


def test_every_action_is_carried_out() -> None:
    """The master's match ends in assert_never: a new action type without a case
    fails mypy; this checks the union and the cases name the same types."""
    union = set(typing.get_args(supervision.Action))
    source = master.Master._carry_out.__code__.co_names
    for kind in union:
        assert kind.__name__ in source, kind.__name__


def test_the_standard_services_come_in_their_documented_order() -> None:
    cfg = config.build(cli={"app": "workers.echo:Echo", "bind": ["127.0.0.1:9"], "workers": 1,
                            "pid_file": "/tmp/x.pid", "control": "/tmp/x.sock"})
    m = server.build(cfg)
    try:
        assert [type(s) for s in m.services] == [PidFile, ControlService, Steerer, Poison,
                                                 Monitor, Announcer]
        assert all(s.master is m for s in m.services)
        assert m.service(Monitor) is m.services[4]
    finally:
        m.selector.close()
        m._wake_r.close()
        m._wake_w.close()


def test_a_service_sees_every_action_after_the_master_carried_it_out() -> None:
    cfg = config.build(cli={"app": "workers.echo:Echo", "bind": ["127.0.0.1:9"], "workers": 1,
                            "control": "none"})
    seen: list[tuple[str, object]] = []

    class Probe(Service):
        def after_action(self, action: supervision.Action) -> None:
            seen.append(("service", action))

    m = master.Master(cfg, [Probe()])
    m.sup = supervision.Supervisor(1, supervision.Policy(10.0, 5.0, 8.0), 0.0)
    try:
        m.apply([supervision.Say("info", "hello")])
        assert seen == [("service", supervision.Say("info", "hello"))]
    finally:
        m.selector.close()
        m._wake_r.close()
        m._wake_w.close()
