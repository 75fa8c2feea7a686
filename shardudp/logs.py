"""Logging for the master and its workers.

Worker records travel to the master's handlers through
multiprocessing-logging's queue; each record carries the slot it came from.
The master's own records skip the queue: a worker killed while holding the
queue's write lock would otherwise silence the master too.
"""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import sys
from typing import Any, Final

from multiprocessing_logging import MultiProcessingHandler

FORMAT: Final = "%(asctime)s [%(process)d] [%(slot)s] %(levelname)s %(name)s: %(message)s"

_slot = "master"
_base_factory = logging.getLogRecordFactory()


def _record_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.slot = _slot
    return record


class _RoutedHandler(MultiProcessingHandler):  # type: ignore[misc]
    def __init__(self, name: str, sub_handler: logging.Handler, master_pid: int) -> None:
        super().__init__(name, sub_handler=sub_handler)
        self._master_pid = master_pid

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() == self._master_pid:
            self.sub_handler.handle(record)
        else:
            super().emit(_plain(record))

    def writer_fd(self) -> int:
        return int(self.queue._writer.fileno())


_KEEP: Final = ("name", "levelno", "levelname", "pathname", "filename", "module", "lineno",
                 "funcName", "created", "msecs", "relativeCreated", "thread", "threadName",
                 "process", "processName", "slot")


def _plain(record: logging.LogRecord) -> logging.LogRecord:
    """A copy made of builtins only.

    The queue pickles records; Twisted's records carry the whole event (the
    protocol instance, its logger) as ``msg``. Unpickling that in the master
    would import the APP and Twisted there, in a thread, which can leave an
    import lock held across the next fork.
    """
    d = {k: getattr(record, k, None) for k in _KEEP}
    msg = record.getMessage()
    if record.exc_info:
        msg += "\n" + logging.Formatter().formatException(record.exc_info)
    elif record.exc_text:
        msg += "\n" + record.exc_text
    d["msg"], d["args"] = msg, None
    return logging.makeLogRecord(d)


_handler: _RoutedHandler | None = None


def setup_master(level: str, log_file: str | None = None) -> None:
    """Install the output handler behind the cross-process queue (idempotent)."""
    global _handler
    logging.setLogRecordFactory(_record_factory)
    root = logging.getLogger()
    root.setLevel(level.upper())
    if _handler is not None:
        return
    stream: logging.Handler
    stream = logging.StreamHandler(sys.stderr) if log_file is None else \
        logging.FileHandler(log_file, delay=False)
    stream.setFormatter(logging.Formatter(FORMAT))
    for h in list(root.handlers):
        root.removeHandler(h)
    _handler = _RoutedHandler("shardudp-logs", stream, os.getpid())
    root.addHandler(_handler)


def setup_worker(slot: int) -> None:
    """In a freshly forked worker: tag records with the slot, revive the queue."""
    global _slot
    _slot = str(slot)
    # A raw os.fork() skips multiprocessing's after-fork hooks; without them
    # the queue would still believe the master's feeder thread runs here.
    multiprocessing.util._run_after_forkers()  # type: ignore[attr-defined]


def worker_fds() -> set[int]:
    """File descriptors a worker must keep for logging."""
    return {_handler.writer_fd()} if _handler is not None else set()


def flush_worker() -> None:
    """Push buffered records into the pipe before the worker exits."""
    if _handler is not None:
        q = _handler.queue
        q.close()
        q.join_thread()


def reopen() -> bool:
    """Reopen the log file (after logrotate moved it); False when logging to stderr."""
    if _handler is None or not isinstance(_handler.sub_handler, logging.FileHandler):
        return False
    fh = _handler.sub_handler
    fh.acquire()
    try:
        if fh.stream is not None:
            fh.stream.close()
        fh.stream = fh._open()
    finally:
        fh.release()
    return True
