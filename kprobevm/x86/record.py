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
from kprobevm.x86.ooline import TB_BREAK

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
    (an absolute address). ``user`` reads go through the ``*_user_nofault`` helpers.
    """

    offset: int
    size: int
    reg: str | None = None
    from_capture: int | None = None
    string: bool = False
    user: bool = False

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

    def helper_for(self, cap: Capture) -> int:
        if cap.string:
            return self.strncpy_from_user if cap.user else self.strncpy_from_kernel
        return self.copy_from_user if cap.user else self.copy_from_kernel


class _Code(asm.Assembler):
    """The assembler plus the handful of operand forms the record program uses."""

    def rip(self, prefix: bytes, target: int, suffix: bytes = b"") -> None:
        """An instruction with one ``disp32(%rip)`` operand followed by ``suffix``."""
        end = self.here + len(prefix) + 4 + len(suffix)
        self.emit(prefix + asm.rip_disp32(end, target) + suffix)

    def set_busy(self, ring: RingLayout, value: int) -> None:
        self.rip(b"\x48\x8d\x05", ring.busy)  # lea busy(%rip),%rax
        self.emit(b"\x42\xc6\x04\x28" + bytes((value,)))  # movb $value,(%rax,%r13)


def _d32(value: int) -> bytes:
    return struct.pack("<i", value)


def _save(a: _Code) -> None:
    a.emit(asm.pushfq())
    for reg in _PUSHED:
        a.emit(asm.push_r64(reg))
    a.emit(b"\xfc")  # cld: the copy helpers assume it, and popfq restores DF


def _restore_and_leave(a: _Code, cont: int) -> None:
    for reg in reversed(_PUSHED):
        a.emit(asm.pop_r64(reg))
    a.emit(asm.popfq())
    a.emit(asm.jmp_rel32(a.here, cont))


def build_count_program(at: int, *, counters: tuple[int, ...], cont: int) -> bytes:
    """Probes that only count: ``lock incq`` each hit counter, then go on (no stop)."""
    a = _Code(at)
    a.emit(asm.pushfq())
    for counter in counters:
        a.lock_inc(asm.rip(counter, size=8))
    a.emit(asm.popfq())
    a.emit(asm.jmp_rel32(a.here, cont))
    return a.finish()


def build_record_program(
    at: int,
    *,
    probes: tuple[tuple[int, RecordLayout], ...],
    probe_ip: int,
    ring: RingLayout,
    helpers: CopyHelpers,
    cont: int,
) -> bytes:
    """The program for one site: a record for each ``(probe id, layout)``, then ``cont``.

    ``probe_ip`` is the probed address (the snapshot's ``ip``); ``cont`` is the slot's
    copy of the displaced instruction.
    """
    a = _Code(at)
    _save(a)
    a.emit(b"\x65\x44\x8b\x2c\x25" + _d32(helpers.cpu_number))  # movl %gs:cpu_number,%r13d
    a.emit(b"\x41\x81\xfd" + _d32(ring.max_cpus))  # cmp $max_cpus,%r13d
    a.jcc(0x3, "missed_all")  # jae
    a.rip(b"\x48\x8d\x05", ring.busy)  # lea busy(%rip),%rax
    a.emit(b"\xb1\x01\x42\x86\x0c\x28\x84\xc9")  # mov $1,%cl; xchg %cl,(%rax,%r13); test
    a.jcc(0x5, "missed_all")  # jne: this CPU is inside a record program already
    for n, (probe_id, layout) in enumerate(probes):
        _one_record(a, f"p{n}", probe_id, layout, probe_ip, ring, helpers)
    a.set_busy(ring, 0)
    a.label("leave")
    _restore_and_leave(a, cont)
    a.label("missed_all")
    for probe_id, _ in probes:
        a.lock_inc(asm.rip(ring.counters + 16 * probe_id + 8, size=8))
    a.jmp("leave")
    return a.finish()


def _one_record(
    a: _Code,
    name: str,
    probe_id: int,
    layout: RecordLayout,
    probe_ip: int,
    ring: RingLayout,
    helpers: CopyHelpers,
) -> None:
    size = layout.size
    mask = ring.ring_size - 1
    # Reserve [head, head + total): the record, preceded by padding to the ring's end
    # when it would not fit before it. Full (the host is behind): count it as missed.
    a.label(f"{name}_retry")
    a.rip(b"\x48\x8b\x05", ring.head)  # mov head(%rip),%rax
    a.label(f"{name}_reserve")
    a.emit(b"\x48\x89\xc2" + b"\x48\x81\xe2" + _d32(mask))  # mov %rax,%rdx; and $mask,%rdx
    a.emit(b"\xb9" + _d32(size))  # mov $size,%ecx
    a.emit(b"\x48\x8d\x34\x0a")  # lea (%rdx,%rcx),%rsi
    a.emit(b"\x48\x81\xfe" + _d32(ring.ring_size))  # cmp $ring_size,%rsi
    a.jcc(0x6, f"{name}_fits")  # jbe
    a.emit(b"\xb9" + _d32(ring.ring_size))  # mov $ring_size,%ecx
    a.emit(b"\x48\x29\xd1")  # sub %rdx,%rcx
    a.emit(b"\x48\x81\xc1" + _d32(size))  # add $size,%rcx
    a.label(f"{name}_fits")
    a.emit(b"\x48\x8d\x34\x08")  # lea (%rax,%rcx),%rsi: the new head
    a.rip(b"\x48\x8b\x3d", ring.tail)  # mov tail(%rip),%rdi
    a.emit(b"\x48\x81\xc7" + _d32(ring.ring_size))  # add $ring_size,%rdi
    a.emit(b"\x48\x39\xfe")  # cmp %rdi,%rsi
    a.jcc(0x7, f"{name}_full")  # ja
    a.rip(b"\xf0\x48\x0f\xb1\x35", ring.head)  # lock cmpxchg %rsi,head(%rip)
    a.jcc(0x5, f"{name}_reserve")  # jne: %rax holds the head another vCPU moved it to
    a.emit(b"\x49\x89\xc4")  # mov %rax,%r12: where the reservation starts
    a.rip(b"\x48\x8d\x3d", ring.ring)  # lea ring(%rip),%rdi
    a.emit(b"\x48\x81\xf9" + _d32(size))  # cmp $size,%rcx
    a.jcc(0x4, f"{name}_placed")  # je: no padding
    a.emit(b"\x4c\x89\xe2" + b"\x48\x81\xe2" + _d32(mask))  # mov %r12,%rdx; and $mask,%rdx
    a.emit(b"\x4d\x8d\x44\x24\x01")  # lea 1(%r12),%r8
    a.emit(b"\x49\x0f\xba\xe8\x3f")  # bts $63,%r8: the padding stamp
    a.emit(b"\x4c\x89\x04\x17")  # mov %r8,(%rdi,%rdx)
    a.label(f"{name}_placed")
    a.emit(b"\x4d\x8d\xa4\x0c" + _d32(-size))  # lea -size(%r12,%rcx),%r12: the record's start
    a.emit(b"\x4c\x89\xe3" + b"\x48\x81\xe3" + _d32(mask))  # mov %r12,%rbx; and $mask,%rbx
    a.emit(b"\x48\x01\xfb")  # add %rdi,%rbx: %rbx = the record, kept across the calls

    # header
    a.emit(b"\xc7\x83" + _d32(8) + _d32(size))  # movl $size,8(%rbx)
    a.emit(b"\x66\xc7\x83" + _d32(12) + struct.pack("<H", probe_id))  # movw $id,12(%rbx)
    a.emit(b"\x66\x44\x89\xab" + _d32(14))  # movw %r13w,14(%rbx)
    a.emit(b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0")  # rdtsc; shl $32,%rdx; or %rdx,%rax
    a.emit(b"\x48\x89\x83" + _d32(16))  # mov %rax,16(%rbx)
    a.emit(b"\x65\x48\x8b\x04\x25" + _d32(helpers.current_task))  # mov %gs:current,%rax
    a.emit(b"\x8b\x88" + _d32(helpers.task_pid) + b"\x89\x8b" + _d32(24))  # pid
    for half in (0, 8):
        a.emit(b"\x48\x8b\x88" + _d32(helpers.task_comm + half))  # mov comm+half(%rax),%rcx
        a.emit(b"\x48\x89\x8b" + _d32(32 + half))  # mov %rcx,32+half(%rbx)

    # registers: the pushed ones in one copy, then ip, cs, flags, sp, ss
    a.emit(b"\x48\x89\xe6")  # mov %rsp,%rsi
    a.emit(b"\x48\x8d\xbb" + _d32(REGS_OFFSET))  # lea regs(%rbx),%rdi
    a.emit(b"\xb9" + _d32(len(_PUSHED)) + b"\xf3\x48\xa5")  # mov $15,%ecx; rep movsq
    for i, reg in enumerate(SNAPSHOT_REGS[len(_PUSHED) :], start=len(_PUSHED)):
        dst = REGS_OFFSET + 8 * i
        if reg == "ip":
            a.emit(b"\x48\xc7\x83" + _d32(dst) + asm.push_imm32(probe_ip)[1:])  # movq $ip
            continue
        if reg == "flags":
            a.emit(b"\x48\x8b\x84\x24" + _d32(_FLAGS_AT))  # mov flags(%rsp),%rax
        elif reg == "sp":
            a.emit(b"\x48\x8d\x84\x24" + _d32(_ENTRY_SP))  # lea entry_sp(%rsp),%rax
        else:  # xor %eax,%eax; mov %cs|%ss,%ax
            a.emit(b"\x31\xc0" + (b"\x66\x8c\xc8" if reg == "cs" else b"\x66\x8c\xd0"))
        a.emit(b"\x48\x89\x83" + _d32(dst))  # mov %rax,dst(%rbx)

    # the memory reads
    offsets = layout.capture_offsets
    for i, cap in enumerate(layout.captures):
        here = offsets[i]
        if cap.reg is not None:
            reg_at = REGS_OFFSET + 8 * SNAPSHOT_REGS.index(cap.reg)
            a.emit(b"\x48\x8b\xb3" + _d32(reg_at))  # mov reg(%rbx),%rsi
        elif cap.from_capture is not None:
            base = offsets[cap.from_capture]
            a.emit(b"\x48\xc7\xc0" + _d32(-EFAULT))  # mov $-EFAULT,%rax
            a.emit(b"\x48\x83\xbb" + _d32(base + 8) + b"\x00")  # cmpq $0,status(%rbx)
            a.jcc(0xC, f"{name}_c{i}_status")  # jl: the base read failed, so does this
            a.emit(b"\x48\x8b\xb3" + _d32(base + CAPTURE_HEADER.size))  # mov data,%rsi
        else:
            a.emit(b"\x31\xf6")  # xor %esi,%esi
        a.emit(b"\x48\xb8" + struct.pack("<Q", asm.to_u64(cap.offset)))  # movabs $off,%rax
        a.emit(b"\x48\x01\xc6")  # add %rax,%rsi
        a.emit(b"\x48\x89\xb3" + _d32(here))  # mov %rsi,addr(%rbx)
        a.emit(b"\x48\x8d\xbb" + _d32(here + CAPTURE_HEADER.size))  # lea data(%rbx),%rdi
        a.emit(b"\xba" + _d32(cap.size))  # mov $size,%edx
        a.emit(asm.call_rel32(a.here, helpers.helper_for(cap)))
        if not cap.string:  # copy_*: 0 or -EFAULT; the status is the bytes read
            a.emit(b"\x48\x85\xc0")  # test %rax,%rax
            a.jcc(0x5, f"{name}_c{i}_status")  # jne
            a.emit(b"\xb8" + _d32(cap.size))  # mov $size,%eax
        a.label(f"{name}_c{i}_status")
        a.emit(b"\x48\x89\x83" + _d32(here + 8))  # mov %rax,status(%rbx)

    # complete: the stamp goes last (x86 keeps stores in order for the host's reader)
    a.emit(b"\x49\x8d\x44\x24\x01\x48\x89\x03")  # lea 1(%r12),%rax; mov %rax,(%rbx)
    a.lock_inc(asm.rip(ring.counters + 16 * probe_id, size=8))
    a.rip(b"\x48\x8b\x05", ring.head)  # mov head(%rip),%rax
    a.rip(b"\x48\x2b\x05", ring.tail)  # sub tail(%rip),%rax
    a.emit(b"\x48\x3d" + _d32(ring.high_water))  # cmp $high_water,%rax
    a.jcc(0x2, f"{name}_end")  # jb
    a.label(f"{name}_drain")
    a.emit(asm.movb_store_rip(a.here, ring.drain, 1))  # watched: the host drains now
    a.emit(TB_BREAK)
    a.jmp(f"{name}_end")
    a.label(f"{name}_full")
    a.lock_inc(asm.rip(ring.counters + 16 * probe_id + 8, size=8))
    a.jmp(f"{name}_drain")
    a.label(f"{name}_end")


def check_program_fits(code: bytes, size: int, where: str) -> None:
    """Raise when a program is larger than the cell it goes into."""
    if len(code) > size:
        raise KprobeError(f"record program for {where} takes {len(code)} bytes, over {size}")
