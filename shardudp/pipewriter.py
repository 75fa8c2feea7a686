"""The worker's end of its pipe to the master: frames written without ever blocking."""

from __future__ import annotations

import collections
import os
import select
import threading
from collections.abc import Callable
from typing import Final

from . import wire

#: Pending pipe bytes past which periodic frames are dropped, not queued:
#: they are cumulative, so the next one supersedes a lost one.
PIPE_BACKLOG: Final = 256 * 1024


class PipeWriter:
    """Non-blocking frames to the master; never wedges the reactor.

    Thread-safe: log records may come from any thread. ``on_error`` hears of
    a write error other than EAGAIN once; the writer is dead afterwards.

    A finalizer (Twisted's "Unhandled error in Deferred") or a signal handler
    may log, and so call ``send`` again, while this thread is inside it. Frames
    are therefore encoded before any lock is taken, and queued without one;
    a re-entrant ``flush`` leaves the writing to the call it interrupted,
    instead of waiting forever for the lock that call holds.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.broken = False
        self.on_error: Callable[[OSError], None] | None = None
        self._queue: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()
        self._inside = threading.local()
        os.set_blocking(fd, False)

    def send(self, msg: wire.Message, *, droppable: bool = False,
             backlog: int = PIPE_BACKLOG) -> bool:
        """Queue and try to write ``msg``; False if it was dropped."""
        if self.broken or (droppable and len(self.buf) > backlog):
            return False  # before encoding: a log flood must not pay for what it drops
        self._queue.append(wire.encode(msg))
        self.flush()
        return True

    def flush(self) -> None:
        if getattr(self._inside, "flushing", False):
            return  # re-entered on this thread: the flush it interrupted (or the next) writes
        # Set before taking the lock: a handler running while we wait for it
        # must not wait too.
        self._inside.flushing = True
        try:
            with self._lock:
                error = self._flush_locked()
        finally:
            self._inside.flushing = False
        if error is not None and self.on_error is not None:
            self.on_error(error)

    def _flush_locked(self) -> OSError | None:
        while not self.broken:
            while self._queue:
                self.buf += self._queue.popleft()
            if not self.buf:
                return None
            try:
                n = os.write(self.fd, self.buf)
            except BlockingIOError:
                return None
            except OSError as exc:
                self.broken = True
                self.buf.clear()
                self._queue.clear()
                return exc
            del self.buf[:n]
        return None

    def flush_blocking(self, timeout: float) -> None:
        deadline_polls = max(1, int(timeout / 0.05))
        for _ in range(deadline_polls):
            self.flush()
            if not (self.buf or self._queue) or self.broken:
                return
            select.select([], [self.fd], [], 0.05)
