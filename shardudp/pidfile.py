"""The pid file: claimed before anything is bound, locked for the master's life.

A service registered first: of two servers started together, the one that
loses the pid file is refused having bound nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import StartupError
from .services import Service


class PidFile(Service):
    """Owns ``--pid-file``: written and locked in ``preflight``, removed in ``close``."""

    fds = 1

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def preflight(self) -> None:
        self._fd = claim(self.path, self.master.pid)

    def close(self) -> None:
        if self._fd is not None:
            release(self.path, self._fd)
            self._fd = None


def claim(path: str, pid: int) -> int:
    """Write ``pid`` to ``path`` and lock it for the master's life; return the fd.

    The lock makes check-and-write one step: of two servers started together
    one gets it, the other is refused. A file nobody locks is stale (its server
    is gone) and is taken over, unless it names a live process.
    """
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
    for _ in range(3):  # a server exiting may unlink the file between open and lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise StartupError(f"--pid-file {path}: process {holder or '(starting)'} is still "
                               "running") from None
        if not _same_file(fd, path):
            os.close(fd)
            continue
        holder = _read_pid(fd)
        if holder is not None and holder != pid and _alive(holder):
            os.close(fd)  # e.g. a server from before pid files were locked
            raise StartupError(f"--pid-file {path}: process {holder} is still running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)
        return fd
    raise StartupError(f"--pid-file {path}: replaced while we claimed it; is another server "
                       "starting?")


def release(path: str, fd: int) -> None:
    """Remove the pid file if it is still ours, and drop its lock."""

    if _same_file(fd, path):
        with contextlib.suppress(OSError):
            os.unlink(path)
    os.close(fd)  # drops the lock


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by someone else
    return True
