"""The ready-made apps and their short names, declared once. Pure: no I/O.

The repository's ``workers/`` folder installs as the package
``shardudp.workers`` (a top-level ``workers`` package would shadow a user's own
one, and theirs ours). ``shardudp run echo`` is short for
``shardudp run shardudp.workers.echo:Echo``: the ``app`` setting's parser
expands a short name here, so workers, ``check``, the start line and
``--print-config`` all see the full path, which works too.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

#: Where the ready-made apps live once installed.
PACKAGE: Final = "shardudp.workers"

#: Short name -> MODULE:ATTR.
APPS: Final[Mapping[str, str]] = MappingProxyType({
    "echo": f"{PACKAGE}.echo:Echo",
    "sink": f"{PACKAGE}.sink:Sink",
    "helloer": f"{PACKAGE}.helloer:Helloer",
    "multicast_ping": f"{PACKAGE}.multicast_ping:MulticastPingPong",
    "multicast_ping_client": f"{PACKAGE}.multicast_ping:MulticastPingClient",
})

#: How the ready-made apps were spelt before they moved into shardudp's namespace.
_OLD_PREFIX: Final = "workers."


def expand(app: str) -> str:
    """``app`` as MODULE:ATTR: a short name expanded, anything else unchanged."""
    return APPS.get(app, app)


def moved_hint(app: str) -> str | None:
    """What to write instead of ``app``, if it is an old spelling of a ready-made app
    (``workers.echo:Echo``), for an error that could not import it. A user's own
    ``workers`` package that imports is never second-guessed."""
    if not app.startswith(_OLD_PREFIX):
        return None
    new = PACKAGE + "." + app.removeprefix(_OLD_PREFIX)
    short = next((name for name, full in APPS.items() if full == new), None)
    if short is None:
        module = new.partition(":")[0]
        if not any(full.partition(":")[0] == module for full in APPS.values()):
            return None
        return f"the ready-made apps moved into shardudp: write {new}"
    return f"the ready-made apps moved into shardudp: write {short} (or {new})"
