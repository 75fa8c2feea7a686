"""Worker records as pipe frames, their re-emission in the master, the master's
non-blocking output, log reopening."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardudp import logs, pipewriter, wire, worker


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
        self.out = pipewriter.PipeWriter(w)
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
    fired: list[bool] = []

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
    monkeypatch.setattr(pipewriter, "os", _OsWhoseWriteLogs(pipe.log))
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


class _Output:
    """The master's output handler writing into a pipe (or FIFO) that the test
    reads only when it says so; ``close`` stops the writer thread."""

    def __init__(self, r: int, w: int, fmt: str) -> None:
        self.r, self.w = r, w
        os.set_blocking(r, False)
        self.got = bytearray()
        self.handler = logs._OutputHandler(w)
        self.handler.setFormatter(logging.Formatter(fmt))

    def log(self, msg: str, *args: object, level: int = logging.INFO) -> None:
        rec = _record(msg, *args, level=level)
        rec.slot = "master"  # what the master's record factory adds
        self.handler.handle(rec)

    def read_until(self, needle: bytes, seconds: float) -> list[str]:
        """Read until ``needle`` has arrived; every complete line read so far."""
        deadline = time.monotonic() + seconds
        poller = select.poll()
        poller.register(self.r, select.POLLIN)
        while needle not in self.got:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} never arrived; last read: {bytes(self.got[-300:])!r}"
            poller.poll(left * 1000)
            with contextlib.suppress(BlockingIOError):
                self.got += os.read(self.r, 1 << 20)
        return self.got[:self.got.rindex(b"\n")].decode().split("\n")

    def wait_stuck(self, seconds: float) -> None:
        """Until the writer is blocked writing with lines still queued behind it."""
        deadline = time.monotonic() + seconds
        while not (self.handler._busy and self.handler._queue):
            assert time.monotonic() < deadline, "the writer never got stuck"
            time.sleep(0.005)

    def close_reader(self) -> None:
        os.close(self.r)
        self.r = -1

    def close(self) -> None:
        self.handler.close()
        thread = self.handler._thread
        deadline = time.monotonic() + 5
        while thread is not None and thread.is_alive():
            assert time.monotonic() < deadline, "the writer thread did not exit"
            if self.r >= 0:  # read what it is stuck writing
                with contextlib.suppress(BlockingIOError):
                    os.read(self.r, 1 << 20)
            thread.join(0.01)
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def output() -> Iterator[Callable[..., _Output]]:
    made: list[_Output] = []

    def make(fmt: str = "%(message)s", fifo: Path | None = None) -> _Output:
        if fifo is None:
            r, w = os.pipe()
        else:
            os.mkfifo(fifo)
            r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the reader that never reads
            w = os.open(fifo, os.O_WRONLY)
        made.append(_Output(r, w, fmt))
        return made[-1]

    yield make
    for out in made:
        out.close()


def test_output_lines_arrive_in_order_with_their_traceback(output: Callable[..., _Output]) -> None:
    out = output()
    for i in range(2000):
        out.log("line %d", i)
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record("failed", level=logging.ERROR)
        rec.exc_info = sys.exc_info()
        out.handler.handle(rec)
    out.log("last")
    assert out.handler.drain(2.0)
    lines = out.read_until(b"last\n", 2.0)
    assert lines[:2000] == [f"line {i}" for i in range(2000)]
    assert lines[2000] == "failed"
    assert lines[2001] == "Traceback (most recent call last):"
    assert "ValueError: boom" in lines[-2] and lines[-1] == "last"
    assert out.handler.dropped_total == 0


class _OsRecordingWrites:
    """``os`` for the writer thread, except that writes are recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        self.writes.append(bytes(data))
        return os.write(fd, data)


def test_lines_are_written_whole_batched_up_to_pipe_buf_and_a_huge_one_cut(
        output: Callable[..., _Output], monkeypatch: pytest.MonkeyPatch) -> None:
    rec = _OsRecordingWrites()
    monkeypatch.setattr(logs, "os", rec)
    out = output()
    out.handler._cond.acquire()  # let lines pile up, so they can be batched
    try:
        for i in range(500):
            out.log("line %d", i)
        out.log("%s", "L" * 10000)
        out.log("%s", "H" * (logs.RECORD_MAX * 2))
        out.log("end")
    finally:
        out.handler._cond.release()
    lines = out.read_until(b"end\n", 2.0)
    assert lines[:500] == [f"line {i}" for i in range(500)]
    assert lines[500] == "L" * 10000
    assert len(lines[501]) == logs.RECORD_MAX and lines[501].endswith(
        f"[cut at {logs.RECORD_MAX} bytes]")
    assert all(w.endswith(b"\n") for w in rec.writes)
    batched = [w for w in rec.writes if w.startswith(b"line ")]
    assert all(len(w) <= select.PIPE_BUF for w in batched)
    assert len(batched) < 500 / 50  # a few thousand bytes of lines per write
    assert b"L" * 10000 + b"\n" in rec.writes  # a long line alone, in one write


_LINE = re.compile(r"\S+ \S+ \[(\d+)\] \[master\] (\w+) (\S+): (.*)")


def test_an_output_nobody_reads_never_blocks_the_master_and_the_loss_is_reported(
        output: Callable[..., _Output], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = output(logs.FORMAT, fifo=tmp_path / "stderr")
    monkeypatch.setattr(logs, "_handler", out.handler)
    pad = "x" * 150
    start = time.monotonic()
    for i in range(20000):
        out.log("record %d %s", i, pad)
    assert time.monotonic() - start < 2.0
    dropped = logs.dropped()
    assert dropped > 0 and dropped == out.handler.dropped_total
    start = time.monotonic()
    assert not logs.flush(0.2)  # bounded: the output is stuck
    out.handler.flush()  # logging.shutdown's flush: no second wait for the same stall
    assert time.monotonic() - start < 1.0

    # The reader wakes up: what was queued comes out, then how much was lost.
    lines = out.read_until(b"the log output was not draining\n", 3.0)
    for i in range(10):
        out.log("after %d", i)
    lines = out.read_until(b"after 9\n", 2.0)
    parsed = [_LINE.fullmatch(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m][:3]
    texts = [m.group(4) for m in parsed if m]
    kept = len(texts) - 11
    assert kept + dropped == 20000
    # Nothing is taken after the first loss until the note: the gap is one piece.
    assert texts[:kept] == [f"record {i} {pad}" for i in range(kept)]
    note = parsed[kept]
    assert note and note.groups() == (
        str(os.getpid()), "WARNING", "shardudp.logs",
        f"{dropped} log records dropped: the log output was not draining")
    assert texts[kept + 1:] == [f"after {i}" for i in range(10)]
    assert logs.dropped() == dropped  # monotonic: the report does not reset it
    assert logs.flush(1.0)


def test_an_output_that_fails_counts_what_it_lost_and_goes_on(
        output: Callable[..., _Output]) -> None:
    out = output()
    out.close_reader()  # EPIPE from now on
    for i in range(100):
        out.log("lost %d", i)
    assert out.handler.drain(2.0)
    assert out.handler.dropped_total == 100  # the failed "dropped" lines are not records
    assert out.handler._thread is not None and out.handler._thread.is_alive()


def test_a_logging_error_goes_to_the_output_not_to_a_blocking_stderr(
        output: Callable[..., _Output], capfd: pytest.CaptureFixture[str]) -> None:
    out = output()
    out.log("%d apples", "three")
    out.log("next")
    lines = out.read_until(b"next\n", 2.0)
    assert lines[0] == "--- Logging error ---"
    assert "TypeError: %d format: a real number is required, not str" in lines
    assert "Message: '%d apples'" in lines and lines[-1] == "next"
    assert capfd.readouterr().err == ""


def test_a_child_forked_with_the_writer_stuck_and_its_lock_held_logs_and_exits(
        output: Callable[..., _Output]) -> None:
    out = output()
    for i in range(2000):
        out.log("fill %d %s", i, "x" * 100)
    out.wait_stuck(2.0)
    # Another thread holds the queue's lock at the fork: in the child it is
    # held by a thread that does not exist there.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with out.handler._cond:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(2)
    sink_r, sink_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            out.log("child, before setup_worker")  # the inherited handler must not hang
            logs.setup_worker(7, lambda m: os.write(sink_w, wire.encode(m)) > 0)
            logging.getLogger("child").warning("child says %s", "hi")
            code = 0
        finally:
            os._exit(code)
    release.set()
    holder.join(2)
    os.close(sink_w)
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], 5)[0]:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the child deadlocked")
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = wire.Decoder().feed(os.read(sink_r, 1 << 16))
    os.close(sink_r)
    assert [(m.name, m.text) for m in got.messages if isinstance(m, wire.Log)] == [
        ("child", "child says hi")]
    # The child's reset was the child's: the parent's queue is all written.
    out.log("parent goes on")
    lines = out.read_until(b"parent goes on\n", 2.0)
    assert lines == [f"fill {i} {'x' * 100}" for i in range(2000)] + ["parent goes on"]


@pytest.fixture
def file_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[logs._OutputHandler]:
    """The master's output to ``logs/a.log`` under tmp_path, installed as logs._handler."""
    (tmp_path / "logs").mkdir()
    path = str(tmp_path / "logs" / "a.log")
    handler = logs._OutputHandler(logs._open_log(path), path)
    monkeypatch.setattr(logs, "_handler", handler)
    try:
        yield handler
    finally:
        handler.close()
        assert handler.drain(2.0)


def test_reopen_starts_a_new_file_after_rotation(tmp_path: Path,
                                                 file_output: logs._OutputHandler) -> None:
    file_output.handle(_record("before"))
    (tmp_path / "logs" / "a.log").rename(tmp_path / "logs" / "a.log.1")
    assert logs.reopen()
    assert logs.to_file()
    file_output.handle(_record("after"))
    assert logs.flush(2.0)
    assert (tmp_path / "logs" / "a.log").read_text() == "after\n"
    assert (tmp_path / "logs" / "a.log.1").read_text() == "before\n"


class _OsWhoseFirstWriteHangs:
    """``os`` for the writer thread, except that its first write waits for ``go``."""

    def __init__(self) -> None:
        self.writing, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes) -> int:
        if not self.writing.is_set():
            self.writing.set()
            self.go.wait(5)
        return os.write(fd, data)


def test_reopen_while_the_writer_is_stuck_returns_and_queued_lines_keep_their_file(
        tmp_path: Path, file_output: logs._OutputHandler,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hang = _OsWhoseFirstWriteHangs()
    monkeypatch.setattr(logs, "os", hang)
    file_output.handle(_record("before"))
    assert hang.writing.wait(2)
    file_output.handle(_record("queued before the rotation"))
    (tmp_path / "logs" / "a.log").rename(tmp_path / "logs" / "a.log.1")
    start = time.monotonic()
    assert logs.reopen()
    file_output.handle(_record("after"))
    assert time.monotonic() - start < 0.5
    hang.go.set()
    assert logs.flush(2.0)
    assert (tmp_path / "logs" / "a.log").read_text() == "after\n"
    assert (tmp_path / "logs" / "a.log.1").read_text() == "before\nqueued before the rotation\n"


def test_reopens_while_the_writer_is_stuck_hold_one_new_file_and_the_newest_wins(
        tmp_path: Path, file_output: logs._OutputHandler,
        monkeypatch: pytest.MonkeyPatch) -> None:
    hang = _OsWhoseFirstWriteHangs()
    monkeypatch.setattr(logs, "os", hang)
    file_output.handle(_record("before"))
    assert hang.writing.wait(2)
    fds_before = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        (tmp_path / "logs" / "a.log").rename(tmp_path / "logs" / f"a.log.{i}")
        assert logs.reopen()
    # One pending switch, not fifty open files waiting behind a stuck write.
    assert len(os.listdir("/proc/self/fd")) - fds_before <= 1
    file_output.handle(_record("after"))
    hang.go.set()
    assert logs.flush(2.0)
    assert (tmp_path / "logs" / "a.log").read_text() == "after\n"
    assert (tmp_path / "logs" / "a.log.0").read_text() == "before\n"


def test_reopen_that_fails_keeps_the_old_file_and_says_why(
        tmp_path: Path, file_output: logs._OutputHandler) -> None:
    file_output.handle(_record("before"))
    assert logs.flush(2.0)
    (tmp_path / "logs" / "a.log").rename(tmp_path / "moved.log")
    (tmp_path / "logs").rmdir()
    with pytest.raises(OSError, match=r"cannot reopen log file .*a\.log: No such file"):
        logs.reopen()
    file_output.handle(_record("still logging"))
    assert logs.flush(2.0)
    assert (tmp_path / "moved.log").read_text() == "before\nstill logging\n"


def test_reopen_without_a_log_file_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_handler", logs._OutputHandler(2))
    assert logs.reopen() is False
    assert logs.to_file() is False


def test_without_an_output_there_is_nothing_dropped_or_to_wait_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "_handler", None)
    assert logs.dropped() == 0
    assert logs.flush(0) is True


def test_setup_master_with_a_log_file_writes_the_format_there(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogRecordFactory(), logs._handler)
    logs._handler = None
    try:
        logs.setup_master("info", str(tmp_path / "m.log"))
        assert logs.to_file()
        logging.getLogger("shardudp.test").info("hello %s", "file")
        logging.getLogger("shardudp.test").debug("below --log-level")
        assert logs.flush(2.0)
        line = (tmp_path / "m.log").read_text()
        assert re.fullmatch(rf"\S+ \S+ \[{os.getpid()}\] \[master\] INFO shardudp.test: "
                            r"hello file\n", line), line
    finally:
        if logs._handler is not None:
            root.removeHandler(logs._handler)
            logs._handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.setLogRecordFactory(saved[2])
        logs._handler = saved[3]
