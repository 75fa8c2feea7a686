"""The steering program: the hash, the table and the program agree, and fit the kernel."""

from __future__ import annotations

import dataclasses
import ipaddress
import random
import struct

import pytest

from shardudp.steering import (
    BUCKETS,
    MAX_INSNS,
    NO_SOCKET,
    PIN_CAPACITY,
    Steering,
    Table,
    bucket_of,
    flow_hash,
    lend,
    run,
)

SEED = 0x5EED1234


def _packet(ip: str, port: int, options: int = 0) -> bytes:
    """An IP header (IPv4 with ``options`` words of options) and a UDP header from ip:port."""
    addr = ipaddress.ip_address(ip)
    udp = struct.pack("!HHHH", port, 9999, 8, 0)
    if addr.version == 6:
        return struct.pack("!IHBB", 6 << 28, 8, 17, 64) + addr.packed + bytes(16) + udp
    ihl = 5 + options
    return (struct.pack("!BBHHHBBH", 0x40 | ihl, 0, 20 + 8, 0, 0, 64, 17, 0) + addr.packed
            + bytes(4) + b"\x01" * (4 * options) + udp)


def _flows(n: int, v6: bool = False, seed: int = 1) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    if v6:
        return [(str(ipaddress.IPv6Address(rng.getrandbits(128))), rng.randrange(1, 65536))
                for _ in range(n)]
    return [(str(ipaddress.IPv4Address(rng.getrandbits(32))), rng.randrange(1, 65536))
            for _ in range(n)]


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_the_program_computes_flow_hash_and_index_of(v6: bool) -> None:
    table = Table.initial(range(4)).with_slots(range(5))
    flows = _flows(300, v6)
    pins = {flow_hash(ipaddress.ip_address(ip).packed, port, SEED): 3 for ip, port in flows[:40]}
    s = Steering(table.owners, (0, 1, 2, 3, 4), pins, v6, SEED)
    prog = s.program()
    for ip, port in flows:
        h = flow_hash(ipaddress.ip_address(ip).packed, port, SEED)
        assert run(prog, _packet(ip, port), b"payload") == s.index_of(h)
    assert {s.index_of(flow_hash(ipaddress.ip_address(ip).packed, p, SEED))
            for ip, p in flows[:40]} == {3}


def test_ipv4_options_do_not_move_the_source_port() -> None:
    s = Steering(Table.initial(range(3)).owners, (0, 1, 2), {}, False, SEED)
    prog = s.program()
    for ip, port in _flows(50):
        assert run(prog, _packet(ip, port, options=3)) == run(prog, _packet(ip, port))


def test_a_new_slot_takes_its_share_evenly_and_nothing_else_moves() -> None:
    table = Table.initial(range(2))
    for n in range(2, 12):
        grown = table.with_slots(range(n + 1))
        counts = grown.counts()
        assert max(counts.values()) - min(counts.values()) <= 1
        moved = [b for b in range(BUCKETS) if table.owners[b] != grown.owners[b]]
        # Only buckets that went to the new slot moved, and about 1/(N+1) of them.
        assert all(grown.owners[b] == n for b in moved)
        assert abs(len(moved) / BUCKETS - 1 / (n + 1)) < 0.01
        # Back down: exactly those buckets move again, and each returns to a remaining slot.
        shrunk = grown.with_slots(range(n))
        assert grown.moved(shrunk) == pytest.approx(len(moved) / BUCKETS)
        assert max(shrunk.counts().values()) - min(shrunk.counts().values()) <= 1
        table = grown


def test_removing_a_middle_slot_spreads_its_buckets_evenly() -> None:
    table = Table.initial(range(5))
    after = table.with_slots([0, 1, 3, 4])
    moved = [b for b in range(BUCKETS) if table.owners[b] != after.owners[b]]
    assert all(table.owners[b] == 2 for b in moved)
    assert sorted(after.counts().values()) == [256, 256, 256, 256]


def test_a_slot_that_does_not_serve_lends_only_its_own_buckets() -> None:
    owners = Table.initial(range(4)).owners
    lent = lend(owners, {0, 1, 3})
    for home, now in zip(owners, lent, strict=True):
        if home != 2:
            assert now == home
        else:
            assert now in (0, 1, 3)
    spread = [lent[b] for b in range(BUCKETS) if owners[b] == 2]
    assert max(spread.count(s) for s in (0, 1, 3)) - min(spread.count(s) for s in (0, 1, 3)) <= 1
    assert lend(owners, set()) == list(owners)  # nowhere to go: stay home


def test_a_slot_without_a_socket_falls_back_to_the_kernel() -> None:
    s = Steering(Table.initial(range(2)).owners, (0,), {}, False, SEED)
    assert {s.index_of(h) for h in (0, 1 << 31)} == {0, NO_SOCKET}


def test_the_largest_table_with_a_full_pin_load_fits_the_kernel() -> None:
    rng = random.Random(7)
    # 1024 slots scattered the worst way: every bucket its own run.
    owners = tuple(rng.sample(range(BUCKETS), BUCKETS))
    pins = {rng.getrandbits(32): rng.randrange(BUCKETS) for _ in range(PIN_CAPACITY)}
    s = Steering(owners, tuple(range(BUCKETS)), pins, True, SEED)
    prog = s.program()
    assert len(prog) <= MAX_INSNS
    assert s.room_for_pins() >= PIN_CAPACITY
    few = Steering(Table.initial(range(16)).owners, tuple(range(16)), {}, True, SEED)
    assert few.room_for_pins() > 2 * PIN_CAPACITY
    full = {rng.getrandbits(32): 1 for _ in range(few.room_for_pins())}
    assert len(dataclasses.replace(few, pins=full).program()) <= MAX_INSNS
    for h, index in list(pins.items())[:50]:
        assert s.index_of(h) == index
    with pytest.raises(ValueError, match="over the kernel's"):
        Steering(owners, tuple(range(BUCKETS)), {rng.getrandbits(32): 0 for _ in range(2000)},
                 True, SEED).program()


def test_buckets_spread_flows_like_a_uniform_hash() -> None:
    counts = [0] * 4
    table = Table.initial(range(4))
    for ip, port in _flows(4000):
        counts[table.owners[bucket_of(flow_hash(ipaddress.ip_address(ip).packed, port, SEED))]] += 1
    assert max(counts) / min(counts) < 1.15


def test_the_seed_changes_the_mapping() -> None:
    flows = _flows(200)
    a = [bucket_of(flow_hash(ipaddress.ip_address(ip).packed, p, 1)) for ip, p in flows]
    b = [bucket_of(flow_hash(ipaddress.ip_address(ip).packed, p, 2)) for ip, p in flows]
    assert sum(x == y for x, y in zip(a, b, strict=True)) < 20
