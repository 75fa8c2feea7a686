"""Worker records as pipe frames, their re-emission in the master, log reopening."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardudp import logs, wire


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
