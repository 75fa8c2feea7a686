"""Twisted's own UDP and names test suites, run against our ports.

A user's protocol talks to our port, not Twisted's, so Twisted's tests of that
contract are the fairest judge. ``twisted_suites_runner.py`` runs the suites
in a subprocess per data path, under the worker's reactor (and with
``ReactorBuilder`` building our reactor), and once more under stock Twisted's
epoll reactor on the same machine; a test fails here when stock passes it and
we do not. Comparing with stock, rather than demanding a clean run, keeps out
what this host cannot do at all (no IPv6, no outside network).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from twisted_suites_runner import STOCK, SUITES

from shardudp import datapaths
from shardudp.port import port_class

pytestmark = pytest.mark.integration

RUNNER = Path(__file__).resolve().parents[1] / "twisted_suites_runner.py"
REPO = Path(__file__).resolve().parents[2]
# All runs together take about 3 s on a 2-core machine (7 s with the machine
# doubly loaded); a run that takes this long is hung, not slow.
TIMEOUT = 60.0
# Outcomes that count as passing; a stock xfail must not become our failure.
OK = frozenset({"pass", "xfail"})
# How much of a failed run's output goes into the assertion message.
TAIL = 12000

# With SHARDUDP_REQUIRE_C=1 (CI after building the extension) a missing C
# data path is run anyway, so its runner fails saying why, instead of a skip.
_SKIPPED = {dp: why for dp, why in datapaths.missing().items()
            if not (dp == "c" and os.environ.get("SHARDUDP_REQUIRE_C"))}
RUNNABLE = [dp for dp in datapaths.NAMES if dp not in _SKIPPED]


@dataclass
class Run:
    """One runner subprocess: its outcomes once done, and its output for diagnosis."""

    name: str
    log: Path
    out: Path
    seconds: float = 0.0
    data: dict[str, Any] | None = None

    def tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text[-TAIL:]

    def summary(self) -> str:
        """Trial's closing report (each problem's traceback), without the per-test lines."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        start = text.find("\n" + "=" * 79 + "\n")
        return (text[start + 1:] if start >= 0 else text)[-TAIL:]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    # The runner leads its own process group: anything it started goes too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_all(names: list[str], base: Path) -> dict[str, Run]:
    """Run the runner once per name, all at once; fail with the output of any that failed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    runs: dict[str, Run] = {}
    procs: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    try:
        for name in names:
            cwd = base / name
            cwd.mkdir()
            run = runs[name] = Run(name, cwd / "output.txt", cwd / "outcomes.json")
            with run.log.open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, str(RUNNER), name, str(run.out)], cwd=cwd, env=env,
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            procs[name] = (proc, time.monotonic())
        deadline = time.monotonic() + TIMEOUT
        problems = []
        pending = dict(procs)
        # Polled, not waited on one by one, so each run's time is its own.
        while pending and time.monotonic() < deadline:
            for name, (proc, started) in list(pending.items()):
                code = proc.poll()
                if code is None:
                    continue
                del pending[name]
                run = runs[name]
                run.seconds = time.monotonic() - started
                if code != 0 or not run.out.exists():
                    problems.append(f"{name}: runner exited with {code}; output:\n{run.tail()}")
                else:
                    run.data = json.loads(run.out.read_text())
            time.sleep(0.05)
        for name, (proc, _) in pending.items():
            _kill(proc)
            problems.append(f"{name}: still running after {TIMEOUT:g}s, killed; "
                            f"output:\n{runs[name].tail()}")
        if problems:
            pytest.fail("\n\n".join(problems), pytrace=False)
        return runs
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                _kill(proc)


@pytest.fixture(scope="module")
def suite_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Run]]:
    started = time.monotonic()
    runs = _run_all([STOCK, *RUNNABLE], tmp_path_factory.mktemp("twisted-suites"))
    took = ", ".join(f"{r.name} {r.seconds:.1f}s" for r in runs.values())
    print(f"Twisted suites: {time.monotonic() - started:.1f}s in all ({took})")
    yield runs


def _outcomes(run: Run) -> dict[str, str]:
    assert run.data is not None
    outcomes: dict[str, str] = run.data["outcomes"]
    return outcomes


def test_stock_baseline_ran_every_suite(suite_runs: dict[str, Run]) -> None:
    """Guard the comparison: a suite that stock could not even load would compare as nothing."""
    stock = _outcomes(suite_runs[STOCK])
    for suite in SUITES:
        passed = [t for t, o in stock.items() if t.startswith(suite + ".") and o in OK]
        assert passed, f"stock Twisted passed no test of {suite}:\n{suite_runs[STOCK].tail()}"


@pytest.mark.parametrize("datapath", [
    pytest.param(dp, marks=pytest.mark.skipif(dp in _SKIPPED, reason=_SKIPPED.get(dp, "")))
    for dp in datapaths.NAMES
])
def test_twisted_suites_pass_as_under_stock(suite_runs: dict[str, Run], datapath: str) -> None:
    run = suite_runs[datapath]
    assert run.data is not None
    # Without this a runner that silently fell back to stock ports would pass.
    assert run.data["ports"], "the suites opened no port through our reactor"
    assert set(run.data["ports"]) == {port_class(datapath).__name__}, run.data["ports"]
    stock = _outcomes(suite_runs[STOCK])
    ours = _outcomes(run)
    worse = sorted(t for t, o in stock.items() if o in OK and ours.get(t) not in OK)
    if worse:
        listing = "\n".join(f"  {t}: {ours.get(t, 'not run')}" for t in worse)
        pytest.fail(f"{len(worse)} test(s) that stock Twisted's epoll reactor passes do not "
                    f"pass on datapath {datapath}:\n{listing}\n\nrunner output "
                    f"({run.log}):\n{run.summary()}", pytrace=False)
