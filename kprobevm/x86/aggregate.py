"""The aggregate program: a probe hit folded into a per-CPU map by the guest, no record.

bpftrace's ``@[comm] = count()`` and ``hist(arg)`` as the guest runs them: the probe's
slot jumps here, the program saves the registers, turns maskable interrupts off (so the
task can neither be preempted nor migrate between reading its CPU number and updating
that CPU's part of the map, and no interrupt on this CPU lands in the middle of an
update), finds this CPU's region of the map and adds one to a counter: the map's only
counter (no key), the bucket of a histogram, or the entry of a key (pid, comm) in a
bounded open-addressing hash table. Every word of a CPU's region is written by that CPU
alone, each counter with one aligned 8-byte store, so a reader never sees a torn counter;
a key is written before its entry's ``used`` word, so a reader that reads the ``used``
words before the keys never sees half a key.

A hash table takes keys up to 3/4 of its entries (open addressing stays short); a hit
with a new key after that is counted in the region's ``dropped`` word and in the probe's
missed hits. A hit that finds its CPU busy (an NMI inside the program, or a probe in the
kernel's copy helper a field read calls) is missed as the record program's is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kprobevm.errors import KprobeError
from kprobevm.x86 import asm
from kprobevm.x86.asm import mem, rip
from kprobevm.x86.orc_walk import WALK_SCRATCH, OrcWalkTables, emit_orc_walk
from kprobevm.x86.record import (
    _ENTRY_SP,
    SNAPSHOT_REGS,
    CopyHelpers,
    RingLayout,
    _restore_and_leave,
    _save,
)

__all__ = [
    "ENTRY_SIZE",
    "HEADER_SIZE",
    "LOG2_BUCKETS",
    "AggregateField",
    "MapLayout",
    "build_aggregate_program",
]

Key = Literal["none", "cpu", "pid", "comm", "stack"]
#: Per-CPU region header: dropped u64 @0, keys in use u64 @8, field reads failed u64
#: @16, a field read's scratch u64 @24.
HEADER_SIZE = 64
HDR_DROPPED, HDR_KEYS, HDR_FAULTS, HDR_SCRATCH = 0, 8, 16, 24
#: Hash entry: key0 u64 @0, key1 u64 @8, used u64 @16, count u64 @24.
ENTRY_SIZE = 32
#: log2 buckets: 0 negative, 1 zero, 2 + k for [2**k, 2**(k+1)).
LOG2_BUCKETS = 66
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing's multiplier (2**64 / phi)


@dataclass(frozen=True)
class AggregateField:
    """The value a histogram counts: a snapshot register, or ``size`` bytes at
    ``offset`` past it (``deref``), as ``size`` bytes ``signed`` or not. A ``user`` read
    goes through the user copy; a ``mixed`` one through it below TASK_SIZE and the
    kernel's above (the kernel's own fetch rule since 5.8, as for a record's reads)."""

    reg: str
    size: int = 8
    signed: bool = False
    deref: bool = False
    offset: int = 0
    user: bool = False
    mixed: bool = False

    def __post_init__(self) -> None:
        if self.reg not in SNAPSHOT_REGS or self.reg == "ip":
            raise ValueError(f"no register {self.reg!r} for an aggregate's field")
        if self.size not in (1, 2, 4, 8):
            raise ValueError(f"field size {self.size} is not 1, 2, 4 or 8")


@dataclass(frozen=True)
class MapLayout:
    """One probe's map in slot memory: ``ncpus`` regions of ``stride`` bytes from ``base``.

    ``key`` ``none``/``cpu``: the region's values (``buckets`` u64 after the header; a
    count has one); ``pid``/``comm``: ``entries`` hash entries after the header;
    ``stack``: the walk's scratch and the key being built, then ``entries`` entries of
    ``1 + depth`` key words (:mod:`kprobevm.x86.orc_walk`), ``used`` and the count.
    ``linear``: a linear histogram's (min, max, step), its buckets being below min, one
    per step, and max or above.
    """

    base: int
    ncpus: int
    key: Key
    buckets: int = 1
    entries: int = 0
    linear: tuple[int, int, int] | None = None
    depth: int = 0
    """Frames of a stack key."""

    def __post_init__(self) -> None:
        if self.hashed and (self.entries < 8 or self.entries & (self.entries - 1)):
            raise ValueError(f"a hash map needs a power of two >= 8 entries, not {self.entries}")
        if (self.key == "stack") != (self.depth > 0):
            raise ValueError("a stack key, and only one, has a depth")

    @property
    def hashed(self) -> bool:
        """Keys found in a hash table (pid, comm, stack)."""
        return self.key in ("pid", "comm", "stack")

    @property
    def key_words(self) -> int:
        """u64 words of a hash entry's key."""
        return 1 + self.depth if self.key == "stack" else 2

    @property
    def entry_size(self) -> int:
        """Bytes of a hash entry: its key, ``used``, the count."""
        return ENTRY_SIZE if self.key != "stack" else 8 * (self.key_words + 2)

    @property
    def body(self) -> int:
        """Offset in a CPU's region of its values or hash entries."""
        if self.key != "stack":
            return HEADER_SIZE
        return HEADER_SIZE + WALK_SCRATCH + 8 * self.key_words

    @property
    def max_keys(self) -> int:
        """Keys a CPU's table takes before new ones are dropped."""
        return self.entries * 3 // 4

    @property
    def stride(self) -> int:
        """Bytes of one CPU's region (a multiple of 64: no two CPUs share a cache line)."""
        body = self.entry_size * self.entries if self.hashed else 8 * self.buckets
        return (self.body + body + 63) & ~63

    @property
    def size(self) -> int:
        """Bytes of the whole map."""
        return self.stride * self.ncpus


def _counter(probe_id: int, ring: RingLayout, missed: bool) -> asm.Mem:
    """The probe's hits (or missed hits) counter among the record ring's counters."""
    return rip(ring.counters + 16 * probe_id + (8 if missed else 0), size=8)


def build_aggregate_program(
    at: int,
    *,
    probe_id: int,
    layout: MapLayout,
    field: AggregateField | None,
    ring: RingLayout,
    helpers: CopyHelpers,
    cont: int,
    walk: OrcWalkTables | None = None,
    probe_ip: int = 0,
) -> asm.Program:
    """The program for a site with one aggregating probe: update its map, then ``cont``.

    ``cont`` is the slot's copy of the displaced instruction. A histogram needs
    ``field``; a count takes none. A count by stack needs ``walk``, the guest's ORC
    tables, and ``probe_ip``, the probe's address (the stack's first frame is one past).
    """
    if (field is None) != (layout.buckets == 1 and layout.linear is None):
        raise KprobeError("an aggregate's field goes with a histogram, and only with one")
    if (walk is None) != (layout.key != "stack"):
        raise KprobeError("a count by stack needs the guest's ORC tables, and only it")
    a = asm.Assembler(at)
    _save(a)
    a.cli()  # popfq restores IF
    a.mov("r13d", mem(disp=helpers.cpu_number, seg="gs"))
    a.cmp("r13d", layout.ncpus, imm32=True)
    a.jcc("ae", "missed")  # a CPU the map has no region for
    busy = mem("rax", 0, "r13", size=1)
    guarded = layout.hashed or (field is not None and field.deref)
    if guarded:
        a.lea("rax", rip(ring.busy))
        a.mov("cl", 1)
        a.xchg(busy, "cl")
        a.test("cl", "cl")
        a.jcc("ne", "missed")
    a.mov("eax", layout.stride)
    a.imul("rax", "r13")
    a.lea("rbx", rip(layout.base))
    a.add("rbx", "rax")  # rbx: this CPU's region
    if walk is not None:
        emit_orc_walk(a, walk, scratch=HEADER_SIZE, key=HEADER_SIZE + WALK_SCRATCH,
                      depth=layout.depth, probe_ip=probe_ip)  # fmt: skip
        a.label("walked")
        _stack_update(a, layout)
    elif layout.hashed:
        _hash_update(a, layout, helpers)
    elif field is None:
        a.inc(mem("rbx", HEADER_SIZE, size=8, disp32=True))
    else:
        _field_value(a, field, helpers)
        if layout.linear is None:
            _log2_bucket(a, field)
        else:
            _linear_bucket(a, field, layout.linear, layout.buckets)
        a.inc(mem("rbx", HEADER_SIZE, "rcx", 8, size=8, disp32=True))
    a.label("counted")
    a.lock_inc(_counter(probe_id, ring, missed=False))
    a.label("done")
    if guarded:
        a.lea("rax", rip(ring.busy))
        a.mov(busy, 0)
    a.label("leave")
    _restore_and_leave(a, cont)
    a.label("dropped")
    a.inc(mem("rbx", HDR_DROPPED, size=8, disp32=True))
    a.lock_inc(_counter(probe_id, ring, missed=True))
    a.jmp("done")
    a.label("faulted")
    a.inc(mem("rbx", HDR_FAULTS, size=8, disp32=True))
    a.lock_inc(_counter(probe_id, ring, missed=True))
    a.jmp("done")
    a.label("missed")
    a.lock_inc(_counter(probe_id, ring, missed=True))
    a.jmp("leave")
    return a.assemble()


def _hash_update(a: asm.Assembler, layout: MapLayout, helpers: CopyHelpers) -> None:
    """Find (or add) ``current``'s key in this CPU's table and count the hit there."""
    bits = layout.entries.bit_length() - 1
    a.mov("rax", mem(disp=helpers.current_task, seg="gs"))
    if layout.key == "pid":
        a.mov("r8d", mem("rax", helpers.task_pid, disp32=True))  # zero-extends
        a.xor("r9d", "r9d")
    else:
        a.mov("r8", mem("rax", helpers.task_comm, disp32=True))
        a.mov("r9", mem("rax", helpers.task_comm + 8, disp32=True))
    a.mov("rdi", "r8")
    a.xor("rdi", "r9")
    a.movabs("rax", _GOLDEN)
    a.imul("rdi", "rax")
    a.shr("rdi", 64 - bits)  # the first entry to look at
    a.mov("ecx", layout.entries)  # at most every entry once
    a.label("lookup")
    a.mov("rsi", "rdi")
    a.shl("rsi", 5)  # * ENTRY_SIZE
    a.add("rsi", "rbx")
    a.cmp(mem("rsi", HEADER_SIZE + 16, size=8, disp32=True), 0)
    a.jcc("e", "empty")
    a.cmp(mem("rsi", HEADER_SIZE, disp32=True), "r8")
    a.jcc("ne", "next")
    a.cmp(mem("rsi", HEADER_SIZE + 8, disp32=True), "r9")
    a.jcc("ne", "next")
    a.inc(mem("rsi", HEADER_SIZE + 24, size=8, disp32=True))
    a.jmp("counted")
    _next_or_new(a, layout, "", "ecx")
    a.mov(mem("rsi", HEADER_SIZE, disp32=True), "r8")
    a.mov(mem("rsi", HEADER_SIZE + 8, disp32=True), "r9")
    a.mov(mem("rsi", HEADER_SIZE + 24, size=8, disp32=True), 1)
    # `used` goes last: a reader that saw it set finds the key whole
    a.mov(mem("rsi", HEADER_SIZE + 16, size=8, disp32=True), 1)


def _next_or_new(a: asm.Assembler, layout: MapLayout, prefix: str, left: str) -> None:
    """The open-addressing tail of a lookup: at ``{prefix}next`` the following entry (while
    ``left`` counts down), at ``{prefix}empty`` a new key taken unless the table is full
    (then the hit is dropped); falls through with the key counted as taken."""
    a.label(f"{prefix}next")
    a.inc("edi")
    a.and_("edi", layout.entries - 1)
    a.dec(left)
    a.jcc("ne", f"{prefix}lookup")
    a.jmp("dropped")  # (never: a table is never more than 3/4 full)
    a.label(f"{prefix}empty")
    a.cmp(mem("rbx", HDR_KEYS, size=8, disp32=True), layout.max_keys, imm32=True)
    a.jcc("ae", "dropped")  # full: a new key is not taken
    a.inc(mem("rbx", HDR_KEYS, size=8, disp32=True))


def _stack_update(a: asm.Assembler, layout: MapLayout) -> None:
    """Count the hit at the key the walk built (its words in use hashed, compared and
    copied one by one; the key before ``used``, as for pid and comm)."""
    words, size, body = layout.key_words, layout.entry_size, layout.body
    key = HEADER_SIZE + WALK_SCRATCH
    used, count = body + 8 * words, body + 8 * words + 8
    # only the words in use: the frame count (in word 0) and the frames; the words past
    # them are zero in every entry (a map starts zeroed) and never read
    a.mov("r10", mem("rbx", key, disp32=True))
    a.and_("r10d", 0xFF)
    a.inc("r10d")
    a.xor("edi", "edi")
    a.xor("ecx", "ecx")
    a.movabs("r8", _GOLDEN)
    a.label("s_hash")
    a.xor("rdi", mem("rbx", key, "rcx", 8, disp32=True))
    a.imul("rdi", "r8")
    a.inc("ecx")
    a.cmp("ecx", "r10d")
    a.jcc("b", "s_hash")
    a.shr("rdi", 64 - (layout.entries.bit_length() - 1))  # the first entry to look at
    a.mov("r9d", layout.entries)  # at most every entry once
    a.label("s_lookup")
    a.mov("esi", size)
    a.imul("rsi", "rdi")
    a.add("rsi", "rbx")
    a.cmp(mem("rsi", used, size=8, disp32=True), 0)
    a.jcc("e", "s_empty")
    a.xor("ecx", "ecx")
    a.label("s_compare")
    a.mov("rax", mem("rbx", key, "rcx", 8, disp32=True))
    a.cmp(mem("rsi", body, "rcx", 8, disp32=True), "rax")
    a.jcc("ne", "s_next")
    a.inc("ecx")
    a.cmp("ecx", "r10d")
    a.jcc("b", "s_compare")
    a.inc(mem("rsi", count, size=8, disp32=True))
    a.jmp("counted")
    _next_or_new(a, layout, "s_", "r9d")
    a.xor("ecx", "ecx")
    a.label("s_copy")
    a.mov("rax", mem("rbx", key, "rcx", 8, disp32=True))
    a.mov(mem("rsi", body, "rcx", 8, disp32=True), "rax")
    a.inc("ecx")
    a.cmp("ecx", "r10d")
    a.jcc("b", "s_copy")
    a.mov(mem("rsi", count, size=8, disp32=True), 1)
    a.mov(mem("rsi", used, size=8, disp32=True), 1)  # last: the key is whole before it


def _field_value(a: asm.Assembler, field: AggregateField, helpers: CopyHelpers) -> None:
    """The field's value in rax, extended from its size (a failed read: ``faulted``)."""
    pushed = len(SNAPSHOT_REGS) - 5  # the registers _save pushed, in pt_regs order
    index = SNAPSHOT_REGS.index(field.reg)
    if index < pushed:
        a.mov("rax", mem("rsp", 8 * index, disp32=True))
    elif field.reg == "sp":
        a.lea("rax", mem("rsp", _ENTRY_SP, disp32=True))
    else:  # cs, ss, flags: unusual, but the snapshot has them
        raise KprobeError(f"an aggregate's field cannot be %{field.reg}")
    if field.deref:
        a.movabs("rsi", asm.to_u64(field.offset))
        a.add("rsi", "rax")
        a.lea("rdi", mem("rbx", HDR_SCRATCH, disp32=True))
        a.mov(mem("rdi", 0, size=8), 0)  # the bytes past the read's size read as 0
        a.mov("edx", field.size)
        if field.mixed and not field.user:
            a.movabs("rax", helpers.task_size_max)
            a.cmp("rsi", "rax")
            a.jcc("ae", "kernel_read")
            a.call(helpers.copy_from_user)
            a.jmp("copied")
            a.label("kernel_read")
            a.call(helpers.copy_from_kernel)
            a.label("copied")
        else:
            a.call(helpers.copy_from_user if field.user else helpers.copy_from_kernel)
        a.test("rax", "rax")
        a.jcc("ne", "faulted")
        a.mov("rax", mem("rbx", HDR_SCRATCH, disp32=True))
    if field.size < 8:
        shift = 64 - 8 * field.size
        a.shl("rax", shift)
        if field.signed:
            a.sar("rax", shift)
        else:
            a.shr("rax", shift)


def _log2_bucket(a: asm.Assembler, field: AggregateField) -> None:
    """rcx: the log2 bucket of rax (0 negative, 1 zero, 2 + floor(log2))."""
    a.xor("ecx", "ecx")
    a.test("rax", "rax")
    if field.signed:
        a.jcc("s", "bucket")
    a.mov("ecx", 1)
    a.jcc("e", "bucket")  # (mov leaves the flags as test set them)
    a.bsr("rcx", "rax")
    a.add("ecx", 2)
    a.label("bucket")


def _linear_bucket(
    a: asm.Assembler, field: AggregateField, linear: tuple[int, int, int], buckets: int
) -> None:
    """rcx: the linear bucket of rax (0 below min, 1 + (v - min) / step, last: >= max)."""
    lo, hi, step = linear
    below, above = ("l", "ge") if field.signed else ("b", "ae")
    a.xor("ecx", "ecx")
    if field.signed or lo >= 0:  # (an unsigned value is never below a negative min)
        a.movabs("rdx", asm.to_u64(lo))
        a.cmp("rax", "rdx")
        a.jcc(below, "bucket")
    a.mov("ecx", buckets - 1)
    if not field.signed and hi <= 0:
        a.jmp("bucket")  # every unsigned value is at or above max
    else:
        a.movabs("rdx", asm.to_u64(hi))
        a.cmp("rax", "rdx")
        a.jcc(above, "bucket")
    a.movabs("rdx", asm.to_u64(lo))
    a.sub("rax", "rdx")
    a.xor("edx", "edx")
    a.movabs("rcx", step)
    a.div("rcx")
    a.lea("rcx", mem("rax", 1))
    a.label("bucket")
