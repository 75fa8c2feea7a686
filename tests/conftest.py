from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib
import os
import signal

import pytest
from harness import STARTED_SESSIONS, session_pids


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """Every server a test starts must be gone (master and workers) after it."""
    before = set(STARTED_SESSIONS)
    yield
    leaked = {sid: session_pids(sid) for sid in STARTED_SESSIONS - before}
    leaked = {sid: pids for sid, pids in leaked.items() if pids}
    for pids in leaked.values():
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not leaked, f"processes left behind: {leaked}"
