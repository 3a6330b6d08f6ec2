"""The guest's own ORC walk (count --by stack) run in unicorn over a made-up kernel: its
ORC tables, ``orc_lookup`` built as the kernel builds it at boot, a task stack and an IRQ
stack. Each key must be the stack the host's unwinder (kernel/orc.py's tables,
x86/unwind_orc.py) finds in the same memory, in both entry layouts; a walk the host
ends early must be cut, with the reason, and every register must be as the probe left it."""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

import pytest

from kprobevm.kernel.orc import END_FORMAT, OLD_FORMAT, SIGNAL_FORMAT, OrcFormat, OrcTable
from kprobevm.kprobes.aggregations import Aggregation, StackKey, decode_map
from kprobevm.x86 import aggregate as agg
from kprobevm.x86 import orc_walk as ow
from kprobevm.x86.orc_walk import OrcWalkTables
from kprobevm.x86.unwind_orc import unwind
from tests._gas import gas_text, needs_gas
from tests._x86_unicorn import GPRS, Machine, assert_left_intact
from tests.test_x86_record import (
    CONT,
    CONTROL,
    COUNTERS,
    CPU,
    GDT,
    HELPER_ADDRS,
    HELPERS,
    PERCPU,
    PROBE_ID,
    PROGRAM,
    RING_LAYOUT,
    TASK,
)

TEXT = 0xFFFFFFFF81000000
TEXT_SIZE = 0x4000
INIT = 0xFFFFFFFF82000000
INIT_SIZE = 0x1000
TABLES = 0xFFFFFFFF82400000
MAP = 0xFFFFFFFFA0110000
TASK_STACK = 0xFFFFC90000010000
IRQ_STACK = 0xFFFFC90000020000
MODULE_TEXT = 0xFFFFFFFFC0001000
SIZE = 0x4000
NCPUS = 4
TASK_STACK_AT, IRQ_PTR_AT = 0x18, 0x50
USER_CS, KERNEL_CS = 0x33, 0x10
SP, BP, PREV_SP, UNDEF, SP_INDIRECT, R10 = 5, 4, 1, 0, 9, 6
CALL, REGS, PARTIAL, END = "call", "regs", "regs_partial", "end"


def _bits(fmt: OrcFormat, sp_reg: int, bp_reg: int, kind: str) -> int:
    if fmt.signal_bit:
        code = {"undefined": 0, END: 1, CALL: 2, REGS: 3, PARTIAL: 4}[kind]
        signal = kind in (REGS, PARTIAL)
        return sp_reg | bp_reg << 4 | code << 8 | signal << 11
    if kind in (END, "undefined"):
        return bp_reg << 4 | (kind == END) << 10
    return sp_reg | bp_reg << 4 | {CALL: 0, REGS: 1, PARTIAL: 2}[kind] << 8


@dataclass
class Kernel:
    """The made-up kernel: ORC entries by address, and the words of its two stacks."""

    fmt: OrcFormat
    orc: dict[int, tuple[int, int, int, int, str]] = field(default_factory=dict)
    words: dict[int, int] = field(default_factory=dict)

    def entry(self, ip: int, sp_reg: int, sp_off: int, bp_reg: int = UNDEF, bp_off: int = 0,
              kind: str = CALL) -> None:  # fmt: skip
        self.orc[ip] = (sp_off, bp_off, sp_reg, bp_reg, kind)

    def tables(self) -> tuple[list[int], bytes]:
        ips = sorted(self.orc)
        raw = b"".join(struct.pack("<hhH", o[0], o[1], _bits(self.fmt, o[2], o[3], o[4]))
                       for o in (self.orc[ip] for ip in ips))  # fmt: skip
        return ips, raw


def _lookup_table(ips: list[int]) -> list[int]:
    """``orc_lookup`` as the kernel fills it at boot: per 256-byte block of core text, the
    entry in force at its start (the first entry when none is)."""
    blocks = (TEXT_SIZE + 255) // 256 + 1
    return [max(0, bisect.bisect_right(ips, TEXT + 256 * i) - 1) for i in range(blocks)]


IP_TABLE, ENTRIES, LOOKUP = TABLES, TABLES + 0x10000, TABLES + 0x20000


def _tables(k: Kernel) -> OrcWalkTables:
    ips, _ = k.tables()
    return OrcWalkTables(
        text=(TEXT, TEXT + TEXT_SIZE), init_text=(INIT, INIT + INIT_SIZE), ip_table=IP_TABLE,
        entries=ENTRIES, count=len(ips), lookup=LOOKUP, lookup_blocks=len(_lookup_table(ips)),
        signal_bit=k.fmt.signal_bit, indirect_offset_after=k.fmt.indirect_offset_after,
        thread_size=SIZE, task_stack=TASK_STACK_AT, irq_stack_ptr=IRQ_PTR_AT,
        current_task=HELPER_ADDRS.current_task,
    )  # fmt: skip


def _machine(k: Kernel, depth: int, probe: int) -> tuple[Machine, agg.MapLayout, int, OrcTable]:
    ips, raw = k.tables()
    lookup = _lookup_table(ips)
    ip_table, entries, lookup_at = IP_TABLE, ENTRIES, LOOKUP
    t = _tables(k)
    layout = Aggregation(by="stack", depth=depth, walk=t, entries=64).layout(MAP, NCPUS)
    code = agg.build_aggregate_program(
        PROGRAM, probe_id=PROBE_ID, layout=layout, field=None, ring=RING_LAYOUT,
        helpers=HELPER_ADDRS, cont=CONT, walk=t, probe_ip=probe,
    ).code  # fmt: skip
    m = Machine()
    m.map(PROGRAM, 0x2000, b"\xcc")
    m.write(PROGRAM, code)
    for va, size in ((CONTROL, 0x1000), (COUNTERS, 0x1000), (MAP, layout.size),
                     (PERCPU, 0x1000), (TASK, 0x1000), (TABLES, 0x30000),
                     (TASK_STACK, SIZE), (IRQ_STACK, SIZE)):  # fmt: skip
        m.map(va, size)
    rel = b"".join(struct.pack("<i", ip - (ip_table + 4 * i)) for i, ip in enumerate(ips))
    m.write(ip_table, rel)
    m.write(entries, raw)
    m.write(lookup_at, struct.pack(f"<{len(lookup)}I", *lookup))
    for addr, value in k.words.items():
        m.write(addr, struct.pack("<Q", value & (2**64 - 1)))
    m.map(CONT, 0x1000, b"\xf4")
    m.map(HELPERS, 0x1000, b"\xcc")
    m.write(PERCPU + 0x40, struct.pack("<I", CPU))
    m.write(PERCPU + 0x48, struct.pack("<Q", TASK))
    m.write(PERCPU + IRQ_PTR_AT, struct.pack("<Q", IRQ_STACK + SIZE - 8))
    m.write(TASK + TASK_STACK_AT, struct.pack("<Q", TASK_STACK))
    m.start_paging(GDT)
    m.uc.msr_write(0xC0000101, PERCPU)
    return m, layout, len(code), OrcTable(ips, raw, k.fmt, (TEXT, INIT + INIT_SIZE))


def _hit(m: Machine, length: int, regs: dict[str, int]) -> None:
    before = {r: 0x1111 * (i + 1) for i, r in enumerate(GPRS)}
    before.update(regs, eflags=0x246)
    m.set_regs(before)

    m.run(PROGRAM, inside=(PROGRAM, PROGRAM + length), max_insns=100000)
    assert_left_intact(m, before, CONT)


def _walk(
    k: Kernel, regs: dict[str, int], probe: int, depth: int = 16
) -> tuple[StackKey, list[int], str | None]:
    """The guest's key for one hit, and the host's stack (entries, error) in the same memory."""
    m, layout, n, table = _machine(k, depth, probe)
    _hit(m, n, regs)
    raw = m.read(MAP, layout.size)
    snap = decode_map(layout, raw, raw)
    assert snap.total == 1 and snap.per_cpu[CPU] == 1
    ((key, count),) = snap.counts
    assert isinstance(key, StackKey) and count == 1

    def read(addr: int) -> int | None:
        for lo in (TASK_STACK, IRQ_STACK):
            if lo <= addr <= lo + SIZE - 8:
                return m.u64(addr)
        return None

    def is_text(addr: int) -> bool:
        return TEXT <= addr < TEXT + TEXT_SIZE or INIT <= addr < INIT + INIT_SIZE

    host_regs = {"ip": probe, "sp": regs["rsp"], "bp": regs["rbp"], "cs": KERNEL_CS,
                 "r10": regs.get("r10", 0)}  # fmt: skip
    stack = unwind(host_regs, table, read, is_text, ip=probe + 1, limit=depth)
    return key, list(stack.entries), stack.error


def _syscall_kernel(fmt: OrcFormat) -> tuple[Kernel, int, dict[str, int]]:
    """vfs_read's entry <- ksys_read (bp frame) <- do_syscall_64 (sp frame) <- the entry
    code (a pt_regs at its sp, from user mode), on the task stack."""
    k = Kernel(fmt)
    f_read, f_ksys, f_do, f_entry = TEXT + 0x1000, TEXT + 0x1400, TEXT + 0x2000, TEXT + 0x3000
    k.entry(TEXT, SP, 8)
    k.entry(f_read, SP, 8)
    k.entry(f_read + 0x40, SP, 8)
    k.entry(f_ksys, SP, 8)
    k.entry(f_ksys + 0x1, SP, 16, PREV_SP, -16)
    k.entry(f_ksys + 0x4, BP, 16, PREV_SP, -16)
    k.entry(f_ksys + 0x80, SP, 8)
    k.entry(f_do, SP, 8)
    k.entry(f_do + 0x10, SP, 40)
    k.entry(f_do + 0x90, SP, 8)
    k.entry(f_entry, SP, 0, kind=REGS)  # pt_regs at sp: as entry_SYSCALL_64 after its pushes
    k.entry(f_entry + 0x100, SP, 8)
    k.entry(INIT, SP, 8)
    top = TASK_STACK + SIZE
    regs_at = top - 168  # struct pt_regs at the stack's top
    k.words[regs_at + 128] = 0x401000  # user ip
    k.words[regs_at + 136] = USER_CS
    k.words[regs_at + 152] = 0x7FFF0000
    k.words[regs_at + 32] = 0x7FFF0100
    do_frame = regs_at - 40  # do_syscall_64's 40 bytes, its return into the entry code
    k.words[regs_at - 8] = f_entry + 0x20
    ksys_sp = do_frame - 16  # ksys_read's frame: return address, saved bp
    k.words[do_frame - 8] = f_do + 0x40
    k.words[ksys_sp] = 0x1234  # the caller's bp, pushed
    probe_sp = ksys_sp - 8
    k.words[probe_sp] = f_ksys + 0x30  # vfs_read's return address
    return k, f_read, {"rsp": probe_sp, "rbp": ksys_sp}


@pytest.mark.parametrize("fmt", [SIGNAL_FORMAT, END_FORMAT, OLD_FORMAT],
                         ids=["6.4+", "5.12-6.3", "before-5.12"])  # fmt: skip
def test_syscall_stack_is_the_hosts(fmt: OrcFormat) -> None:
    k, probe, regs = _syscall_kernel(fmt)
    key, host, error = _walk(k, regs, probe)
    assert error is None
    assert list(key.frames) == host == [probe + 1, TEXT + 0x1430, TEXT + 0x2040, TEXT + 0x3020]
    assert key.cut == 0


def test_deeper_than_the_key_is_cut() -> None:
    k, probe, regs = _syscall_kernel(SIGNAL_FORMAT)
    key, host, error = _walk(k, regs, probe, depth=2)
    assert list(key.frames) == host and len(host) == 2
    assert key.cut == ow.CUT_DEPTH and error is not None and "more than 2" in error


def _irq_kernel(fmt: OrcFormat = SIGNAL_FORMAT) -> tuple[Kernel, int, dict[str, int]]:
    """The syscall kernel, and an hrtimer-like interrupt of ksys_read: two frames on the
    IRQ stack, the switch back to the task stack saved at the IRQ stack's top
    (SP_INDIRECT), the interrupt's pt_regs from kernel mode on the task stack."""
    k, _, _ = _syscall_kernel(fmt)
    f_handler, f_sysvec, f_asm = TEXT + 0x2400, TEXT + 0x2800, TEXT + 0x2C00
    k.entry(f_handler, SP, 8)
    k.entry(f_sysvec, SP, 8)
    k.entry(f_sysvec + 0x10, SP_INDIRECT, 8)  # on the IRQ stack: the old sp at [sp]
    k.entry(f_sysvec + 0x60, SP, 8)
    k.entry(f_asm, SP, 0, kind=REGS)  # asm_sysvec_*: pt_regs at sp
    k.entry(f_asm + 0x40, SP, 8)
    ksys_sp = TASK_STACK + SIZE - 168 - 40 - 16
    irq_regs = ksys_sp - 0x400  # below ksys_read's frame (and below what a hit there pushes)
    k.words[irq_regs + 128] = INTERRUPTED
    k.words[irq_regs + 136] = KERNEL_CS
    k.words[irq_regs + 152] = ksys_sp - 8  # (vfs_read returned: ksys_read's sp)
    k.words[irq_regs + 32] = ksys_sp
    k.words[irq_regs - 8] = f_asm + 0x10  # asm_sysvec's call of sysvec
    irq_top = IRQ_STACK + SIZE - 8
    k.words[irq_top] = irq_regs - 8  # the stack switch saved the task's sp at the top
    k.words[irq_top - 8] = f_sysvec + 0x30  # sysvec's call of the handler
    return k, f_handler, {"rsp": irq_top - 8, "rbp": 0}


INTERRUPTED = TEXT + 0x1400 + 0x30  # inside ksys_read, at its bp frame
IRQ_STACK_FRAMES = [TEXT + 0x2801, TEXT + 0x2830, TEXT + 0x2C10, INTERRUPTED, TEXT + 0x2040,
                    TEXT + 0x3020]  # fmt: skip


@pytest.mark.parametrize("fmt", [SIGNAL_FORMAT, END_FORMAT], ids=["6.4+", "5.12-6.3"])
def test_irq_stack_to_the_task_stack(fmt: OrcFormat) -> None:
    k, probe, regs = _irq_kernel(fmt)
    key, host, error = _walk(k, regs, probe)
    assert error is None, error
    assert list(key.frames) == host == [probe + 1, *IRQ_STACK_FRAMES[1:]]
    assert key.cut == 0


def test_stacks_of_two_depths_in_one_map() -> None:
    """A deep stack, a shallow one, the deep one again: two keys, counted 2 and 1 (the
    shallow key's words past its frames are never compared with the deep one's)."""
    k, irq_probe, irq_regs = _irq_kernel()
    _, _, regs = _syscall_kernel(SIGNAL_FORMAT)
    m, layout, n, _ = _machine(k, 16, irq_probe)
    for hit in (irq_regs, regs, irq_regs):
        _hit(m, n, hit)
    raw = m.read(MAP, layout.size)
    counts = {tuple(key.frames): c for key, c in decode_map(layout, raw, raw).counts
              if isinstance(key, StackKey) and not key.cut}  # fmt: skip
    assert counts == {
        (irq_probe + 1, *IRQ_STACK_FRAMES[1:]): 2,
        (irq_probe + 1, TEXT + 0x1430, TEXT + 0x2040, TEXT + 0x3020): 1,
    }


def test_a_module_return_address_ends_the_walk_kept() -> None:
    k, probe, regs = _syscall_kernel(SIGNAL_FORMAT)
    k.words[regs["rsp"]] = MODULE_TEXT + 0x10
    key, host, _ = _walk(k, regs, probe)
    assert host == [probe + 1]  # the host's text check refuses it (no module symbols here)
    assert list(key.frames) == [probe + 1, MODULE_TEXT + 0x10]
    assert key.cut == ow.CUT_OUTSIDE


def test_a_stack_word_off_both_stacks_is_not_read() -> None:
    k, probe, regs = _syscall_kernel(SIGNAL_FORMAT)
    key, host, _ = _walk(k, {**regs, "rbp": 0xFFFF888000500000}, probe)
    assert key.cut == ow.CUT_UNREADABLE
    assert list(key.frames) == host == [probe + 1, TEXT + 0x1430]


def test_an_undefined_entry_cuts() -> None:
    k, probe, regs = _syscall_kernel(SIGNAL_FORMAT)
    del k.orc[TEXT + 0x1400 + 0x4]
    del k.orc[TEXT + 0x1400 + 0x1]
    k.orc[TEXT + 0x1400] = (0, 0, 0, 0, "undefined")
    key, host, error = _walk(k, regs, probe)
    assert key.cut == ow.CUT_NO_ORC and error is not None and "undefined" in error
    assert list(key.frames) == host == [probe + 1, TEXT + 0x1430]


@needs_gas
@pytest.mark.parametrize("fmt", [SIGNAL_FORMAT, END_FORMAT, OLD_FORMAT],
                         ids=["6.4+", "5.12-6.3", "before-5.12"])  # fmt: skip
def test_listing_assembles_to_the_program(fmt: OrcFormat) -> None:
    k, probe, _ = _syscall_kernel(fmt)
    t = _tables(k)
    layout = Aggregation(by="stack", depth=16, walk=t, entries=64).layout(MAP, NCPUS)
    built = agg.build_aggregate_program(
        PROGRAM, probe_id=PROBE_ID, layout=layout, field=None, ring=RING_LAYOUT,
        helpers=HELPER_ADDRS, cont=CONT, walk=t, probe_ip=probe,
    )  # fmt: skip
    assert gas_text(built.listing) == built.code
