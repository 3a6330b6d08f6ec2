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
    "stack_slices",
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


STACK_BLOCK = 16384
"""x86-64's THREAD_SIZE (and IRQ_STACK_SIZE) without KASAN: a stack is a block of this
size and alignment, so a copy from ``sp`` to the block's end stays on the stack. The
recorder sets the guest's own (:attr:`CopyHelpers.thread_size`)."""
MAX_STACK_COPY = 4096
KERNEL_HALF = 0xFF00000000000000
"""The lowest kernel address of either paging mode: a saved stack pointer is above it."""
_ON_TASK_STACK = 1
"""r15 between :func:`_stack_extent` and :func:`_stack_slices` when ``sp`` is on
``current``'s own stack: never a saved stack pointer (0: none, else a kernel address)."""
PT_REGS_SIZE = 8 * len(SNAPSHOT_REGS) + 8  # with orig_ax
HARDWARE_FRAME = 8 * len(SNAPSHOT_REGS[SNAPSHOT_REGS.index("ip") :])
"""The end of ``pt_regs`` the CPU pushes (ip, cs, flags, sp, ss): where a walk that
reaches ``current``'s entry registers finds how the task entered (a user ``cs`` ends it)."""


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
    def __post_init__(self) -> None:
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
    stack_size: int = 0
    """Bytes of kernel stack copied after the captures, at most, in each of two slices:
    from ``sp`` to the top of its stack, and (on the IRQ stack) from the stack pointer
    saved at that top to the top of the stack below. On ``current``'s own stack the
    first stops at its entry ``pt_regs`` and the second is their hardware frame
    (:attr:`CopyHelpers.top_of_stack`). The record then has a size of its own (see
    :func:`stack_slices`); 0: no stack."""
    stack_block: int = STACK_BLOCK
    """The guest's stack size and alignment (its THREAD_SIZE)."""

    def __post_init__(self) -> None:
        if not 0 <= self.stack_size <= MAX_STACK_COPY or self.stack_size % 8:
            raise ValueError(f"stack copy of {self.stack_size} bytes: not a multiple of 8"
                             f" in 0..{MAX_STACK_COPY}")  # fmt: skip
        if self.stack_block & (self.stack_block - 1) or self.stack_block < 4096:
            raise ValueError(f"stack size {self.stack_block} is not a power of two >= 4096")

    @property
    def fixed_size(self) -> int:
        """Bytes before the stack slices: header, registers, captures."""
        end = REGS_OFFSET + 8 * len(SNAPSHOT_REGS)
        return end + sum(CAPTURE_HEADER.size + _align8(c.size) for c in self.captures)

    def stack_copy_length(self, sp: int) -> int:
        """The slice reserved for a stack at ``sp``: up to its top, at most ``stack_size``."""
        block = self.stack_block
        return min(self.stack_size, block - (sp & (block - 1)))

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
        """Bytes reserved in the ring for one record, at most (a multiple of 8)."""
        if not self.stack_size:
            return self.fixed_size
        return self.fixed_size + 2 * (CAPTURE_HEADER.size + self.stack_size)


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
    thread_size: int = STACK_BLOCK
    """The guest's kernel stack size (``__end_init_task - __start_init_task``), set by
    :func:`~kprobevm.kprobes.recorder.copy_helpers`: where a stack copy stops."""
    task_stack: int = 0
    """Offset of ``task_struct.stack`` (0: unknown). A stack copy from within
    ``current``'s own stack, which is mapped whole, is then a plain ``rep movsq``."""
    top_of_stack: int = 0
    """Per-CPU offset of the end of ``current``'s entry ``pt_regs`` (the kernel's
    ``top_of_stack``; 0: unknown). A copy from ``current``'s own stack then stops at
    those registers and takes only their hardware frame, all a walk reads of them."""

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
        if layout.stack_size:
            _stack_extent(site, helpers)
        _reserve(site)
        _header(site, helpers)
        _registers(site, probe_ip)
        _captures(site, helpers)
        if layout.stack_size:
            _stack_slices(site, helpers)
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
    Leaves the record's address in rbx, its reservation's start in r12. A record with a
    stack has its size in rbp (:func:`_stack_extent`)."""
    a, name, ring = s.a, s.name, s.ring
    size: int | str = "rbp" if s.layout.stack_size else s.layout.size
    mask = ring.ring_size - 1
    a.mov("rax", rip(ring.head))
    a.label(f"{name}_reserve")
    a.mov("rdx", "rax")
    a.and_("rdx", mask)
    a.mov("rcx" if size == "rbp" else "ecx", size)
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
    if isinstance(size, str):
        a.add("r12", "rcx")
        a.sub("r12", size)  # the record's start
    else:
        a.lea("r12", mem("r12", -size, "rcx"))  # the record's start
    a.mov("rbx", "r12")
    a.and_("rbx", mask)
    a.add("rbx", "rdi")  # rbx = the record, kept across the calls


def _header(s: _Site, helpers: CopyHelpers) -> None:
    """Size, probe id, CPU, TSC, and ``current``'s pid and comm."""
    a = s.a
    if s.layout.stack_size:
        a.mov(_rec(8), "ebp")
    else:
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


def _stack_extent(s: _Site, helpers: CopyHelpers) -> None:
    """Before the reservation, what the stack slices will take (the record's size is
    then the program's to tell): r14 the first slice's length (``sp`` to the top of its
    stack, at most ``stack_size``); r15 the stack pointer saved at that top when the
    slice reaches it and it is a kernel address (the IRQ stack's link to the stack it
    left), else 0, or :data:`_ON_TASK_STACK`; rbp the record's size. Callee-saved: they
    survive the copies."""
    a, name, stack, block = s.a, f"{s.name}_stk", s.layout.stack_size, s.layout.stack_block
    a.lea("rsi", mem("rsp", _ENTRY_SP, disp32=True))  # the probed sp
    frame = _hardware_frame(s, helpers)
    if helpers.top_of_stack:
        # on current's stack: up to its entry pt_regs, whose hardware frame follows
        _below_entry_regs(s, helpers, f"{name}_other")
    elif helpers.task_stack:
        # on current's stack: to its top, and the top holds pt_regs, no link below
        _on_task_stack(s, helpers, f"{name}_other")
        a.mov("r14d", block)
        a.sub("r14", "rcx")
    if helpers.top_of_stack or helpers.task_stack:
        _at_most(a, "r14", stack, f"{name}_task_len")
        a.mov("r15d", _ON_TASK_STACK)
        # r14 is a multiple of 8 (sp is aligned): the second slice is the hardware frame
        # or a header alone
        size = s.layout.fixed_size + 2 * CAPTURE_HEADER.size + frame
        a.lea("rbp", mem("r14", size, disp32=True))
        a.jmp(f"{name}_sized")
        a.label(f"{name}_other")
    a.mov("rax", "rsi")
    a.and_("rax", block - 1)
    a.mov("ecx", block)
    a.sub("rcx", "rax")  # bytes to the top
    a.mov("r14", "rcx")
    _at_most(a, "r14", stack, f"{name}_len")
    a.xor("r15d", "r15d")
    a.cmp("r14", "rcx")
    a.jcc("ne", f"{name}_size")  # the slice stops short of the top
    a.sub("rsp", 8)  # the top word, read as any other: it may not be mapped
    a.mov("rdi", "rsp")
    a.lea("rsi", mem("rsi", -8, "r14"))
    a.mov("edx", 8)
    a.call(helpers.copy_from_kernel)
    a.pop("r15")
    a.test("rax", "rax")
    a.jcc("ne", f"{name}_unlinked")
    a.movabs("rax", KERNEL_HALF)
    a.cmp("r15", "rax")
    a.jcc("ae", f"{name}_size")  # else pt_regs' ss, or an iret frame's: no stack below
    a.label(f"{name}_unlinked")
    a.xor("r15d", "r15d")
    a.label(f"{name}_size")
    a.lea("rbp", mem("r14", s.layout.fixed_size + 2 * CAPTURE_HEADER.size + 7, disp32=True))
    a.and_("rbp", -8)
    a.test("r15", "r15")
    a.jcc("e", f"{name}_sized")
    a.mov("rax", "r15")
    a.and_("rax", block - 1)
    a.mov("ecx", block)
    a.sub("rcx", "rax")
    _at_most(a, "rcx", stack, f"{name}_len2", set_to="ecx")
    a.add("rcx", 7)
    a.and_("rcx", -8)
    a.add("rbp", "rcx")
    a.label(f"{name}_sized")


def _hardware_frame(s: _Site, helpers: CopyHelpers) -> int:
    """Bytes of the entry registers' hardware frame a copy from ``current``'s stack
    takes as its second slice: all of it, or none (no ``top_of_stack``, or a copy size
    that would cut it)."""
    if helpers.top_of_stack and s.layout.stack_size >= HARDWARE_FRAME:
        return HARDWARE_FRAME
    return 0


def _below_entry_regs(s: _Site, helpers: CopyHelpers, other: str) -> None:
    """On to ``other`` unless rsi is an 8-byte aligned address in the stack block that
    holds ``current``'s entry pt_regs, and below them; else r14 = the bytes from rsi to
    them (all mapped: a copy cannot fault)."""
    a = s.a
    a.mov("rax", mem(disp=helpers.top_of_stack, seg="gs"))  # the entry pt_regs' end
    a.lea("rcx", mem("rax", -1))
    a.xor("rcx", "rsi")
    a.cmp("rcx", s.layout.stack_block)
    a.jcc("ae", other)  # another block: not current's stack
    a.lea("r14", mem("rax", -PT_REGS_SIZE, disp32=True))
    a.sub("r14", "rsi")
    a.jcc("b", other)  # inside the registers (entry code)
    a.test("esi", 7)
    a.jcc("ne", other)


def _at_most(a: asm.Assembler, reg: str, limit: int, label: str, *, set_to: str = "") -> None:
    """``reg = min(reg, limit)``, unsigned (``set_to``: the register written, when a
    shorter form of ``reg`` does)."""
    a.cmp(reg, limit)
    a.jcc("be", label)
    a.mov(set_to or reg, limit)
    a.label(label)


def _stack_slices(s: _Site, helpers: CopyHelpers) -> None:
    """Both slices after the captures, each a header (address, status) and its bytes;
    the second header follows the bytes the first slice holds (aligned)."""
    a, name, at = s.a, f"{s.name}_stk", s.layout.fixed_size
    a.mov("rsi", _rec(REGS_OFFSET + 8 * SNAPSHOT_REGS.index("sp")))
    a.mov(_rec(at), "rsi")
    if helpers.top_of_stack or helpers.task_stack:
        _task_slice(s, helpers, f"{name}_not_task")
    _slice_copy(s, helpers, "rbx", at, f"{name}1", maybe_task=False)
    below = at + CAPTURE_HEADER.size  # from rbp, the first slice's bytes past rbx
    a.mov("rbp", _rec(at + 8))  # its status: the bytes copied, or an error
    a.test("rbp", "rbp")
    a.jcc("ns", f"{name}_held")
    a.xor("ebp", "ebp")
    a.label(f"{name}_held")
    a.add("rbp", 7)
    a.and_("rbp", -8)
    a.add("rbp", "rbx")
    a.mov(mem("rbp", below, size=8, disp32=True), "r15")
    a.mov("rax", -EFAULT)
    a.test("r15", "r15")
    a.jcc("e", f"{name}2_status")
    _slice_copy(s, helpers, "rbp", below, f"{name}2", maybe_task=bool(helpers.task_stack))
    a.label(f"{name}_done")


def _task_slice(s: _Site, helpers: CopyHelpers, other: str) -> None:
    """The first slice when :func:`_stack_extent` found ``sp`` (in rsi) on current's own
    stack: r14 bytes in one ``rep movsq``, which cannot fault, and the second header
    right after them: the entry registers' hardware frame (with ``top_of_stack``), else
    none (no stack below); on to ``other`` if it did not."""
    a, name, at = s.a, f"{s.name}_stk", s.layout.fixed_size
    a.cmp("r15", _ON_TASK_STACK)
    a.jcc("ne", other)
    a.mov(_rec(at + 8), "r14")
    a.lea("rdi", _rec(at + CAPTURE_HEADER.size))
    a.mov("rcx", "r14")
    a.shr("rcx", 3)
    a.rep_movsq()
    frame = _hardware_frame(s, helpers)
    if frame:  # rdi: the second header
        a.mov("rax", mem(disp=helpers.top_of_stack, seg="gs"))
        a.lea("rsi", mem("rax", -frame))
        a.mov(mem("rdi", 0, size=8), "rsi")
        a.mov(mem("rdi", 8, size=8), frame)
        a.add("rdi", CAPTURE_HEADER.size)
        a.mov("ecx", frame // 8)
        a.rep_movsq()
    else:
        a.mov(mem("rdi", 0, size=8), 0)
        a.mov(mem("rdi", 8, size=8), -EFAULT)
    a.jmp(f"{name}_done")
    a.label(other)


def _on_task_stack(s: _Site, helpers: CopyHelpers, other: str) -> None:
    """On to ``other`` unless rsi is an 8-byte aligned address in ``current``'s own
    stack (mapped whole: a copy to its top cannot fault); else rcx = rsi - its base."""
    a = s.a
    a.mov("rax", mem(disp=helpers.current_task, seg="gs"))
    a.mov("rax", mem("rax", helpers.task_stack, disp32=True))  # the stack's base
    a.mov("rcx", "rsi")
    a.sub("rcx", "rax")
    a.cmp("rcx", s.layout.stack_block)
    a.jcc("ae", other)
    a.test("esi", 7)
    a.jcc("ne", other)


def _slice_copy(
    s: _Site, helpers: CopyHelpers, base: str, at: int, name: str, *, maybe_task: bool
) -> None:
    """Copy the stack from the address in the header at ``base + at`` to the top of its
    block, at most ``stack_size`` bytes; where that faults (a stack not aligned so), to
    the end of the page. The header's status: the bytes copied, or the copy's error.
    ``maybe_task``: the address may be on current's own stack (a plain copy then)."""
    a, stack = s.a, s.layout.stack_size

    def field(offset: int) -> asm.Mem:
        return mem(base, at + offset, size=8, disp32=True)

    if maybe_task:
        a.mov("rsi", field(0))
        _on_task_stack(s, helpers, f"{name}_other")
        a.mov("edx", s.layout.stack_block)
        a.sub("rdx", "rcx")  # bytes to the top
        _at_most(a, "rdx", stack, f"{name}_task_len", set_to="edx")
        a.mov(field(8), "rdx")
        a.lea("rdi", mem(base, at + CAPTURE_HEADER.size, disp32=True))
        a.mov("rcx", "rdx")
        a.shr("rcx", 3)
        a.rep_movsq()
        a.mov("rax", field(8))
        a.jmp(f"{name}_status")
        a.label(f"{name}_other")
    for try_, block in enumerate((s.layout.stack_block, 4096)):
        a.mov("rsi", field(0))
        a.lea("rdi", mem(base, at + CAPTURE_HEADER.size, disp32=True))
        a.mov("rax", "rsi")
        a.and_("rax", block - 1)
        a.mov("edx", block)
        a.sub("rdx", "rax")  # bytes to the block's end
        _at_most(a, "rdx", stack, f"{name}_len{try_}", set_to="edx")
        a.mov(field(8), "rdx")  # kept across the call
        a.call(helpers.copy_from_kernel)
        a.test("rax", "rax")
        a.jcc("ne", f"{name}_failed{try_}")
        a.mov("rax", field(8))
        a.jmp(f"{name}_status")
        a.label(f"{name}_failed{try_}")
    a.label(f"{name}_status")
    a.mov(field(8), "rax")


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


def stack_slices(raw: bytes, layout: RecordLayout) -> list[tuple[int, int, bytes]]:
    """The stack slices of one record: (address, status, bytes) of the copy from ``sp``,
    then of the copy from the stack below, or of the hardware frame of ``current``'s
    entry registers (address 0 and -EFAULT when there is neither). The second slice's
    header follows the bytes the first holds."""
    out = []
    at = layout.fixed_size
    for _ in range(2):
        address, status = CAPTURE_HEADER.unpack_from(raw, at)
        reserved = layout.stack_copy_length(address) if address else 0
        start = at + CAPTURE_HEADER.size
        data = raw[start : start + max(0, min(status, reserved))]
        out.append((address, status, data))
        at = start + _align8(len(data))
    return out
