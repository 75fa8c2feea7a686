"""Smoke test of the bench harness: the load generator against a baseline echo.

At a low fixed rate on loopback nothing should be lost, so every datagram
sent must come back. Behaviour only: no timing is asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # bench/ is part of the repository, not the package

from bench.harness import BaselineServer  # noqa: E402

ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
}
HAVE_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A plain-Python blocking echo server on 127.0.0.1, as the bench runs it."""
    server = BaselineServer(
        "blocking", [sys.executable, "-m", "bench.servers.blocking", "127.0.0.1", "0", "echo"],
        cpus=None, start_timeout=10.0)
    try:
        yield server.port
    finally:
        server.stop()


def _loadgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.loadgen", *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    "impl",
    [
        pytest.param("c", marks=pytest.mark.skipif(not HAVE_CC, reason="no C compiler")),
        "python",
    ],
)
def test_loadgen_gets_every_echo_back(echo_port: int, impl: str) -> None:
    # 500/s stays far inside the server's default receive queue even if a
    # busy machine stalls it, and the generator waits (up to 5 s) for every
    # reply instead of giving up after 100 ms of silence.
    proc = _loadgen(
        "--impl", impl, "--target", f"127.0.0.1:{echo_port}", "--mode", "echo",
        "--rate", "500", "--duration", "1", "--flows", "4", "--size", "64",
        "--drain", "5", "--drain-idle", "5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["impl"] == impl
    assert report["sent"] > 0
    assert report["received"] == report["sent"]
    assert report["lost"] == 0


@pytest.mark.parametrize("impl", ["c", "python"])
def test_loadgen_refuses_non_loopback_target(impl: str) -> None:
    if impl == "c" and not HAVE_CC:
        pytest.skip("no C compiler")
    # Refused while parsing, before any socket exists: nothing is sent.
    proc = _loadgen("--impl", impl, "--target", "192.0.2.1:9", "--duration", "0.1")
    assert proc.returncode == 2
    assert "non-loopback" in proc.stderr
    assert proc.stdout == ""
