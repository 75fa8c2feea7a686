"""The pid file: claimed before anything is bound, locked for the master's life.

A service registered first: of two servers started together, the one that
loses the pid file is refused having bound nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from ._pathguard import writable_by_others
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
    is gone) and is replaced, unless it names a live process. The file is
    never opened through a symbolic link, and is replaced atomically (written
    beside it, then renamed over it), so a planted link cannot make the master
    (root, perhaps) write elsewhere. As root, its directory must be one that
    no other user can write.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
    _check_directory(path, target.parent)
    with _directory_lock(path, target.parent):
        _refuse_live(path, pid)
        fd = _write_beside(path, pid)
        try:
            os.rename(_tmp_of(path, pid), path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(_tmp_of(path, pid))
            raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
        return fd


def _check_directory(path: str, directory: Path) -> None:
    """As root, refuse a directory another user could write into (plant a link there)."""
    if os.geteuid() != 0:
        return
    if writable_by_others(str(directory)):
        raise StartupError(f"--pid-file {path}: its directory {directory} (or one above "
                           "it) can be changed by other users; as root, keep the pid file in "
                           "a directory only root can write (e.g. /run/shardudp)")


@contextlib.contextmanager
def _directory_lock(path: str, directory: Path) -> Iterator[None]:
    """Serialise claims of one directory's pid files (held for microseconds)."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _ in range(200):
            try:
                fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.005)  # another server claims a pid file here right now
        else:
            raise StartupError(f"--pid-file {path}: {directory} stayed locked for a second; "
                               "is another server starting?")
        yield
    finally:
        os.close(dfd)


def _refuse_live(path: str, pid: int) -> None:
    """Refuse a symbolic link, something not a file, or a pid file a live server holds."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StartupError(f"--pid-file {path} is a symbolic link: refusing to follow it "
                               "(remove it; a pid file is never a link)") from None
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StartupError(f"--pid-file {path} exists and is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            raise StartupError(f"--pid-file {path}: process {holder or '(starting)'} is still "
                               "running") from None
        holder = _read_pid(fd)
        if holder is not None and holder != pid and _alive(holder):
            # e.g. a server from before pid files were locked
            raise StartupError(f"--pid-file {path}: process {holder} is still running")
    finally:
        os.close(fd)


def _tmp_of(path: str, pid: int) -> str:
    return f"{path}.{pid}.new"


def _write_beside(path: str, pid: int) -> int:
    """A new, locked file next to ``path`` holding ``pid``; its fd."""
    tmp = _tmp_of(path, pid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crashed start of a process with our pid
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
    except OSError as exc:
        raise StartupError(f"--pid-file {path}: {exc.strerror}") from None
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{pid}\n".encode())
    return fd


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
