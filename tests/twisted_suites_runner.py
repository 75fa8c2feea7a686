"""Run Twisted's own UDP and names test suites under one reactor; write each test's outcome.

    python tests/twisted_suites_runner.py DATAPATH|stock OUT.json [MODULE ...]

``DATAPATH`` installs the worker's reactor (``shardudp.reactor.install``), as
a worker does, and points ``ReactorBuilder`` at our reactor for that data
path; ``stock`` installs Twisted's epoll reactor and points ``ReactorBuilder``
at it alone, the baseline ``tests/integration/test_twisted_suites.py``
compares against. OUT.json maps each test id to one of ``pass``, ``xfail``,
``skip``, ``xpass``, ``fail``, ``error`` (under ``outcomes``; the
reactor's short name is replaced by ``Reactor`` in the ids of
``ReactorBuilder`` tests so that different reactors' ids compare equal), and
counts the ports our reactor handed out by class (under ``ports``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

SUITES = (
    "twisted.test.test_udp",
    "twisted.internet.test.test_udp",
    "twisted.internet.test.test_udp_internals",
    "twisted.names.test.test_names",
    "twisted.names.test.test_client",
    "twisted.names.test.test_server",
    "twisted.names.test.test_dns",
)

STOCK = "stock"

# Ports our reactors handed out, by class name: proof the suites ran on ours.
PORTS: dict[str, int] = {}

# A test reported more than once (an error in a cleanup after a failure, say)
# keeps its worst outcome.
_RANK = {"pass": 0, "xfail": 1, "skip": 2, "xpass": 3, "fail": 4, "error": 5}


def _install(datapath: str) -> str:
    """Install the global reactor; return the FQPN ``ReactorBuilder`` should build."""
    if datapath == STOCK:
        from twisted.internet import epollreactor

        install: Any = epollreactor.install
        install()
        return "twisted.internet.epollreactor.EPollReactor"
    from shardudp import reactor as shard_reactor
    from shardudp.port import port_class

    shard_reactor.install(datapath)
    for name in ("listenUDP", "listenMulticast"):
        _count_ports(shard_reactor.ShardReactor, name)

    # ReactorBuilder builds a fresh reactor per test from a no-argument
    # callable stored as a class attribute: a class, because a plain function
    # there would be bound as a method and called with the test case.
    class ShardSuiteReactor(shard_reactor.ShardReactor):
        """The worker's reactor, its listeners on this run's data path."""

        port_cls = port_class(datapath)

    globals()["ShardSuiteReactor"] = ShardSuiteReactor
    return f"{__name__}.ShardSuiteReactor"


def _count_ports(cls: Any, name: str) -> None:
    listen = getattr(cls, name)

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        port = listen(self, *args, **kwargs)
        PORTS[type(port).__name__] = PORTS.get(type(port).__name__, 0) + 1
        return port

    setattr(cls, name, counting)


def main(argv: list[str]) -> int:
    datapath, out = argv[0], argv[1]
    modules = argv[2:] or list(SUITES)
    fqpn = _install(datapath)

    # Before any suite is imported: makeTestCaseClasses runs at import time.
    from twisted.internet.test.reactormixins import ReactorBuilder

    ReactorBuilder._reactors = [fqpn]
    short = fqpn.rsplit(".", 1)[1]

    from twisted.trial import reporter, runner

    outcomes: dict[str, str] = {}

    def record(test: Any, outcome: str) -> None:
        tid = test.id().replace(f"_{short}Tests.", "_ReactorTests.")
        old = outcomes.get(tid)
        if old is None or _RANK[outcome] > _RANK[old]:
            outcomes[tid] = outcome

    base: Any = reporter.VerboseTextReporter

    class Recorder(base):  # type: ignore[misc]
        """Prints each test as it ends (so a hang shows where) and records its outcome."""

        def addSuccess(self, test: Any) -> None:
            base.addSuccess(self, test)
            record(test, "pass")

        def addFailure(self, test: Any, fail: Any) -> None:
            base.addFailure(self, test, fail)
            record(test, "fail")

        def addError(self, test: Any, error: Any) -> None:
            base.addError(self, test, error)
            record(test, "error")

        def addSkip(self, test: Any, reason: Any) -> None:
            base.addSkip(self, test, reason)
            record(test, "skip")

        def addExpectedFailure(self, test: Any, error: Any, todo: Any = None) -> None:
            base.addExpectedFailure(self, test, error, todo)
            record(test, "xfail")

        def addUnexpectedSuccess(self, test: Any, todo: Any = None) -> None:
            base.addUnexpectedSuccess(self, test, todo)
            record(test, "xpass")

    suite = runner.TestLoader().loadByNames(modules, recurse=False)
    make_runner: Any = runner.TrialRunner
    trial = make_runner(Recorder, stream=sys.stdout,
                        workingDirectory=os.path.join(os.getcwd(), "_trial_temp"),
                        logfile="test.log")
    started = time.monotonic()
    trial.run(suite)
    with open(out, "w") as f:
        json.dump({"datapath": datapath, "seconds": time.monotonic() - started,
                   "ports": PORTS, "outcomes": outcomes}, f, indent=1, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
