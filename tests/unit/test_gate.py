"""A port's gate and a worker's session reports, without sockets."""

from __future__ import annotations

from typing import Any

from shardudp import wire
from shardudp.gate import Gate
from shardudp.stats import ListenerStats
from shardudp.worker import SessionWatch


class _Protocol:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, Any]] = []

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.got.append((data, addr))


def test_a_batch_of_new_senders_past_a_small_table_is_evicted_down_below_its_cap() -> None:
    stats = ListenerStats()
    gate = Gate(_Protocol(), stats)
    gate.track(16)
    # What a batch engine does: note a whole batch (64 senders), then evict once.
    gate.flows.update({("10.0.0.1", p): float(p) for p in range(64)})  # type: ignore[union-attr]
    gate.evict()
    assert gate.flows is not None and len(gate.flows) == 16 - 16 // 8
    # The most recently heard stay.
    assert min(p for _, p in gate.flows) == 64 - len(gate.flows)
    assert stats.evicted == 64 - len(gate.flows)


def test_a_refused_sender_is_not_kept_as_a_session() -> None:
    proto, stats = _Protocol(), ListenerStats()
    gate = Gate(proto, stats)
    gate.track(100)
    gate.native = True  # the engine notes senders before the gate sees them
    gate.refuse([("192.0.2.7", 53)])
    gate.flows[("192.0.2.7", 53)] = 1.0  # type: ignore[index]
    gate.flows[("192.0.2.8", 53)] = 1.0  # type: ignore[index]
    gate.datagramReceived(b"x", ("192.0.2.7", 53))
    gate.datagramReceived(b"y", ("192.0.2.8", 53))
    assert proto.got == [(b"y", ("192.0.2.8", 53))]
    assert gate.flows == {("192.0.2.8", 53): 1.0}
    assert stats.refused == 1


def test_a_drain_report_lists_the_most_recent_first_in_messages_that_fit_frames() -> None:
    gate = Gate(_Protocol(), ListenerStats())
    gate.track(1 << 20)
    n = wire.SESSIONS_PER_MESSAGE + 10
    assert gate.flows is not None
    # Long IPv6 senders with a zone: the widest a flow's text gets.
    gate.flows.update({(f"fe80::ffff:ffff:ffff:{i:x}%eth0", 65535 - i % 7): 100.0 + i
                       for i in range(n)})
    watch = SessionWatch("l", gate, idle=1000.0)
    watch.drain()
    msgs = watch.tick(now=200.0)
    assert [m.more for m in msgs] == [True, False]
    for m in msgs:
        assert len(wire.encode(m)) < wire.MAX_FRAME
    flows = [wire.parse_flow_untrusted(t, "t") for m in msgs for t in m.active]
    assert len(flows) == n and len(set(flows)) == n
    heard = [gate.flows[f] for f in flows]
    assert heard == sorted(heard, reverse=True)
    # Nothing new since: no report; all gone idle: each one ended, once.
    assert watch.tick(now=200.0) == []
    ended = watch.tick(now=10_000.0)
    assert sum(len(m.ended) for m in ended) == n and not any(m.active for m in ended)


def test_an_asked_drain_with_no_flows_still_answers_once() -> None:
    gate = Gate(_Protocol(), ListenerStats())
    gate.track(10)
    watch = SessionWatch("l", gate, idle=1.0)
    watch.drain()
    assert watch.tick(now=5.0) == [wire.Sessions(listener="l", active=[], ended=[])]
    assert watch.tick(now=5.1) == []


def test_idle_flows_are_forgotten_now_and_then_not_every_tick() -> None:
    gate = Gate(_Protocol(), ListenerStats())
    gate.track(10)
    assert gate.flows is not None
    watch = SessionWatch("l", gate, idle=2.0)
    gate.flows[("192.0.2.1", 1)] = 0.0
    gate.flows[("192.0.2.2", 1)] = 3.0
    watch.forget_idle(now=3.9)  # scans: nothing idle for 2 x idle yet
    assert len(gate.flows) == 2
    watch.forget_idle(now=4.3)  # idle long enough, but 0.5 s (idle / 4) since the scan
    assert len(gate.flows) == 2
    watch.forget_idle(now=4.4)
    assert gate.flows == {("192.0.2.2", 1): 3.0}


def test_flow_texts_from_a_peer_are_checked() -> None:
    assert wire.parse_flow_untrusted(wire.flow_text("::ffff:127.0.0.1", 9), "x") == (
        "::ffff:127.0.0.1", 9)  # as recvfrom names it, not re-spelled
    for bad in ("127.0.0.1", "127.0.0.1 x", "127.0.0.1 70000", "nohost 5", "1.2.3.4 -1", ""):
        try:
            wire.parse_flow_untrusted(bad, "refuse")
        except wire.WireError as exc:
            assert str(exc) == f"refuse: {bad!r} is not 'host port'"
        else:
            raise AssertionError(f"{bad!r} accepted")
