"""When the supervisor says "all N workers ready" (AllReady) around a rolling reload.

Not between a reload's ready lines: once it is complete or aborted, after the
last slot's ready line, as whoever reads the log or acts on READY=1 expects.
"""

from __future__ import annotations

from test_supervision import Harness, messages

from shardudp.errors import ExitCode
from shardudp.supervision import AllReady, Exit, Say


def _said_and_all_ready(actions: list[object]) -> list[str]:
    return [a.message if isinstance(a, Say) else "ALL READY" for a in actions
            if isinstance(a, Say | AllReady)]


def _roll_every_slot(h: Harness) -> None:
    """Ready each new worker and retire the old one it replaces, until the reload ends."""
    for _ in range(20):
        booting = [p for p, w in h.sup.workers.items() if w.state.value == "booting"]
        stopping = [p for p, w in h.sup.workers.items() if w.state.value == "stopping"]
        if not booting and not stopping:
            return
        for pid in booting:
            h.feed(h.sup.ready(pid, h.now))
        for pid in stopping:
            h.feed(h.sup.exited(pid, 0, None, h.now))


def test_a_reload_asked_for_while_booting_says_all_ready_once_after_its_last_ready() -> None:
    h = Harness(3)
    h.feed(h.sup.reload(h.now))  # e.g. `systemctl reload` right after the start
    _roll_every_slot(h)
    said = _said_and_all_ready(h.actions)
    assert said.count("ALL READY") == 1, said
    last_ready = max(i for i, m in enumerate(said) if m.startswith("worker slot=2 ")
                     and m.endswith(" ready"))
    assert said.index("reload complete") > last_ready
    assert said[-1] == "ALL READY", said
    assert h.sup.healthy()


def test_a_reload_of_a_ready_server_says_nothing_of_all_ready() -> None:
    h = Harness(2)
    h.ready_all()
    mark = len(h.actions)
    h.feed(h.sup.reload(h.now))
    _roll_every_slot(h)
    assert "reload complete" in messages(h.actions[mark:])
    assert not any(isinstance(a, AllReady) for a in h.actions[mark:])


def test_a_reload_aborted_while_booting_says_all_ready_after_the_abort_and_keeps_serving(
) -> None:
    h = Harness(2)
    h.feed(h.sup.reload(h.now))
    new0 = h.sup.slots[0].incoming
    for pid in list(h.sup.workers):
        if pid != new0:
            h.feed(h.sup.ready(pid, h.now))
    assert not any(isinstance(a, AllReady) for a in h.actions)
    # The new code fails to boot: the reload is aborted, not the server halted, since
    # every slot has served with the old code.
    h.feed(h.sup.boot_failed(new0, "SyntaxError"))
    out = h.feed(h.sup.exited(new0, int(ExitCode.BOOT), None, h.now))
    said = _said_and_all_ready(out)
    assert said[-1] == "ALL READY" and "reload aborted" in said[-2], said
    assert not any(isinstance(a, Exit) for a in h.actions)
