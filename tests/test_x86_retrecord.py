"""A recorded return run in unicorn, entry to caller: the hijack takes an instance and a
table entry and puts the trampoline in the return slot; the function returns into the
trampoline, which returns into the return program; the record holds the registers as
the function returned them, and the caller gets every register as the function left it.
Past maxactive the call is missed and returns directly."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

from kprobevm.kprobes.recorder import decode_record
from kprobevm.x86 import record as rec
from kprobevm.x86.record import CopyHelpers, RecordLayout, RingLayout
from kprobevm.x86.rethook import ENTRY, assemble_trampoline
from kprobevm.x86.retrecord import (
    ReturnProbe,
    ReturnTable,
    build_hijack_program,
    build_return_program,
)
from tests._gas import gas_text, needs_gas
from tests._x86_unicorn import GPRS, Machine, unicorn

HIJACK = 0xFFFFFFFFA0100000
RETURN_PROGRAM = 0xFFFFFFFFA0101000
CONTROL = 0xFFFFFFFFA0102000
COUNTERS = 0xFFFFFFFFA0103000
RING = 0xFFFFFFFFA0104000
TABLE = 0xFFFFFFFFA0105000
INFO = 0xFFFFFFFFA0106000
ACTIVES = 0xFFFFFFFFA0107000
TRAMPOLINE = 0xFFFFFFFFA0108000
MAILBOX = 0xFFFFFFFFA0109000
FUNCTION = 0xFFFFFFFFA0200000  # the rest of the probed function: mov eax, 42; ret
CALLER = 0xFFFFFFFFA0300000
PERCPU = 0xFFFF888000200000
TASK = 0xFFFF888000300000
STACK = 0xFFFFC90000004000
GDT = 0xFFFFFFFFFF000000
RING_SIZE = 0x1000
PROBE_ID, BIT, MAXACTIVE = 7, 5, 2

RING_LAYOUT = RingLayout(
    head=CONTROL, tail=CONTROL + 64, drain=CONTROL + 128, busy=CONTROL + 256, max_cpus=256,
    counters=COUNTERS, ring=RING, ring_size=RING_SIZE, high_water=RING_SIZE // 2,
)  # fmt: skip
HELPERS = CopyHelpers(
    copy_from_kernel=0xFFFFFFFF81100000, copy_from_user=0xFFFFFFFF81100010,
    strncpy_from_kernel=0xFFFFFFFF81100020, strncpy_from_user=0xFFFFFFFF81100030,
    cpu_number=0x40, current_task=0x48, task_pid=0x10, task_comm=0x20,
)  # fmt: skip
RETURNS = ReturnTable(table=TABLE, entries=64, info=INFO, actives=ACTIVES, trampoline=TRAMPOLINE)
PROBE = ReturnProbe(BIT, PROBE_ID, MAXACTIVE, RecordLayout(()))


def return_machine(probe: ReturnProbe, returns: ReturnTable, *, pages: tuple[int, ...] = (),
                   cpu: int = 3) -> Machine:
    """A probed function's call laid out for unicorn: ``probe``'s hijack at HIJACK, its
    return program, the trampoline, the ring, table and per-CPU pages (and ``pages``
    more), ``cpu`` as this CPU's number and TASK as ``current``."""
    m = Machine()
    hijack = build_hijack_program(
        HIJACK, probes=(probe,), returns=returns, ring=RING_LAYOUT, program=RETURN_PROGRAM,
        cont=FUNCTION,
    ).code  # fmt: skip
    back = build_return_program(
        RETURN_PROGRAM, probes=(probe,), returns=returns, ring=RING_LAYOUT, helpers=HELPERS
    ).code
    trampoline = assemble_trampoline(
        TRAMPOLINE, table=TABLE, entries=4096 // ENTRY, mailbox=MAILBOX, info=INFO
    ).code
    for va, code in ((HIJACK, hijack), (RETURN_PROGRAM, back), (TRAMPOLINE, trampoline)):
        m.map(va, 0x1000, b"\xcc")
        m.write(va, code)
    for va in (CONTROL, COUNTERS, RING, TABLE, INFO, ACTIVES, MAILBOX, PERCPU, TASK, *pages):
        m.map(va, 0x1000)
    m.map(STACK - 0x3000, 0x4000)
    m.map(FUNCTION, 0x1000, b"\xcc")
    m.write(FUNCTION, b"\xb8\x2a\x00\x00\x00\xc3")  # mov eax, 42; ret
    m.map(CALLER, 0x1000, b"\xf4")
    m.write(PERCPU + 0x40, struct.pack("<I", cpu))
    m.write(PERCPU + 0x48, struct.pack("<Q", TASK))
    m.write(TASK + 0x10, struct.pack("<i", 4242))
    m.write(TASK + 0x20, b"workload\0".ljust(16, b"\0"))
    m.start_paging(GDT)
    m.uc.msr_write(0xC0000101, PERCPU)  # IA32_GS_BASE: the per-CPU area
    return m


def _machine() -> Machine:
    return return_machine(PROBE, RETURNS)


def call_through(
    m: Machine, seed: int, *, max_insns: int = 3000, each: Callable[[int], None] | None = None
) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """Enter the function at its probe with a random context; run until the caller
    (``each(addr)`` at every instruction on the way). The registers before and after,
    and the addresses run."""
    rng = random.Random(seed)
    regs = {r: rng.getrandbits(64) for r in GPRS if r != "rsp"}
    sp = STACK - 0x100
    regs.update(rsp=sp, eflags=0x246)
    m.write(sp, struct.pack("<Q", CALLER))
    m.set_regs(regs)
    before = m.regs()
    seen: list[int] = []
    ours = (HIJACK, RETURN_PROGRAM, TRAMPOLINE, FUNCTION)

    def hook(uc: object, addr: int, size: int, _data: object) -> None:
        if not any(base <= addr < base + 0x1000 for base in ours):
            m.uc.emu_stop()
            return
        seen.append(addr)
        if each is not None:
            each(addr)

    handle = m.uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    try:
        m.uc.emu_start(HIJACK, 0, count=max_insns)
    finally:
        m.uc.hook_del(handle)
    return before, m.regs(), seen


def as_returned(before: dict[str, int], after: dict[str, int]) -> None:
    """The caller sees the function's return: every register as it came but rax, and the
    stack popped."""
    assert after["rip"] == CALLER
    assert after["rsp"] == before["rsp"] + 8
    assert after["rax"] == 42
    for name in GPRS:
        if name not in ("rax", "rsp"):
            assert after[name] == before[name], name
    assert after["eflags"] & 0xCD5 == before["eflags"] & 0xCD5


def test_a_return_is_recorded_without_a_stop() -> None:
    m = _machine()
    before, after, seen = call_through(m, 1)
    as_returned(before, after)
    assert any(TRAMPOLINE <= a < TRAMPOLINE + 0x1000 for a in seen)
    assert any(RETURN_PROGRAM <= a < RETURN_PROGRAM + 0x1000 for a in seen)
    slot = before["rsp"]
    assert m.u64(slot) == CALLER  # the real return address back in its slot
    assert m.u64(TABLE) == 0 and m.u64(ACTIVES + 8 * BIT) == 0  # entry and instance given back
    hits, missed = struct.unpack("<QQ", m.read(COUNTERS + 16 * PROBE_ID, 16))
    assert (hits, missed) == (1, 0)
    assert m.u64(RING) == 1  # the stamp: position 0 + 1
    size = rec.RecordLayout(()).size
    record = decode_record(m.read(RING, size), PROBE.layout)
    assert record.probe_id == PROBE_ID and record.pid == 4242 and record.comm == "workload"
    assert record.regs["ip"] == CALLER and record.regs["sp"] == slot + 8
    assert record.regs["ax"] == 42 and record.regs["bx"] == before["rbx"]


def test_past_maxactive_a_call_is_missed_and_returns_directly() -> None:
    m = _machine()
    m.write(ACTIVES + 8 * BIT, struct.pack("<Q", MAXACTIVE))  # two calls in flight
    before, after, seen = call_through(m, 2)
    as_returned(before, after)
    assert not any(TRAMPOLINE <= a < TRAMPOLINE + 0x1000 for a in seen)
    assert m.u64(TABLE) == 0 and m.u64(ACTIVES + 8 * BIT) == MAXACTIVE
    assert struct.unpack("<QQ", m.read(COUNTERS + 16 * PROBE_ID, 16)) == (0, 1)
    assert m.u64(RING) == 0


def test_a_stale_entry_at_the_slot_is_taken_over() -> None:
    """A call that never came back left an entry at this slot, after a free one: the new
    call takes the free one first, and the trampoline finds it before the stale one."""
    m = _machine()
    slot = STACK - 0x100
    m.write(TABLE + ENTRY, struct.pack("<QQ", slot, 0xDEAD))
    before, after, _ = call_through(m, 3)
    as_returned(before, after)
    assert m.u64(TABLE) == 0  # ours, taken and given back
    m2 = _machine()
    m2.write(TABLE, struct.pack("<QQ", slot, 0xDEAD))  # the stale one first
    before, after, _ = call_through(m2, 4)
    as_returned(before, after)
    assert m2.u64(TABLE) == 0  # taken over, then given back


@needs_gas
def test_listings_assemble_to_the_programs() -> None:
    """GNU as agrees with the assembler on the hijack, the return program and the
    trampoline that knows return programs; each is instructions, not bytes."""
    programs = (
        build_hijack_program(
            HIJACK, probes=(PROBE, ReturnProbe(1, 9, 4, RecordLayout(()))), returns=RETURNS,
            ring=RING_LAYOUT, program=RETURN_PROGRAM, cont=FUNCTION,
        ),
        build_return_program(
            RETURN_PROGRAM, probes=(PROBE,), returns=RETURNS, ring=RING_LAYOUT, helpers=HELPERS
        ),
        assemble_trampoline(
            TRAMPOLINE, table=TABLE, entries=4096 // ENTRY, mailbox=MAILBOX, info=INFO
        ),
    )  # fmt: skip
    for program in programs:
        assert gas_text(program.listing) == program.code
        assert ".byte" not in program.listing
