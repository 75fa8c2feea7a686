"""Worker records as pipe frames, their re-emission in the master, log reopening."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardudp import logs, wire, worker


class Sink:
    """Stands in for the worker's pipe: accepts frames while ``room`` says so."""

    def __init__(self) -> None:
        self.room = True
        self.frames: list[wire.Log] = []

    def __call__(self, msg: wire.Log) -> bool:
        if self.room:
            self.frames.append(msg)
        return self.room


def _record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("app", level, __file__, 1, msg, args, None)


def test_records_become_frames_with_the_formatted_text_and_traceback() -> None:
    sink = Sink()
    handler = logs._PipeHandler(sink)
    handler.handle(_record("hello %s", "world"))
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
        handler.handle(rec)
    assert [(f.level, f.name) for f in sink.frames] == [(logging.INFO, "app"),
                                                       (logging.ERROR, "app")]
    assert sink.frames[0].text == "hello world"
    assert sink.frames[1].text.startswith("failed\nTraceback")
    assert "ValueError: boom" in sink.frames[1].text


def test_dropped_records_are_counted_and_reported_once_in_a_later_record() -> None:
    sink = Sink()
    handler = logs._PipeHandler(sink)
    sink.room = False
    for i in range(5):
        handler.handle(_record("lost %d", i))
    sink.room = True
    handler.handle(_record("back"))
    handler.handle(_record("again"))
    assert [f.text for f in sink.frames] == [
        "5 log records dropped: the pipe to the master was full", "back", "again"]
    assert sink.frames[0].level == logging.WARNING


def test_a_huge_record_is_cut_to_the_wire_bound() -> None:
    sink = Sink()
    logs._PipeHandler(sink).handle(_record("x" * (wire.LOG_TEXT_MAX * 3)))
    assert len(sink.frames[0].text) <= wire.LOG_TEXT_MAX
    wire.encode(sink.frames[0])  # and it fits a frame


def test_text_that_is_not_valid_utf8_reaches_the_master_escaped() -> None:
    sink = Sink()
    logs._PipeHandler(sink).handle(_record("file name %s", os.fsdecode(b"caf\xe9")))
    (got,) = wire.Decoder().feed(wire.encode(sink.frames[0])).messages
    assert isinstance(got, wire.Log)
    assert got.text == "file name caf\\udce9"


def test_a_failing_sink_never_raises_into_the_apps_log_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(msg: wire.Log) -> bool:
        raise ValueError("the sink broke")

    handled: list[logging.LogRecord] = []
    handler = logs._PipeHandler(broken)
    monkeypatch.setattr(handler, "handleError", handled.append)
    handler.handle(_record("hello"))
    assert [r.getMessage() for r in handled] == ["hello"]


class _Pipe:
    """A worker's PipeWriter with its records on logger ``name``, and the master's end."""

    def __init__(self, name: str) -> None:
        self.r, w = os.pipe()
        os.set_blocking(self.r, False)
        self.out = worker.PipeWriter(w)
        self.log = logging.getLogger(name)
        self.log.propagate = False
        self.handler = logs._PipeHandler(
            lambda m: self.out.send(m, droppable=True, backlog=worker.LOG_BACKLOG))
        self.log.addHandler(self.handler)

    def texts(self) -> list[str]:
        got = wire.Decoder().feed(os.read(self.r, 1 << 20))
        assert got.error is None
        return [m.text for m in got.messages if isinstance(m, wire.Log)]

    def close(self) -> None:
        self.log.removeHandler(self.handler)
        os.close(self.r)
        os.close(self.out.fd)


def _logs_within(pipe: _Pipe, seconds: float) -> None:
    """Log "outer" in a thread: a deadlocked writer would never return."""
    t = threading.Thread(target=pipe.log.error, args=("outer",), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "logging deadlocked"


def test_a_record_logged_while_a_frame_is_encoded_does_not_deadlock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _Pipe("reentry.encode")
    real: Callable[[wire.Message], bytes] = wire.encode
    fired = []

    def encode(msg: wire.Message) -> bytes:
        # Encoding allocates; a collection may run a finalizer that logs,
        # as Twisted's "Unhandled error in Deferred" does.
        if not fired:
            fired.append(True)
            pipe.log.error("Unhandled error in Deferred")
        return real(msg)

    monkeypatch.setattr(wire, "encode", encode)
    try:
        _logs_within(pipe, 5)
        assert sorted(pipe.texts()) == ["Unhandled error in Deferred", "outer"]
    finally:
        pipe.close()


class _OsWhoseWriteLogs:
    """``os`` for the writer, except that its first write runs a finalizer
    that logs (the exception a write allocates may trigger a collection)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if not self.fired:
            self.fired = True
            self.log.error("Unhandled error in Deferred")
        return os.write(fd, data)


def test_a_record_logged_while_the_writer_holds_its_lock_is_written_not_deadlocked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = _Pipe("reentry.write")
    monkeypatch.setattr(worker, "os", _OsWhoseWriteLogs(pipe.log))
    try:
        _logs_within(pipe, 5)
        assert pipe.texts() == ["outer", "Unhandled error in Deferred"]
    finally:
        monkeypatch.undo()
        pipe.close()


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def root_capture() -> Iterator[Capture]:
    cap = Capture()
    cap.setFormatter(logging.Formatter(logs.FORMAT))
    root = logging.getLogger()
    root.addHandler(cap)
    try:
        yield cap
    finally:
        root.removeHandler(cap)


def test_master_re_emits_with_the_slot_and_pid_it_knows_not_what_the_frame_says(
        root_capture: Capture) -> None:
    logs.emit_worker(3, 4242, wire.Log(level=logging.WARNING, name="twisted",
                                       text="100% done %s", created=1.7e9))
    (rec,) = root_capture.records
    line = root_capture.format(rec)
    assert "[4242] [3] WARNING twisted: 100% done %s" in line
    assert rec.created == 1.7e9


def test_master_survives_a_garbage_timestamp_and_level(root_capture: Capture) -> None:
    logs.emit_worker(0, 1, wire.Log(level=73, name="x", text="t", created=1e300))
    (rec,) = root_capture.records
    assert "[1] [0] Level 73 x: t" in root_capture.format(rec)


@pytest.fixture
def file_handler(tmp_path: Path) -> Iterator[logging.FileHandler]:
    fh = logging.FileHandler(tmp_path / "logs" / "a.log", delay=True)
    saved = logs._handler
    logs._handler = fh
    try:
        yield fh
    finally:
        logs._handler = saved
        fh.close()


def test_reopen_starts_a_new_file_after_rotation(tmp_path: Path,
                                                 file_handler: logging.FileHandler) -> None:
    (tmp_path / "logs").mkdir()
    file_handler.handle(_record("before"))
    (tmp_path / "logs" / "a.log").rename(tmp_path / "logs" / "a.log.1")
    assert logs.reopen()
    file_handler.handle(_record("after"))
    assert (tmp_path / "logs" / "a.log").read_text() == "after\n"
    assert (tmp_path / "logs" / "a.log.1").read_text() == "before\n"


def test_reopen_that_fails_keeps_the_old_file_and_says_why(
        tmp_path: Path, file_handler: logging.FileHandler) -> None:
    (tmp_path / "logs").mkdir()
    file_handler.handle(_record("before"))
    (tmp_path / "logs" / "a.log").rename(tmp_path / "moved.log")
    (tmp_path / "logs").rmdir()
    with pytest.raises(OSError, match=r"cannot reopen log file .*a\.log: No such file"):
        logs.reopen()
    file_handler.handle(_record("still logging"))
    assert (tmp_path / "moved.log").read_text() == "before\nstill logging\n"


def test_reopen_without_a_log_file_is_a_no_op() -> None:
    saved = logs._handler
    logs._handler = logging.StreamHandler()
    try:
        assert logs.reopen() is False
    finally:
        logs._handler = saved
