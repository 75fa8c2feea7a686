"""Baseline servers the bench compares shardudp against.

Each is a single process taking ``HOST PORT echo|sink`` and printing
``READY <port>``; see common.py. ``baselines()`` lists the ones that can run
here (uvloop only when importable, the C server only when it compiles).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

from bench.build import BuildError, build


@dataclass(frozen=True)
class Baseline:
    name: str
    title: str
    argv: tuple[str, ...]  # the command before HOST PORT MODE

    def command(self, host: str, mode: str, rcvbuf: int = 0) -> list[str]:
        return [*self.argv, host, "0", mode, *(["--rcvbuf", str(rcvbuf)] if rcvbuf else [])]


def _py(module: str, *extra: str) -> tuple[str, ...]:
    return (sys.executable, "-m", module, *extra)


def baselines() -> tuple[list[Baseline], dict[str, str]]:
    """The runnable baselines, and why each missing one is missing."""
    found = [
        Baseline(
            "twisted", "Twisted listenUDP (stock, 1 process)", _py("bench.servers.twisted_echo")
        ),
        Baseline(
            "asyncio", "asyncio DatagramProtocol", _py("bench.servers.aio", "--loop", "asyncio")
        ),
    ]
    missing: dict[str, str] = {}
    if importlib.util.find_spec("uvloop") is not None:
        found.append(
            Baseline(
                "uvloop", "uvloop DatagramProtocol", _py("bench.servers.aio", "--loop", "uvloop")
            )
        )
    else:
        missing["uvloop"] = "uvloop is not importable (pip install 'shardudp[bench]')"
    try:
        found.append(Baseline("c", "C recvmmsg/sendmmsg (one-core limit)", (str(build("c_echo")),)))
    except BuildError as e:
        missing["c"] = str(e)
    found.append(
        Baseline("blocking", "Python blocking recvfrom/sendto", _py("bench.servers.blocking"))
    )
    return found, missing
