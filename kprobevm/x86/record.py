"""The record program: a probe hit written into a ring buffer by the guest, with no stop.

What the kernel's optprobes plus a trace event do in one: the probe's slot jumps here,
the program saves every register, reserves a record in a ring buffer in a slot page
(``lock cmpxchg`` on the ring's head, so vCPUs never share a record), writes the
registers, ``current``'s pid and comm, the TSC and the event's memory reads (through the
kernel's own ``copy_from_kernel_nofault`` family, so a bad pointer is a failed read, not
an oops), stamps the record as complete, restores every register and runs the displaced
instruction. The host drains the ring when it fills past a mark (a watched store: one
stop for many hits), on a timer, and when the probes go.

A per-CPU busy byte keeps the program from re-entering itself on one CPU (a probe on a
function the copy helpers call, or an interrupt during a record): such a hit is counted
as missed, as the kernel's ``kprobe_running()`` check does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kprobevm.errors import KprobeError
from kprobevm.x86 import asm
from kprobevm.x86.addrspace import FOUR_LEVEL
from kprobevm.x86.asm import mem, rip

__all__ = [
    "CAPTURE_HEADER",
    "PAD_BIT",
    "RECORD_HEADER",
    "REGS_OFFSET",
    "SNAPSHOT_REGS",
    "Capture",
    "CopyHelpers",
    "RecordLayout",
    "RingLayout",
    "build_count_program",
    "build_record_program",
    "check_program_fits",
]

#: pt_regs names in the record's register snapshot, in ``struct pt_regs`` order.
SNAPSHOT_REGS = (
    "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8",
    "ax", "cx", "dx", "si", "di", "ip", "cs", "flags", "sp", "ss",
)  # fmt: skip
# Record header: stamp u64 @0, size u32 @8, probe id u16 @12, cpu u16 @14, tsc u64 @16,
# pid s32 @24, comm[16] @32, then the registers.
RECORD_HEADER = struct.Struct("<QIHHQi4x16s")
REGS_OFFSET = RECORD_HEADER.size
CAPTURE_HEADER = struct.Struct("<Qq")  # the address read, then its status
#: Set in a stamp that marks the rest of the ring as padding (the next record wrapped).
PAD_BIT = 1 << 63
EFAULT = 14
TASK_SIZE_MAX = FOUR_LEVEL.task_size_max
"""Where user space ends for a 64-bit task under 4-level paging (5-level: see
:class:`~kprobevm.x86.addrspace.AddressSpace`): a mixed read below it is a user read."""

# The program's pushes, first to last: read from %rsp up, they are the first 15 fields
# of struct pt_regs (r15 ... di), so one ``rep movsq`` copies them into the record.
_PUSHED = (
    "rdi", "rsi", "rdx", "rcx", "rax", "r8", "r9", "r10", "r11",
    "rbx", "rbp", "r12", "r13", "r14", "r15",
)  # fmt: skip
_FLAGS_AT = 8 * len(_PUSHED)  # pushfq went first
_ENTRY_SP = _FLAGS_AT + 8  # the probed context's %rsp, relative to ours


def _align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class Capture:
    """One read the guest makes at a hit: ``size`` bytes (a string: at most) at an address.

    The address is ``offset`` plus a base: the register ``reg`` of the snapshot, or the
    u64 read by capture number ``from_capture`` (nested ``+8(+0(%di))``), or nothing
    (an absolute address). ``user`` reads go through the ``*_user_nofault`` helpers;
    ``mixed`` reads through them below TASK_SIZE and through the kernel ones above, as a
    kernel's own kernel-space fetch does since Linux 5.8 (the choice is made at the hit).
    """

    offset: int
    size: int
    reg: str | None = None
    from_capture: int | None = None
    string: bool = False
    user: bool = False
    mixed: bool = False
    stack: bool = False
    """A copy of the kernel stack from ``sp`` up: at most ``size`` bytes, clamped to the
    top of the stack (its ``THREAD_SIZE`` block), else to the end of ``sp``'s page; the
    status is the bytes copied."""

    def __post_init__(self) -> None:
        if self.stack and (self.reg != "sp" or self.offset or self.string or self.user):
            raise ValueError("a stack capture is a kernel copy at %sp + 0")
        if self.reg is not None and self.from_capture is not None:
            raise ValueError("a capture has one base: a register or an earlier capture")
        if self.reg is not None and self.reg not in SNAPSHOT_REGS:
            raise ValueError(f"no register {self.reg!r} in the record's snapshot")
        if not 0 < self.size <= 4096:
            raise ValueError(f"capture size {self.size} is not in 1..4096")


@dataclass(frozen=True)
class RecordLayout:
    """Where each part of one probe's record lies; the program and the decoder share it."""

    captures: tuple[Capture, ...]

    @property
    def capture_offsets(self) -> tuple[int, ...]:
        """Offset of each capture's header (its data follows the header)."""
        offsets = []
        at = REGS_OFFSET + 8 * len(SNAPSHOT_REGS)
        for cap in self.captures:
            offsets.append(at)
            at += CAPTURE_HEADER.size + _align8(cap.size)
        return tuple(offsets)

    @property
    def size(self) -> int:
        """Bytes reserved in the ring for one record (a multiple of 8)."""
        end = REGS_OFFSET + 8 * len(SNAPSHOT_REGS)
        return end + sum(CAPTURE_HEADER.size + _align8(c.size) for c in self.captures)


@dataclass(frozen=True)
class RingLayout:
    """The ring and its control words, at guest virtual addresses in slot pages."""

    head: int
    tail: int
    drain: int
    """A byte with a write watchpoint: a store there asks the host to drain."""
    busy: int
    """One byte per CPU: set while that CPU runs a record program."""
    max_cpus: int
    counters: int
    """Per probe id: u64 hits, then u64 missed."""
    ring: int
    ring_size: int
    high_water: int

    def __post_init__(self) -> None:
        if self.ring_size & (self.ring_size - 1) or not 4096 <= self.ring_size < 1 << 31:
            raise ValueError(f"ring size {self.ring_size} is not a power of two >= 4096")


@dataclass(frozen=True)
class CopyHelpers:
    """Addresses of the kernel's fault-tolerant copies (mm/maccess.c) and of per-CPU data."""

    copy_from_kernel: int
    copy_from_user: int
    strncpy_from_kernel: int
    strncpy_from_user: int
    cpu_number: int
    """Per-CPU offset of ``cpu_number``."""
    current_task: int
    """Per-CPU offset of the ``current`` pointer."""
    task_pid: int
    task_comm: int
    task_size_max: int = TASK_SIZE_MAX
    """The guest's ``TASK_SIZE_MAX`` (its paging mode's): a mixed read below it goes
    through the user copies. :func:`~kprobevm.kprobes.recorder.copy_helpers` sets it
    from the guest."""

    def helper_for(self, cap: Capture, *, user: bool | None = None) -> int:
        """The copy ``cap`` goes through (``user`` overrides its space: a mixed read)."""
        if user is None:
            user = cap.user
        if cap.string:
            return self.strncpy_from_user if user else self.strncpy_from_kernel
        return self.copy_from_user if user else self.copy_from_kernel


def _rec(offset: int, size: int | None = None) -> asm.Mem:
    """A field of the record being written (rbx holds its address).

    Always a 32-bit displacement: a field's offset depends on the layout, the code's
    shape should not.
    """
    return mem("rbx", offset, size=size, disp32=True)


def _missed(ring: RingLayout, probe_id: int) -> asm.Mem:
    """The probe's missed-hits counter."""
    return rip(ring.counters + 16 * probe_id + 8, size=8)


def _save(a: asm.Assembler) -> None:
    """Push the flags and the registers: the top of the stack is then pt_regs' first 15."""
    a.pushfq()
    for reg in _PUSHED:
        a.push(reg)
    a.cld()  # the copy helpers assume it, and popfq restores DF


def _restore_and_leave(a: asm.Assembler, cont: int) -> None:
    """Undo :func:`_save` and go on to the displaced instruction's copy."""
    for reg in reversed(_PUSHED):
        a.pop(reg)
    a.popfq()
    a.jmp(cont)


def build_count_program(at: int, *, counters: tuple[int, ...], cont: int) -> asm.Program:
    """Probes that only count: ``lock inc`` each hit counter, then go on (no stop)."""
    a = asm.Assembler(at)
    a.pushfq()
    for counter in counters:
        a.lock_inc(rip(counter, size=8))
    a.popfq()
    a.jmp(cont)
    return a.assemble()


def build_record_program(
    at: int,
    *,
    probes: tuple[tuple[int, RecordLayout], ...],
    probe_ip: int,
    ring: RingLayout,
    helpers: CopyHelpers,
    cont: int,
) -> asm.Program:
    """The program for one site: a record for each ``(probe id, layout)``, then ``cont``.

    ``probe_ip`` is the probed address (the snapshot's ``ip``); ``cont`` is the slot's
    copy of the displaced instruction.
    """
    a = asm.Assembler(at)
    _save(a)
    a.mov("r13d", mem(disp=helpers.cpu_number, seg="gs"))  # this CPU's number
    a.cmp("r13d", ring.max_cpus, imm32=True)
    a.jcc("ae", "missed_all")
    busy = mem("rax", 0, "r13", size=1)  # this CPU's busy byte, with rax = ring.busy
    a.lea("rax", rip(ring.busy))
    a.mov("cl", 1)
    a.xchg(busy, "cl")
    a.test("cl", "cl")
    a.jcc("ne", "missed_all")  # this CPU is inside a record program already
    for n, (probe_id, layout) in enumerate(probes):
        site = _Site(a, f"p{n}", probe_id, layout, ring)
        _reserve(site)
        _header(site, helpers)
        _registers(site, probe_ip)
        _captures(site, helpers)
        _complete(site)
    a.lea("rax", rip(ring.busy))
    a.mov(busy, 0)
    a.label("leave")
    _restore_and_leave(a, cont)
    a.label("missed_all")
    for probe_id, _ in probes:
        a.lock_inc(_missed(ring, probe_id))
    a.jmp("leave")
    return a.assemble()


@dataclass(frozen=True)
class _Site:
    """One probe's record being written: the assembler, label prefix and layouts."""

    a: asm.Assembler
    name: str
    probe_id: int
    layout: RecordLayout
    ring: RingLayout


def _reserve(s: _Site) -> None:
    """Reserve [head, head + total): the record, preceded by padding to the ring's end
    when it would not fit before it. Full (the host is behind): count it as missed.
    Leaves the record's address in rbx, its reservation's start in r12."""
    a, name, size, ring = s.a, s.name, s.layout.size, s.ring
    mask = ring.ring_size - 1
    a.mov("rax", rip(ring.head))
    a.label(f"{name}_reserve")
    a.mov("rdx", "rax")
    a.and_("rdx", mask)
    a.mov("ecx", size)
    a.lea("rsi", mem("rdx", 0, "rcx"))
    a.cmp("rsi", ring.ring_size)
    a.jcc("be", f"{name}_fits")
    a.mov("ecx", ring.ring_size)
    a.sub("rcx", "rdx")
    a.add("rcx", size)
    a.label(f"{name}_fits")
    a.lea("rsi", mem("rax", 0, "rcx"))  # the new head
    a.mov("rdi", rip(ring.tail))
    a.add("rdi", ring.ring_size)
    a.cmp("rsi", "rdi")
    a.jcc("a", f"{name}_full")
    a.lock_cmpxchg(rip(ring.head), "rsi")
    a.jcc("ne", f"{name}_reserve")  # rax holds the head another vCPU moved it to
    a.mov("r12", "rax")  # where the reservation starts
    a.lea("rdi", rip(ring.ring))
    a.cmp("rcx", size)
    a.jcc("e", f"{name}_placed")  # no padding
    a.mov("rdx", "r12")
    a.and_("rdx", mask)
    a.lea("r8", mem("r12", 1))
    a.bts("r8", 63)  # the padding stamp
    a.mov(mem("rdi", 0, "rdx"), "r8")
    a.label(f"{name}_placed")
    a.lea("r12", mem("r12", -size, "rcx"))  # the record's start
    a.mov("rbx", "r12")
    a.and_("rbx", mask)
    a.add("rbx", "rdi")  # rbx = the record, kept across the calls


def _header(s: _Site, helpers: CopyHelpers) -> None:
    """Size, probe id, CPU, TSC, and ``current``'s pid and comm."""
    a = s.a
    a.mov(_rec(8, 4), s.layout.size)
    a.mov(_rec(12, 2), s.probe_id)
    a.mov(_rec(14), "r13w")
    a.rdtsc()
    a.shl("rdx", 32)
    a.or_("rax", "rdx")
    a.mov(_rec(16), "rax")
    a.mov("rax", mem(disp=helpers.current_task, seg="gs"))  # current
    a.mov("ecx", mem("rax", helpers.task_pid, disp32=True))
    a.mov(_rec(24), "ecx")
    for half in (0, 8):
        a.mov("rcx", mem("rax", helpers.task_comm + half, disp32=True))
        a.mov(_rec(32 + half), "rcx")


def _registers(s: _Site, probe_ip: int) -> None:
    """The pushed registers in one copy, then ip, cs, flags, sp, ss."""
    a = s.a
    a.mov("rsi", "rsp")
    a.lea("rdi", _rec(REGS_OFFSET))
    a.mov("ecx", len(_PUSHED))
    a.rep_movsq()
    for i, reg in enumerate(SNAPSHOT_REGS[len(_PUSHED) :], start=len(_PUSHED)):
        dst = REGS_OFFSET + 8 * i
        if reg == "ip":
            a.mov(_rec(dst, 8), probe_ip)
            continue
        if reg == "flags":
            a.mov("rax", mem("rsp", _FLAGS_AT, disp32=True))
        elif reg == "sp":
            a.lea("rax", mem("rsp", _ENTRY_SP, disp32=True))
        else:
            a.xor("eax", "eax")
            a.mov("ax", reg)  # cs or ss
        a.mov(_rec(dst), "rax")


def _captures(s: _Site, helpers: CopyHelpers) -> None:
    """The memory reads, each through the kernel's fault-tolerant copy for its kind."""
    a, name = s.a, s.name
    offsets = s.layout.capture_offsets
    for i, cap in enumerate(s.layout.captures):
        here = offsets[i]
        status = f"{name}_c{i}_status"
        if cap.reg is not None:
            a.mov("rsi", _rec(REGS_OFFSET + 8 * SNAPSHOT_REGS.index(cap.reg)))
        elif cap.from_capture is not None:
            base = offsets[cap.from_capture]
            a.mov("rax", -EFAULT)
            a.cmp(_rec(base + 8, 8), 0)
            a.jcc("l", status)  # the base read failed, so does this one
            a.mov("rsi", _rec(base + CAPTURE_HEADER.size))
        else:
            a.xor("esi", "esi")
        a.movabs("rax", asm.to_u64(cap.offset))
        a.add("rsi", "rax")
        a.mov(_rec(here), "rsi")  # the address read
        if cap.stack:
            _stack_copy(s, helpers, i, here)
            a.label(status)
            a.mov(_rec(here + 8), "rax")
            continue
        a.lea("rdi", _rec(here + CAPTURE_HEADER.size))
        a.mov("edx", cap.size)
        if cap.mixed and not cap.user:
            # below TASK_SIZE the user copy, above it the kernel's
            a.movabs("rax", helpers.task_size_max)
            a.cmp("rsi", "rax")
            a.jcc("ae", f"{name}_c{i}_kernel")
            a.call(helpers.helper_for(cap, user=True))
            a.jmp(f"{name}_c{i}_copied")
            a.label(f"{name}_c{i}_kernel")
            a.call(helpers.helper_for(cap, user=False))
            a.label(f"{name}_c{i}_copied")
        else:
            a.call(helpers.helper_for(cap))
        if not cap.string:  # copy_*: 0 or -EFAULT; the status is the bytes read
            a.test("rax", "rax")
            a.jcc("ne", status)
            a.mov("eax", cap.size)
        a.label(status)
        a.mov(_rec(here + 8), "rax")


STACK_BLOCK = 16384
"""x86-64's THREAD_SIZE (and IRQ_STACK_SIZE): a task's stack is a block of this size
and alignment, so a copy from ``sp`` to the block's end stays on the stack."""


def _stack_copy(s: _Site, helpers: CopyHelpers, i: int, here: int) -> None:
    """Copy the stack from ``sp`` (in rsi) to the top of its block, at most the capture's
    size; where that faults (an IRQ or exception stack not aligned so), to the end of the
    page instead. rax: the bytes copied, or the copy's error."""
    a, name, size = s.a, f"{s.name}_c{i}", s.layout.captures[i].size
    for try_, block in enumerate((STACK_BLOCK, 4096)):
        a.mov("rsi", _rec(here))
        a.lea("rdi", _rec(here + CAPTURE_HEADER.size))
        a.mov("rax", "rsi")
        a.and_("rax", block - 1)
        a.mov("edx", block)
        a.sub("rdx", "rax")  # bytes from sp to the block's end
        a.cmp("rdx", size)
        a.jcc("be", f"{name}_len{try_}")
        a.mov("edx", size)
        a.label(f"{name}_len{try_}")
        a.mov(_rec(here + 8), "rdx")  # kept across the call
        a.call(helpers.copy_from_kernel)
        a.test("rax", "rax")
        a.jcc("ne", f"{name}_failed{try_}")
        a.mov("rax", _rec(here + 8))
        a.jmp(f"{name}_status")
        a.label(f"{name}_failed{try_}")


def _complete(s: _Site) -> None:
    """Stamp the record, count the hit, and ask for a drain past the high-water mark."""
    a, name, ring = s.a, s.name, s.ring
    # The stamp goes last: x86 keeps stores in order for the host's reader.
    a.lea("rax", mem("r12", 1))
    a.mov(mem("rbx"), "rax")
    a.lock_inc(rip(ring.counters + 16 * s.probe_id, size=8))
    a.mov("rax", rip(ring.head))
    a.sub("rax", rip(ring.tail))
    a.cmp("rax", ring.high_water, imm32=True)
    a.jcc("b", f"{name}_end")
    a.label(f"{name}_drain")
    a.mov(rip(ring.drain, size=1), 1)  # watched: the host drains now
    a.jmp_next()  # a late stop still lands in the program (ooline.TB_BREAK)
    a.jmp(f"{name}_end")
    a.label(f"{name}_full")
    a.lock_inc(_missed(ring, s.probe_id))
    a.jmp(f"{name}_drain")
    a.label(f"{name}_end")


def check_program_fits(code: bytes, size: int, where: str) -> None:
    """Raise when a program is larger than the cell it goes into."""
    if len(code) > size:
        raise KprobeError(f"record program for {where} takes {len(code)} bytes, over {size}")
