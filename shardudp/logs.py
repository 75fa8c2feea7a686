"""Logging for the master and its workers.

The master's records go to stderr or a file through ``_OutputHandler``. The
master thread only formats a record and queues its bytes; one writer thread
does every write(2). Whoever reads that output (a terminal, a FIFO, journald,
a disk) may stop reading, and a master blocked in write(2) stops supervising:
so the queue is bounded, a record that does not fit is dropped and counted
(``dropped()``), and once the output drains a line says how many were lost.

A worker has no handler of its own: each record becomes a ``wire.Log`` frame
on the worker's own pipe, and the master re-emits it (``emit_worker``) tagged
with the slot and pid it knows the pipe belongs to. A pipe per worker means a
worker killed mid-write can only lose its own records; frames are sent
non-blocking and dropped (and counted) when the pipe is backed up, so logging
never stalls a worker, and no thread is involved on the worker's side.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from . import wire

FORMAT: Final = "%(asctime)s [%(process)d] [%(slot)s] %(levelname)s %(name)s: %(message)s"
#: Timestamps past this (year 2286) are not a worker's clock but garbage.
_MAX_CREATED: Final = 1e10

#: Bytes of formatted lines the master holds for an output that is not
#: draining: thousands of lines, so a terminal or journald that stalls for a
#: moment loses nothing, yet an output nobody reads costs the master no more.
QUEUE_BYTES: Final = 1 << 20
#: A full queue takes records again only once it is down to this: one
#: "dropped" line per stall, not one per pipe-buffer-ful the reader takes.
_RESUME_BYTES: Final = QUEUE_BYTES // 2
#: Longest line queued, cut beyond: a record always fits an empty queue (so a
#: queue refusing records always holds lines the writer is working on), and
#: one runaway message cannot take the room of every other record.
RECORD_MAX: Final = 64 * 1024
#: Writes up to this size to a pipe are atomic: the master's lines stay whole
#: among what workers print() to the same pipe. Larger writes would save little.
_CHUNK: Final = select.PIPE_BUF
#: How long logging.shutdown() at interpreter exit waits for queued lines.
EXIT_FLUSH_TIMEOUT: Final = 1.0
_CUT: Final = f" [cut at {RECORD_MAX} bytes]".encode()

_slot = "master"
_base_factory = logging.getLogRecordFactory()
_handler: logging.Handler | None = None


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.slot = _slot
    return record


def _line(text: str) -> bytes:
    """``text`` as one output line of at most ``RECORD_MAX`` bytes plus the newline."""
    # Lone surrogates (os.fsdecode of a non-UTF-8 name) escaped as a worker's are.
    data = text.encode("utf-8", "backslashreplace")
    if len(data) > RECORD_MAX:
        # "ignore" drops the character the cut went through, not the line.
        data = data[:RECORD_MAX - len(_CUT)].decode("utf-8", "ignore").encode() + _CUT
    return data + b"\n"


def _open_log(path: str) -> int:
    # What FileHandler(path, "a") opened, as a bare fd for the writer thread.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        # As open(path, "a") does: a file that cannot even seek (/proc/version)
        # will not take lines either, and is refused now rather than drop all.
        os.lseek(fd, 0, os.SEEK_END)
    except OSError as exc:
        if exc.errno != errno.ESPIPE:  # a FIFO or a pipe is a fine output
            os.close(fd)
            raise
    return fd


def _write_all(fd: int, data: bytes) -> bool:
    """Blocking write of all of ``data``; False when the output refused it."""
    view = memoryview(data)
    try:
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                # Someone else made the shared description non-blocking (we
                # never do): wait for room rather than spin or drop.
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
                poller.poll(1000)
                continue
            view = view[n:]
    except OSError:
        return False
    return True


class _Switch:
    """Queued by ``reopen``: lines queued after it go to ``fd``."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd


#: A queued line and how many dropped records it reports (0: a record).
_Line = tuple[bytes, int]


class _OutputHandler(logging.Handler):
    """The master's output: owns the byte-bounded line queue, the output fd
    and the one writer thread that drains the queue into that fd.

    ``setup_master`` installs it on the root logger. The master thread calls
    ``emit`` (any log call, ``emit_worker``), which only formats and queues,
    never writes and never waits; ``reopen``, which queues a switch to a new
    file; and ``drain`` (``flush``), which waits a bounded time. The writer
    thread, started by the first line, is the only caller of write(2) on the
    output, and once started the only one to close(2) an fd of it, so an fd is
    never closed (and its number reused) while a write may still use it. A
    forked child starts over with an empty queue, a new lock and no writer.
    """

    def __init__(self, fd: int, path: str | None = None) -> None:
        """Write to ``fd``; with ``path``, the fd is ours (closed, reopenable)."""
        super().__init__()
        self.path = path
        #: Records lost so far, queue full or write failed; only ever grows.
        self.dropped_total = 0
        self._fd = fd
        self._init_queue()
        self._closing = False
        _live.add(self)

    def _init_queue(self) -> None:
        # RLock: a collection run while the lock is held may log from a finalizer.
        self._cond = threading.Condition(threading.RLock())
        self._queue: deque[_Line | _Switch] = deque()
        self._switch: _Switch | None = None  # queued, not yet taken by the writer
        self._queued = 0  # bytes of the lines in _queue
        self._busy = False  # the writer holds lines taken from the queue
        self._refusing = False  # full: take nothing until down to _RESUME_BYTES
        self._unreported = 0  # lost since the last "dropped" line was queued
        self._started = False
        self._thread: threading.Thread | None = None
        self._stalled = False  # a drain timed out and nothing was written since

    def after_fork_in_child(self) -> None:
        # The lock may have been held by a thread that does not exist here,
        # and so does the writer; the queued lines are the parent's to write.
        # A pending _Switch's fd is left open: the worker closes foreign fds.
        self._init_queue()
        self.dropped_total = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self._refusing:  # unlocked peek: a full queue costs no formatting
            with self._cond:
                if self._refusing:
                    self.dropped_total += 1
                    self._unreported += 1
                    return
        try:
            data = _line(self.format(record))
        except Exception:
            self.handleError(record)
            return
        self._put(data)

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's own version prints to sys.stderr: a blocking write.
        if logging.raiseExceptions:
            with contextlib.suppress(Exception):
                self._put(_line(f"--- Logging error ---\n{traceback.format_exc()}"
                                f"Message: {record.msg!r}\nArguments: {record.args!r}"))

    def _put(self, data: bytes) -> None:
        item = (data, 0)  # made before locking: an allocation may collect, and log
        with self._cond:
            if self._closing:
                self.dropped_total += 1
                return
            if self._refusing or self._queued + len(data) > QUEUE_BYTES:
                self.dropped_total += 1
                self._unreported += 1
                self._refusing = True
                return
            self._queue.append(item)
            self._queued += len(data)
            self._cond.notify()
            self._start_writer()

    def _start_writer(self) -> None:
        # Under the lock. Flagged before Thread(): a collection in there may
        # log and come back here, and there must never be two writers.
        if self._started:
            return
        self._started = True
        try:
            thread = threading.Thread(target=self._run, name="shardudp-log-writer",
                                      daemon=True)
            thread.start()
        except RuntimeError:  # no thread to be had now: the next line retries
            self._started = False
            return
        self._thread = thread

    def reopen(self) -> None:
        """Open ``path`` anew and queue the switch; OSError (old fd kept) says why."""
        assert self.path is not None
        try:
            fd = _open_log(self.path)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot reopen log file {self.path}: "
                                     f"{exc.strerror or exc}") from None
        with self._cond:
            if self._closing:
                os.close(fd)
                return
            if self._switch is not None:
                # The writer is behind (a stuck output, perhaps): one pending
                # switch, to the newest file, bounds the fds repeated reopens hold.
                os.close(self._switch.fd)
                self._switch.fd = fd
                return
            # Queued, not swapped now: lines queued before go to the old file,
            # and only the writer knows when it is done with the old fd.
            self._switch = _Switch(fd)
            self._queue.append(self._switch)
            self._cond.notify()
            self._start_writer()

    def drain(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for every queued line to be written; True if so."""
        def done() -> bool:
            return not self._queue and not self._busy

        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                return done()
            if not self._cond.wait_for(done, timeout):
                self._stalled = True
                return False
            return True

    def flush(self) -> None:
        # What logging.shutdown() calls at exit: the last lines usually get
        # out, but an output the master's own shutdown flush already waited
        # for in vain does not hold up the exit a second time.
        if not self._stalled:
            self.drain(EXIT_FLUSH_TIMEOUT)

    def close(self) -> None:
        """Take no more lines; the writer writes what is queued, then exits."""
        fd = -1
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            if not self._started and self.path is not None:
                fd, self._fd = self._fd, -1  # no writer to hand it to
        if fd >= 0:
            os.close(fd)
        super().close()

    def _run(self) -> None:
        while True:
            lines: list[_Line] = []
            old = -1
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    break
                head = self._queue[0]
                if isinstance(head, _Switch):
                    self._queue.popleft()
                    self._switch = None
                    old, self._fd = self._fd, head.fd
                else:
                    lines = self._take()
                    self._busy = True
                fd = self._fd
            if old >= 0:
                with contextlib.suppress(OSError):
                    os.close(old)
            # One write per chunk of whole lines: never a line cut in two writes.
            ok = not lines or _write_all(fd, b"".join(data for data, _ in lines))
            with self._cond:
                self._busy = False
                self._stalled = self._stalled and not (lines and ok)
                self._account(lines, ok)
                self._cond.notify_all()
        with self._cond:
            fd, self._fd = self._fd, -1
        if self.path is not None and fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _take(self) -> list[_Line]:
        """Pop the head line and those after it that fit one atomic pipe write."""
        first = self._queue.popleft()
        assert not isinstance(first, _Switch)
        lines, size = [first], len(first[0])
        while self._queue:
            nxt = self._queue[0]
            if isinstance(nxt, _Switch) or size + len(nxt[0]) > _CHUNK:
                break
            lines.append(nxt)
            size += len(nxt[0])
            self._queue.popleft()
        self._queued -= size
        return lines

    def _account(self, lines: list[_Line], ok: bool) -> None:
        """After a write (lock held): count what it lost, queue the "dropped" line."""
        if not ok:
            for _, reports in lines:
                if reports:
                    self._unreported += reports  # the report is lost, not what it counted
                else:
                    self.dropped_total += 1
                    self._unreported += 1
        # Only after a write of records: a failing "dropped" line alone does
        # not queue the next one, or a dead output would make the writer spin.
        if (self._unreported and self._queued <= _RESUME_BYTES
                and any(not reports for _, reports in lines)):
            # A full queue took nothing since the loss began: the line lands
            # where the gap is.
            note = self._note(self._unreported)
            self._queue.append((note, self._unreported))
            self._queued += len(note)
            self._unreported = 0
            self._refusing = False

    def _note(self, count: int) -> bytes:
        record = logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": f"{count} log records dropped: the log output was not draining",
            "slot": _slot})
        try:
            return _line(self.format(record))
        except Exception:
            return _line(record.getMessage())


#: Every _OutputHandler of this process, for the fork hook.
_live: weakref.WeakSet[_OutputHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_live):
        handler.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def setup_master(level: str, log_file: str | None = None) -> None:
    """Install the output handler (idempotent); OSError if ``log_file`` cannot be opened."""
    global _handler
    logging.setLogRecordFactory(_record_factory)
    root = logging.getLogger()
    root.setLevel(level.upper())
    if _handler is not None:
        return
    if log_file is None:
        # fd 2 itself, not sys.stderr: its buffer and lock are not the writer's.
        handler = _OutputHandler(2)
    else:
        path = os.path.abspath(log_file)
        handler = _OutputHandler(_open_log(path), path)
    handler.setFormatter(logging.Formatter(FORMAT))
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    _handler = handler


def to_file() -> bool:
    """True when the master's log goes to a file, not to stderr."""
    return isinstance(_handler, _OutputHandler) and _handler.path is not None


def dropped() -> int:
    """Records the master's output has dropped so far (queue full, write failed).

    Monotonic, for ``shardudp_log_records_dropped_total``; 0 before
    ``setup_master`` and in a worker.
    """
    return _handler.dropped_total if isinstance(_handler, _OutputHandler) else 0


def flush(timeout: float) -> bool:
    """Wait at most ``timeout`` s for the master's queued lines to be written.

    True when all were (or there is no output to wait for). For shutdown:
    nothing else in the master waits on the output.
    """
    return _handler.drain(timeout) if isinstance(_handler, _OutputHandler) else True


def emit_worker(slot: int, pid: int, msg: wire.Log) -> None:
    """Re-emit a worker's record through the master's handlers.

    Slot and pid come from the master's own knowledge of the pipe, not from
    the frame; the logger name is only a label (no logger is created for it,
    so a worker cannot grow the master's logger table).
    """
    created = msg.created if 0 < msg.created < _MAX_CREATED else time.time()
    record = logging.makeLogRecord({
        "name": msg.name, "levelno": msg.level, "levelname": logging.getLevelName(msg.level),
        "msg": msg.text, "created": created, "msecs": (created % 1) * 1000,
        "process": pid, "slot": str(slot)})
    logging.getLogger().handle(record)


class _PipeHandler(logging.Handler):
    """A worker's only handler: records become frames handed to ``sink``.

    ``sink`` returns False when it dropped the frame (the pipe is backed up);
    the next record that gets through is preceded by a count of the lost ones.
    """

    def __init__(self, sink: Callable[[wire.Log], bool]) -> None:
        super().__init__()
        self._sink = sink
        self._plain = logging.Formatter()
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        # Whatever goes wrong here must not escape into the APP's log call.
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self._plain.formatException(record.exc_info)
            elif record.exc_text:
                text += "\n" + record.exc_text
            if record.stack_info:
                text += "\n" + self._plain.formatStack(record.stack_info)
            if self.dropped:
                note = wire.Log.bounded(logging.WARNING, "shardudp.logs",
                                        f"{self.dropped} log records dropped: the pipe to the "
                                        "master was full", record.created)
                if not self._sink(note):
                    self.dropped += 1
                    return
                self.dropped = 0
            if not self._sink(wire.Log.bounded(record.levelno, record.name, text,
                                               record.created)):
                self.dropped += 1
        except Exception:
            self.handleError(record)


def setup_worker(slot: int, sink: Callable[[wire.Log], bool]) -> None:
    """In a freshly forked worker: send every record to the master through ``sink``."""
    global _slot, _handler
    _slot = str(slot)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)  # the master's stream: the worker must not write to it
    _handler = _PipeHandler(sink)
    root.addHandler(_handler)


def reopen() -> bool:
    """Reopen the log file (after logrotate moved it); False when logging to stderr.

    The new file is opened first and used only once open: on failure the old
    one stays in use and OSError says why. Lines queued before the call still
    go to the old file; the writer thread closes it once done with it.
    """
    h = _handler
    if not isinstance(h, _OutputHandler) or h.path is None:
        return False
    h.reopen()
    return True
