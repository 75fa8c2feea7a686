"""Logging for the master and its workers.

The master writes to stderr or a file. A worker has no handler of its own:
each record becomes a ``wire.Log`` frame on the worker's own pipe, and the
master re-emits it tagged with the slot and pid it knows the pipe belongs to.
A pipe per worker means a worker killed mid-write can only lose its own
records; frames are sent non-blocking and dropped (and counted) when the pipe
is backed up, so logging never stalls a worker or the master, and no thread
is involved on either side.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from . import wire

FORMAT: Final = "%(asctime)s [%(process)d] [%(slot)s] %(levelname)s %(name)s: %(message)s"
#: Timestamps past this (year 2286) are not a worker's clock but garbage.
_MAX_CREATED: Final = 1e10

_slot = "master"
_base_factory = logging.getLogRecordFactory()
_handler: logging.Handler | None = None


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.slot = _slot
    return record


def setup_master(level: str, log_file: str | None = None) -> None:
    """Install the output handler (idempotent); OSError if ``log_file`` cannot be opened."""
    global _handler
    logging.setLogRecordFactory(_record_factory)
    root = logging.getLogger()
    root.setLevel(level.upper())
    if _handler is not None:
        return
    handler: logging.Handler
    handler = logging.StreamHandler(sys.stderr) if log_file is None else \
        logging.FileHandler(log_file, delay=False)
    handler.setFormatter(logging.Formatter(FORMAT))
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    _handler = handler


def to_file() -> bool:
    """True when the master's log goes to a file, not to stderr."""
    return isinstance(_handler, logging.FileHandler)


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

    The new file is opened first and swapped in only once open: on failure the
    old one stays in use and OSError says why.
    """
    fh = _handler
    if not isinstance(fh, logging.FileHandler):
        return False
    try:
        new = fh._open()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot reopen log file {fh.baseFilename}: "
                                 f"{exc.strerror or exc}") from None
    fh.acquire()
    try:
        old, fh.stream = fh.stream, new
        if old is not None:
            old.close()
    finally:
        fh.release()
    return True
