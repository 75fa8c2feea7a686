"""Flow steering: which socket of a reuseport group gets each flow. Pure.

The master attaches a classic BPF program to each unicast listener's
reuseport group (``SO_ATTACH_REUSEPORT_CBPF``); the kernel runs it for every
datagram and delivers to the socket whose index it returns. This module
builds that program, and everything needed to trust it: the same hash in
Python (``flow_hash``), the same answer computed declaratively
(``Steering.index_of``), and an interpreter that runs the program on a
packet (``run``) so tests hold the three against each other and against the
kernel.

Rules:

1. A flow is (source address, source port). Its hash mixes a per-master
   secret seed, so nobody outside can aim flows at one slot.
2. A flow's *home* is the slot owning its bucket in the ``Table`` (the top
   ``BUCKET_BITS`` bits of the hash). The table changes only when slots are
   added or removed, and then minimally: a new slot takes about 1/(N+1) of
   the buckets, evenly from the others; a removed slot's buckets are spread
   evenly over the rest; no other bucket moves. Every slot owns
   ``BUCKETS // N`` or one more.
3. A slot that is not serving (no READY worker reads it) lends its buckets
   to the serving slots, spread evenly, until it serves again. No bucket of a
   serving slot ever moves for that.
4. A pinned flow (a session held by a draining worker) goes to the socket
   named by its pin, whatever its bucket says.
5. The kernel picks ``socks[index]``; an index past the group's end falls
   back to the kernel's own hash. Indices follow the group's membership, so a
   program is rebuilt and re-attached after every membership change.

Limits with reasons: the kernel takes at most ``MAX_INSNS`` instructions;
jumps are forward only, with 8-bit conditional offsets (longer ones go
through ``ja``). The bucket table costs about two instructions per run of
equal owners, a pin about three; ``PIN_CAPACITY`` is what is left for pins
in the worst case.

Known gap: for IPv6 the UDP source port is read at the fixed offset after
the 40-byte header; a datagram with extension headers hashes other bytes
(consistently per packet), so its flow may not follow its pin.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Final

#: A classic BPF instruction: (code, jt, jf, k).
Insn = tuple[int, int, int, int]

MAX_INSNS: Final = 4096
BUCKET_BITS: Final = 10
#: Buckets of the home table: with at most 1024 workers every slot owns one.
BUCKETS: Final = 1 << BUCKET_BITS
#: Pins a program can hold on top of the largest possible bucket table (1024
#: runs); a usual table (a few runs per slot) leaves room for about twice as
#: many (``Steering.room_for_pins``).
PIN_CAPACITY: Final = 600
#: What a pin costs at most: a compare and a return, plus its share of the
#: search tree's compares and long jumps.
_PIN_COST: Final = 3

SKF_NET_OFF: Final = -0x100000
_MASK: Final = 0xFFFFFFFF
_M1: Final = 0x9E3779B1
_C1: Final = 0x85EBCA6B
_C2: Final = 0xC2B2AE35
#: The index the program returns for "no socket": past any group's end, so
#: the kernel falls back to its own hash.
NO_SOCKET: Final = _MASK

# Opcodes (linux/filter.h).
_LD_IMM: Final = 0x00
_LD_W_ABS: Final = 0x20
_LD_H_ABS: Final = 0x28
_LD_B_ABS: Final = 0x30
_LD_W_IND: Final = 0x40
_LD_H_IND: Final = 0x48
_LD_MEM: Final = 0x60
_LDX_MEM: Final = 0x61
_LDX_B_MSH: Final = 0xB1
_ST: Final = 0x02
_MUL_K: Final = 0x24
_RSH_K: Final = 0x74
_XOR_X: Final = 0xAC
_XOR_K: Final = 0xA4
_JA: Final = 0x05
_JEQ_K: Final = 0x15
_JGT_K: Final = 0x25
_JGE_K: Final = 0x35
_RET_K: Final = 0x06
_TAX: Final = 0x07


def _net(off: int) -> int:
    return (SKF_NET_OFF + off) & _MASK


# -- the hash --------------------------------------------------------------------


def flow_hash(address: bytes, port: int, seed: int) -> int:
    """The 32-bit hash of a flow (source address bytes, source port), as the program computes it."""
    h = seed & _MASK
    for (word,) in struct.iter_unpack("!I", address):
        h = ((h ^ word) * _M1) & _MASK
        h ^= h >> 15
    h ^= port
    h ^= h >> 16
    h = (h * _C1) & _MASK
    h ^= h >> 13
    h = (h * _C2) & _MASK
    h ^= h >> 16
    return h


def bucket_of(h: int) -> int:
    return h >> (32 - BUCKET_BITS)


def hash_flow(host: str, port: int, seed: int) -> int:
    """``flow_hash`` of a sender as Python names it (``host``, ``port``)."""
    return flow_hash(ipaddress.ip_address(host).packed, port, seed)


def _hash_code(ipv6: bool, seed: int) -> list[Insn]:
    """Instructions leaving ``flow_hash`` of the datagram's source in A (and in M[0])."""
    code: list[Insn] = [(_LD_IMM, 0, 0, seed & _MASK)]
    first = 8 if ipv6 else 12
    for i in range(4 if ipv6 else 1):
        code += [(_TAX, 0, 0, 0), (_LD_W_ABS, 0, 0, _net(first + 4 * i)), (_XOR_X, 0, 0, 0),
                 (_MUL_K, 0, 0, _M1), (_TAX, 0, 0, 0), (_RSH_K, 0, 0, 15), (_XOR_X, 0, 0, 0)]
    code.append((_ST, 0, 0, 0))
    if ipv6:
        code.append((_LD_H_ABS, 0, 0, _net(40)))
    else:
        # X = 4 * IHL: the UDP header follows the IPv4 header and its options.
        code += [(_LDX_B_MSH, 0, 0, _net(0)), (_LD_H_IND, 0, 0, _net(0))]
    code += [(_LDX_MEM, 0, 0, 0), (_XOR_X, 0, 0, 0)]
    for shift, mul in ((16, _C1), (13, _C2), (16, 0)):
        code += [(_TAX, 0, 0, 0), (_RSH_K, 0, 0, shift), (_XOR_X, 0, 0, 0)]
        if mul:
            code.append((_MUL_K, 0, 0, mul))
    return code


# -- the home table ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Table:
    """The home slot of every bucket. Immutable: ``with_slots`` returns the next one."""

    owners: tuple[int, ...]

    @classmethod
    def initial(cls, slots: Iterable[int]) -> Table:
        """Contiguous, even ranges: one run per slot."""
        order = sorted(set(slots))
        if not order:
            raise ValueError("a table needs at least one slot")
        n = len(order)
        return cls(tuple(order[b * n // BUCKETS] for b in range(BUCKETS)))

    @property
    def slots(self) -> frozenset[int]:
        return frozenset(self.owners)

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.owners:
            out[s] = out.get(s, 0) + 1
        return out

    def with_slots(self, slots: Iterable[int]) -> Table:
        """The table for ``slots``, moving only what must move (see the module's rule 2)."""
        want = sorted(set(slots))
        if not want:
            raise ValueError("a table needs at least one slot")
        have = self.counts()
        n = len(want)
        # Whoever owns more now keeps the one-bucket surplus: fewer moves.
        ranked = sorted(want, key=lambda s: (-have.get(s, 0), s))
        target = {s: BUCKETS // n + (1 if i < BUCKETS % n else 0) for i, s in enumerate(ranked)}
        owners = list(self.owners)
        released: list[int] = []
        for s in sorted(have):
            excess = have[s] - target.get(s, 0)
            if excess <= 0:
                continue
            # A donor gives its highest buckets: its runs stay contiguous.
            mine = [b for b in range(BUCKETS - 1, -1, -1) if owners[b] == s]
            released += mine[:excess]
        released.sort()
        receivers = sorted((s for s in want if have.get(s, 0) < target[s]),
                           key=lambda s: (have.get(s, 0), s))
        at = 0
        for s in receivers:
            need = target[s] - have.get(s, 0)
            for b in released[at:at + need]:
                owners[b] = s
            at += need
        return Table(tuple(owners))

    def moved(self, other: Table) -> float:
        """The share of buckets whose home differs in ``other``."""
        return sum(a != b for a, b in zip(self.owners, other.owners, strict=True)) / BUCKETS


def lend(owners: Sequence[int], serving: Iterable[int]) -> list[int]:
    """Effective owners: each bucket of a slot not in ``serving`` lent to a serving slot.

    Spread by bucket number, so a down slot's flows fall evenly on the others;
    with nothing serving, every bucket stays home (there is nowhere to go).
    """
    live = sorted(set(serving))
    if not live:
        return list(owners)
    alive = set(live)
    return [s if s in alive else live[b % len(live)] for b, s in enumerate(owners)]


# -- the program -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Steering:
    """Everything one listener's program depends on, and the program itself.

    Sockets are named by *keys* (the steering service uses (slot,
    generation)): ``members`` lists the group's sockets in the kernel's order;
    ``owners`` gives each bucket's socket (after ``lend``); ``pins`` maps a
    held flow's hash to the socket that keeps it.
    """

    owners: tuple[Hashable, ...]
    members: tuple[Hashable, ...]
    pins: Mapping[int, Hashable]
    ipv6: bool
    seed: int

    def index_of(self, h: int) -> int:
        """The socket index the program returns for a flow of hash ``h`` (declaratively)."""
        index = self._slot_index()
        pinned = self.pins.get(h)
        if pinned is not None:
            return index.get(pinned, NO_SOCKET)
        return index.get(self.owners[bucket_of(h)], NO_SOCKET)

    def _slot_index(self) -> dict[Hashable, int]:
        return {key: i for i, key in enumerate(self.members)}

    def runs(self) -> list[tuple[int, int]]:
        """(first bucket, socket index) of each run of buckets sent to one socket."""
        index = self._slot_index()
        out: list[tuple[int, int]] = []
        for b, s in enumerate(self.owners):
            i = index.get(s, NO_SOCKET)
            if not out or out[-1][1] != i:
                out.append((b, i))
        return out

    def room_for_pins(self) -> int:
        """How many pins this table leaves room for (at least PIN_CAPACITY)."""
        fixed = len(_hash_code(self.ipv6, self.seed)) + len(self._table_code())
        return max(PIN_CAPACITY, (MAX_INSNS - fixed) // _PIN_COST)

    def _table_code(self) -> list[Insn]:
        return [(_RSH_K, 0, 0, 32 - BUCKET_BITS), *_search(self.runs())]

    def program(self) -> list[Insn]:
        """The classic BPF program; ValueError if it would not fit the kernel's limit."""
        index = self._slot_index()
        pins = _pin_tree(sorted((h, index.get(key, NO_SOCKET)) for h, key in self.pins.items()),
                         []) if self.pins else []
        code = _hash_code(self.ipv6, self.seed) + pins + self._table_code()
        if len(code) > MAX_INSNS:
            raise ValueError(f"steering program of {len(code)} instructions is over the "
                             f"kernel's {MAX_INSNS} ({len(self.pins)} pins)")
        return code


def _jump(code: int, k: int, skip: list[Insn]) -> list[Insn]:
    """``if (A <code> k) goto past skip`` followed by ``skip``, with a long jump if needed."""
    if len(skip) <= 255:
        return [(code, len(skip), 0, k), *skip]
    return [(code, 0, 1, k), (_JA, 0, 0, len(skip)), *skip]


def _search(runs: Sequence[tuple[int, int]]) -> list[Insn]:
    """Binary search of the bucket in A over runs (first bucket, index): return the index."""
    if len(runs) == 1:
        return [(_RET_K, 0, 0, runs[0][1])]
    mid = len(runs) // 2
    left, right = _search(runs[:mid]), _search(runs[mid:])
    return _jump(_JGE_K, runs[mid][0], left) + right


def _pin_tree(pins: Sequence[tuple[int, int]], after: list[Insn]) -> list[Insn]:
    """Code for ``pins`` given that ``after`` (the rest of the pins code) follows it.

    Every miss must land on the first instruction past all pins code, which
    is ``len(after)`` instructions past the end of this subtree.
    """
    if len(pins) <= 3:
        code: list[Insn] = []
        for h, index in pins:
            code += [(_JEQ_K, 0, 1, h), (_RET_K, 0, 0, index)]
        code.append((_JA, 0, 0, len(after)))
        return code
    mid = len(pins) // 2
    # Right subtree first: its misses skip only what follows it.
    right = _pin_tree(pins[mid:], after)
    left = _pin_tree(pins[:mid], right + after)
    return _jump(_JGT_K, pins[mid - 1][0], left) + right


# -- an interpreter, to test the program without a kernel -------------------------


def run(program: Sequence[Insn], network: bytes, payload: bytes = b"") -> int:
    """Run ``program`` as the kernel's reuseport hook does: ``payload`` at offset 0,
    the network header (IP, then UDP) at SKF_NET_OFF. Returns what it returns."""
    a = x = 0
    mem = [0] * 16
    pc = 0

    def load(off: int, size: int) -> int:
        if off >= SKF_NET_OFF & _MASK:
            off -= 1 << 32
        buf, at = (network, off - SKF_NET_OFF) if off < 0 else (payload, off)
        if at < 0 or at + size > len(buf):
            raise IndexError(f"load of {size} bytes at {off} is outside the packet")
        return int.from_bytes(buf[at:at + size], "big")

    for _ in range(MAX_INSNS + 1):
        code, jt, jf, k = program[pc]
        pc += 1
        if code == _LD_IMM:
            a = k
        elif code in (_LD_W_ABS, _LD_H_ABS, _LD_B_ABS):
            a = load(k, {_LD_W_ABS: 4, _LD_H_ABS: 2, _LD_B_ABS: 1}[code])
        elif code in (_LD_W_IND, _LD_H_IND):
            a = load((x + k) & _MASK, 4 if code == _LD_W_IND else 2)
        elif code == _LDX_B_MSH:
            x = 4 * (load(k, 1) & 0xF)
        elif code == _LD_MEM:
            a = mem[k]
        elif code == _LDX_MEM:
            x = mem[k]
        elif code == _ST:
            mem[k] = a
        elif code == _TAX:
            x = a
        elif code == _XOR_X:
            a ^= x
        elif code == _XOR_K:
            a ^= k
        elif code == _MUL_K:
            a = (a * k) & _MASK
        elif code == _RSH_K:
            a >>= k
        elif code == _JA:
            pc += k
        elif code in (_JEQ_K, _JGT_K, _JGE_K):
            hit = a == k if code == _JEQ_K else a > k if code == _JGT_K else a >= k
            pc += jt if hit else jf
        elif code == _RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} is not one the steering program uses")
    raise ValueError("the program did not return")
