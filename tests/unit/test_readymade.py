"""The ready-made apps' short names: declared once, expanded by the app setting."""

from __future__ import annotations

import importlib

import pytest

from shardudp import config, readymade


@pytest.mark.parametrize(("name", "full"), sorted(readymade.APPS.items()))
def test_every_short_name_names_an_installed_protocol(name: str, full: str) -> None:
    from twisted.internet.protocol import DatagramProtocol

    module, _, attr = full.partition(":")
    assert module.startswith("shardudp.workers.")
    assert issubclass(getattr(importlib.import_module(module), attr), DatagramProtocol)
    cfg = config.build(cli={"app": name, "bind": ["127.0.0.1:9"]})
    assert cfg.listeners[0].app == full
    assert cfg.to_dict()["listener"][0]["app"] == full


def test_full_paths_and_anything_else_pass_unchanged() -> None:
    assert readymade.expand("shardudp.workers.echo:Echo") == "shardudp.workers.echo:Echo"
    assert readymade.expand("workers.echo:Echo") == "workers.echo:Echo"  # the user's, if any
    assert readymade.expand("myapp:Echo") == "myapp:Echo"


@pytest.mark.parametrize(("app", "hint"), [
    ("workers.echo:Echo", "write echo (or shardudp.workers.echo:Echo)"),
    ("workers.multicast_ping:MulticastPingClient",
     "write multicast_ping_client (or shardudp.workers.multicast_ping:MulticastPingClient)"),
    ("workers.helloer:OpensHelloer", "write shardudp.workers.helloer:OpensHelloer"),
    ("workers.mine:App", None),
    ("myworkers.echo:Echo", None),
])
def test_the_old_spelling_gets_a_hint(app: str, hint: str | None) -> None:
    got = readymade.moved_hint(app)
    assert (got is None) if hint is None else (got is not None and got.endswith(hint)), got
