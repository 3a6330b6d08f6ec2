"""Several return probes on one function, without a guest: one hijack per call, one
instance per probe, every handler at the return (the last hooked first), misses counted
per probe. The guest's side of it is in ``test_kretprobes`` and the differential harness.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance, KretprobeManager
from kprobevm.kprobes.retrecord import GUEST_ENTRIES
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.rethook import ENTRY

TRAMPOLINE, TABLE = 0xFFFFFFFFC0001000, 0xFFFFFFFFC0002000
HOST = TABLE + ENTRY * GUEST_ENTRIES  # the host's first entry (the guest's come first)
SLOT, CALLER = 0xFFFFC90000003F00, 0xFFFFFFFF81234567


class _Words:
    """Guest memory as a dict of bytes (a MemoryTransport)."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def read_memory(self, addr: int, n: int) -> bytes:
        return bytes(self.bytes.get(addr + i, 0) for i in range(n))

    def write_memory(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[addr + i] = b

    read_phys, write_phys = read_memory, write_memory


class _Target:
    """Writes queued for the resume, applied by :meth:`resume`, as Target does."""

    def __init__(self, words: _Words) -> None:
        self.words = words
        self.queued: list[tuple[int, bytes]] = []
        self.write_backs = 0

    def queue_write(self, address: int, data: bytes) -> None:
        self.queued.append((address, data))

    def resume(self) -> None:
        self.write_backs += 1
        for address, data in self.queued:
            self.words.write_memory(address, data)
        self.queued = []


def _manager() -> tuple[KretprobeManager, _Words, _Target]:
    words = _Words()
    target = _Target(words)
    returns = KretprobeManager(
        SimpleNamespace(), symbols=SimpleNamespace(), target=target,  # type: ignore[arg-type]
        memory=GuestMemory(words), task_layout=lambda: None,
    )  # fmt: skip
    returns.trampoline, returns.table = TRAMPOLINE, TABLE
    return returns, words, target


def _u64(words: _Words, addr: int) -> int:
    value: int = struct.unpack("<Q", words.read_memory(addr, 8))[0]
    return value


def _call(returns: KretprobeManager, words: _Words, target: _Target,
          probes: list[Kretprobe], slot: int = SLOT) -> None:  # fmt: skip
    """One call's entry stop: each probe's entry handler in registration order."""
    words.write_memory(slot, struct.pack("<Q", CALLER))
    regs = PtRegs.from_gdb({"rsp": slot, "rip": 0}, cpu=0)
    for rp in probes:
        returns._entry(rp, regs)
    target.resume()


def _return(returns: KretprobeManager, words: _Words, ax: int, slot: int = SLOT) -> dict[str, int]:
    """The trampoline's work (real address back, entry freed), then the host's stop."""
    for pos in range(TABLE, TABLE + 4096, ENTRY):
        if _u64(words, pos) == slot:
            words.write_memory(slot, words.read_memory(pos + 8, 8))
            words.write_memory(pos, bytes(ENTRY))
            break
    return returns.on_return({"rsp": slot, "rax": ax, "rip": 0}, 0, redirect=False)


def _recording(seen: list[tuple[str, int, int, bool]], name: str) -> Kretprobe:
    def handler(ri: KretprobeInstance, regs: PtRegs) -> None:
        seen.append((name, ri.ret_addr, regs.ax, ri.chained))

    return Kretprobe(symbol_name="do_sys_openat2", handler=handler, maxactive=4)


def _registered(*probes: Kretprobe) -> None:
    for rp in probes:
        rp.registered = True


def test_two_return_probes_on_one_call_both_return_with_the_real_caller() -> None:
    returns, words, target = _manager()
    seen: list[tuple[str, int, int, bool]] = []
    newer, older = _recording(seen, "newer"), _recording(seen, "older")
    _registered(newer, older)
    _call(returns, words, target, [newer, older])  # the newest definition runs first
    assert _u64(words, SLOT) == TRAMPOLINE  # one hijack
    assert [_u64(words, HOST), _u64(words, HOST + 8)] == [SLOT, CALLER]
    assert _u64(words, HOST + ENTRY) == 0  # one table entry for the call
    assert (newer.active, older.active) == (1, 1)
    _return(returns, words, ax=3)
    # the last hooked first, as the kernel's rethook; the older one's address is the
    # newer one's trampoline in the kernel (chained), the real caller here
    assert seen == [("older", CALLER, 3, True), ("newer", CALLER, 3, False)]
    assert (newer.nhit, older.nhit, newer.active, older.active) == (1, 1, 0, 0)
    assert (newer.nmissed, older.nmissed) == (0, 0)
    assert _u64(words, SLOT) == CALLER and not returns.by_slot


def test_maxactive_of_one_probe_does_not_cost_the_other_its_returns() -> None:
    returns, words, target = _manager()
    seen: list[tuple[str, int, int, bool]] = []
    small, big = _recording(seen, "small"), _recording(seen, "big")
    small.maxactive = 1
    _registered(small, big)
    _call(returns, words, target, [small, big], slot=SLOT)
    _call(returns, words, target, [small, big], slot=SLOT - 0x100)  # nested: small is full
    assert (small.active, big.active, small.nmissed, big.nmissed) == (1, 2, 1, 0)
    chain = returns.by_slot[SLOT - 0x100]
    assert [ri.rp for ri in chain] == [big] and not chain[0].chained
    _return(returns, words, ax=1, slot=SLOT - 0x100)
    _return(returns, words, ax=2, slot=SLOT)
    assert seen == [("big", CALLER, 1, False), ("big", CALLER, 2, True),
                    ("small", CALLER, 2, False)]  # fmt: skip
    assert (small.active, big.active) == (0, 0)


def test_a_call_left_at_the_slot_is_not_joined_by_the_next() -> None:
    """A call that never returned (do_exit) leaves its instances; the next call at the
    same slot starts a hijack of its own and drops the old one's guest entry."""
    returns, words, target = _manager()
    seen: list[tuple[str, int, int, bool]] = []
    a, b = _recording(seen, "a"), _recording(seen, "b")
    _registered(a, b)
    _call(returns, words, target, [a, b])
    _call(returns, words, target, [a, b])  # the stack moved on: the slot is a new call's
    assert [ri.chained for ri in returns.by_slot[SLOT]] == [False, True]
    assert (a.active, b.active) == (1, 1)
    entries = [_u64(words, HOST + ENTRY * i) for i in range(4)]
    assert entries.count(SLOT) == 1
    _return(returns, words, ax=0)
    assert [name for name, *_ in seen] == ["b", "a"]


def test_an_unregistered_probe_returns_quietly_and_the_other_still_runs() -> None:
    returns, words, target = _manager()
    seen: list[tuple[str, int, int, bool]] = []
    a, b = _recording(seen, "a"), _recording(seen, "b")
    _registered(a, b)
    _call(returns, words, target, [a, b])
    a.registered = False  # unregistered with the call in flight
    assert _return(returns, words, ax=7) == {}
    assert seen == [("b", CALLER, 7, True)] and a.active == 0 and a.nhit == 0
