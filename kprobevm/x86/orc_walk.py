"""An ORC unwinder the guest runs itself: a hit's kernel stack as a map key, no record.

The aggregate program (:mod:`kprobevm.x86.aggregate`) emits this walk for ``count --by
stack``. It follows the same rules as the host's unwinder (:mod:`kprobevm.x86.unwind_orc`,
after the kernel's ``unwind_orc.c``), over the guest kernel's own tables in its memory:
``.orc_unwind_ip`` and ``.orc_unwind``, with ``orc_lookup`` (filled at boot) narrowing the
binary search for core text, and the whole table searched for init text; each CPU keeps
the entries it decoded in a small cache (the tables never change). The first frame
is the probe's address + 1 (``regs->ip`` as a kprobe handler sees it), then one return
address per CALL frame; a ``pt_regs`` (REGS) or iret frame (REGS_PARTIAL) is crossed as
the kernel crosses it, and one with a user ``cs`` ends the walk.

Every stack word is read only inside ``current``'s task stack or this CPU's IRQ stack
(both mapped whole); the ORC tables are kernel read-only data read at indices bounded
by their sizes. Anything else ends the walk with a reason in the key (:data:`CUT_REASONS`):
an address outside the vmlinux's text (a module's, whose tables are not walked: that
frame is kept, the walk stops there), a missing or undefined entry, a stack word out of
bounds, a base register or frame type the walker does not take, a stack going the wrong
way, or more frames than the key holds. Nothing is guessed.

The key is ``1 + depth`` u64 words: word 0 is the number of frames (bits 0-7) and the
reason the walk ended (bits 8-15, 0: the stack's end), then the frames; the words past
the last frame are not written (a map entry's are zero).
"""

from __future__ import annotations

from dataclasses import dataclass

from kprobevm.x86 import asm
from kprobevm.x86.asm import mem
from kprobevm.x86.record import _ENTRY_SP

__all__ = [
    "CUT_REASONS",
    "MAX_DEPTH",
    "WALK_SCRATCH",
    "OrcWalkTables",
    "emit_orc_walk",
]

MAX_DEPTH = 64
"""The most frames a stack key holds (bits 0-7 of its first word count them)."""
CACHE_SLOTS = 64
"""Entries a CPU's lookup cache holds: an address's entry, as the walk decoded it."""
WALK_SCRATCH = 64 + 16 * CACHE_SLOTS
"""Bytes of a CPU's map region the walk keeps its bounds, lookup state and cache in."""
_TASK_LO, _IRQ_LO, _LOOKUP, _OFFSETS, _BITS, _RSP, _SLOT, _CACHE = 0, 8, 16, 24, 32, 40, 48, 64
_GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing's multiplier (2**64 / phi)
_KERNEL_HALF = 0xFF00000000000000  # the lowest kernel address of either paging mode
_MASK64 = (1 << 64) - 1
COMPLETE, CUT_DEPTH, CUT_OUTSIDE, CUT_NO_ORC = 0, 1, 2, 3
CUT_UNREADABLE, CUT_WRONG_WAY, CUT_UNSUPPORTED = 4, 5, 6
CUT_REASONS = {
    COMPLETE: "",
    CUT_DEPTH: "deeper than the key's frames",
    CUT_OUTSIDE: "outside the vmlinux's text (a module's frames are not walked)",
    CUT_NO_ORC: "no ORC entry",
    CUT_UNREADABLE: "a stack word outside the task's and the IRQ stack",
    CUT_WRONG_WAY: "stack going in the wrong direction",
    CUT_UNSUPPORTED: "an ORC entry the walker does not take",
}
"""Why a walk ended, by the code in bits 8-15 of a key's first word."""

# ORC's base registers (orc_types.h) and struct pt_regs' offsets (x86-64)
_REG_UNDEFINED, _REG_PREV_SP, _REG_DX, _REG_DI, _REG_BP, _REG_SP = 0, 1, 2, 3, 4, 5
_REG_R10, _REG_R13, _REG_BP_INDIRECT, _REG_SP_INDIRECT = 6, 7, 8, 9
_PT = {"r13": 16, "bp": 32, "r10": 56, "dx": 96, "di": 112, "ip": 128, "cs": 136, "sp": 152}
_LOOKUP_BLOCK_ORDER = 8  # the kernel's orc_lookup: one u32 per 256 bytes of text
_STACK_PAGE = 4096  # the wrong-direction check: both stack pointers in one page


@dataclass(frozen=True)
class OrcWalkTables:
    """Where the guest kernel keeps what the walk reads (KASLR slide applied), and how.

    ``text``/``init_text``: [start, end) of core and init text; ``ip_table``/``entries``:
    ``.orc_unwind_ip`` and ``.orc_unwind`` of ``count`` entries; ``lookup``: ``orc_lookup``
    of ``lookup_blocks`` u32s; ``signal_bit``/``indirect_offset_after``: the entry's layout
    (:class:`~kprobevm.kernel.orc.OrcFormat`); ``thread_size``: the task and IRQ stacks'
    size; ``task_stack``: ``task_struct.stack``'s offset; ``irq_stack_ptr``: the per-CPU
    offset of ``hardirq_stack_ptr`` (its stack's top - 8); ``current_task``: ``current``'s.
    """

    text: tuple[int, int]
    init_text: tuple[int, int]
    ip_table: int
    entries: int
    count: int
    lookup: int
    lookup_blocks: int
    signal_bit: bool
    indirect_offset_after: bool
    thread_size: int
    task_stack: int
    irq_stack_ptr: int
    current_task: int

    def __post_init__(self) -> None:
        if not 0 < self.count < 1 << 31 or self.lookup_blocks < 2:
            raise ValueError(f"ORC tables of {self.count} entries, {self.lookup_blocks} blocks")
        if not self.task_stack:
            raise ValueError("the walk needs task_struct.stack's offset")


def emit_orc_walk(
    a: asm.Assembler, t: OrcWalkTables, *, scratch: int, key: int, depth: int, probe_ip: int
) -> None:
    """Fill the key at ``rbx + key`` with the stack at the hit, keeping the walk's state
    at ``rbx + scratch`` (:data:`WALK_SCRATCH` bytes). The probe's registers are at
    ``rsp`` as :func:`~kprobevm.x86.record._save` pushed them (pt_regs' first 15 fields),
    the flags and the probed ``sp`` above them. Uses every register but rbx, r13 and
    rsp, and goes on at label ``walked``."""
    if not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"a stack key of {depth} frames: 1..{MAX_DEPTH}")
    w = _Walk(a, t, scratch, key, depth)
    w.start(probe_ip)
    w.lookup()
    w.decode()
    w.cfa()
    w.frame()
    w.find_bp()
    w.ends()
    w.read_word()


class _Walk:
    """The walk's pieces, emitted in order. State: r8 ip, r9 sp, r10 bp, r11 the last
    registers frame (0: none), r12 the full one before an iret frame (0: none), r14 bit 0
    ``full_regs`` and bit 1 ``signal``, r15 the frames in the key; rdx the CFA once
    found, rdi the sp before the step."""

    def __init__(self, a: asm.Assembler, t: OrcWalkTables, scratch: int, key: int, depth: int):
        self.a, self.t, self.scratch, self.key, self.depth = a, t, scratch, key, depth

    def _s(self, offset: int) -> asm.Mem:
        return mem("rbx", self.scratch + offset, disp32=True)

    def start(self, probe_ip: int) -> None:
        """The two stacks' bounds, frame 0 and the hit's registers. (The key's words past
        its frames are left as they are: nothing reads them.)"""
        a, t = self.a, self.t
        a.mov(self._s(_RSP), "rsp")  # a cut from any call depth comes back to it
        a.mov("rax", mem(disp=t.current_task, seg="gs"))
        a.mov("rax", mem("rax", t.task_stack, disp32=True))
        a.mov(self._s(_TASK_LO), "rax")
        a.mov("rcx", mem(disp=t.irq_stack_ptr, seg="gs"))
        a.movabs("rdx", _KERNEL_HALF)
        a.cmp("rcx", "rdx")
        a.jcc("b", "w_no_irq")  # not set up: the task stack's bounds twice
        a.lea("rax", mem("rcx", 8 - t.thread_size, disp32=True))
        a.label("w_no_irq")
        a.mov(self._s(_IRQ_LO), "rax")
        a.movabs("r8", (probe_ip + 1) & _MASK64)
        a.mov(mem("rbx", self.key + 8, disp32=True), "r8")
        a.mov("r15d", 1)
        a.lea("r9", mem("rsp", _ENTRY_SP, disp32=True))
        a.mov("r10", mem("rsp", _PT["bp"], disp32=True))
        a.mov("r11", "rsp")  # the hit's registers, laid out as pt_regs' first 15
        a.xor("r12d", "r12d")
        a.mov("r14d", 3)  # full registers; ip is exact (not a return address)

    def lookup(self) -> None:
        """The entry in force at ip (ip - 1 after a call: ``orc_find``'s search); its
        offsets go to scratch, its bits to eax. ecx..edx: the index range searched."""
        a, t = self.a, self.t
        a.label("w_next")
        a.mov("rdi", "r8")
        a.test("r14d", 2)
        a.jcc("ne", "w_exact")
        a.dec("rdi")
        a.label("w_exact")
        a.mov(self._s(_LOOKUP), "rdi")
        # the cache first: an address looked up before has its entry decoded there
        a.movabs("rax", _GOLDEN)
        a.imul("rax", "rdi")
        a.shr("rax", 64 - (CACHE_SLOTS.bit_length() - 1))
        a.shl("eax", 4)
        a.lea("rsi", mem("rbx", self.scratch + _CACHE, "rax", disp32=True))
        a.mov(self._s(_SLOT), "rsi")
        a.cmp(mem("rsi", 0), "rdi")
        a.jcc("ne", "w_search_table")
        a.mov("rax", mem("rsi", 8))  # the offsets, and the bits in the high half
        a.mov(self._s(_OFFSETS), "rax")
        a.shr("rax", 32)
        a.mov(self._s(_BITS), "rax")
        a.jmp("w_have_bits")
        a.label("w_search_table")
        a.movabs("rax", t.text[0])
        a.mov("rcx", "rdi")
        a.sub("rcx", "rax")
        a.movabs("rax", t.text[1] - t.text[0])
        a.cmp("rcx", "rax")
        a.jcc("ae", "w_init")
        a.shr("rcx", _LOOKUP_BLOCK_ORDER)
        a.cmp("rcx", t.lookup_blocks - 1, imm32=True)
        a.jcc("ae", "w_no_orc")
        a.movabs("rax", t.lookup)
        a.mov("edx", mem("rax", 4, "rcx", 4))
        a.mov("ecx", mem("rax", 0, "rcx", 4))
        a.inc("edx")
        a.jmp("w_search")
        a.label("w_init")  # init text: the whole table, as the kernel searches it
        a.movabs("rax", t.init_text[0])
        a.mov("rcx", "rdi")
        a.sub("rcx", "rax")
        a.movabs("rax", t.init_text[1] - t.init_text[0])
        a.cmp("rcx", "rax")
        a.jcc("ae", "w_no_orc")
        a.xor("ecx", "ecx")
        a.mov("edx", t.count)
        a.label("w_search")  # [ecx, edx): the last entry at or below, else the first
        a.cmp("edx", t.count)
        a.jcc("a", "w_no_orc")
        a.cmp("ecx", "edx")
        a.jcc("ae", "w_no_orc")
        a.mov("esi", "ecx")
        a.dec("edx")
        a.label("w_bisect")
        a.cmp("ecx", "edx")
        a.jcc("g", "w_found")
        a.lea("rax", mem("rcx", 0, "rdx"))
        a.shr("rax", 1)
        a.movabs("rbp", t.ip_table)
        a.lea("rbp", mem("rbp", 0, "rax", 4))
        a.mov("edi", mem("rbp", 0))
        a.shl("rdi", 32)
        a.sar("rdi", 32)
        a.add("rdi", "rbp")  # an entry's address is relative to its own slot
        a.cmp("rdi", self._s(_LOOKUP))
        a.jcc("a", "w_left")
        a.mov("esi", "eax")
        a.mov("ecx", "eax")
        a.inc("ecx")
        a.jmp("w_bisect")
        a.label("w_left")
        a.mov("edx", "eax")
        a.dec("edx")
        a.jmp("w_bisect")
        a.label("w_found")
        a.lea("rax", mem("rsi", 0, "rsi", 2))
        a.movabs("rbp", t.entries)
        a.lea("rbp", mem("rbp", 0, "rax", 2))  # 6 bytes an entry
        a.mov("edi", mem("rbp", 0))
        a.mov(self._s(_OFFSETS), "rdi")  # sp_offset, bp_offset: s16 each
        a.mov("eax", mem("rbp", 2))
        a.shr("eax", 16)  # the bit fields

    def decode(self) -> None:
        """The bits in one form for both layouts, kept in scratch: registers in bits 0-7,
        the type in bits 8-9 (0 call, 1 regs, 2 iret frame), signal in bit 16."""
        a = self.a
        a.mov("ecx", "eax")
        a.shr("ecx", 8)
        if self.t.signal_bit:
            a.and_("ecx", 7)
            a.cmp("ecx", 1)
            a.jcc("e", "w_end")  # END_OF_STACK
            a.jcc("b", "w_no_orc")  # UNDEFINED
            a.cmp("ecx", 4)
            a.jcc("a", "w_unsupported")
            a.mov("edx", "eax")
            a.and_("edx", 0x800)
            a.shl("edx", 5)
            a.and_("eax", 0xFF)
            a.sub("ecx", 2)
            a.shl("ecx", 8)
            a.or_("eax", "ecx")
            a.or_("eax", "edx")
        else:
            a.test("eax", 0xF)
            a.jcc("ne", "w_defined")
            a.test("eax", 0x400)  # an undefined sp with the end bit: the end
            a.jcc("ne", "w_end")
            a.jmp("w_no_orc")
            a.label("w_defined")
            a.and_("ecx", 3)
            a.cmp("ecx", 3)
            a.jcc("e", "w_unsupported")
            a.and_("eax", 0x3FF)
            a.test("ecx", "ecx")  # regs and iret frames are signal frames there
            a.jcc("e", "w_nosignal")
            a.or_("eax", 0x10000)
            a.label("w_nosignal")
        a.mov(self._s(_BITS), "rax")
        # into the cache: the ORC tables of vmlinux never change while the kernel runs
        a.mov("rsi", self._s(_SLOT))
        a.mov("rcx", self._s(_LOOKUP))
        a.mov(mem("rsi", 0), "rcx")
        a.mov("ecx", mem("rbx", self.scratch + _OFFSETS, disp32=True))
        a.mov("rdx", "rax")
        a.shl("rdx", 32)
        a.or_("rdx", "rcx")
        a.mov(mem("rsi", 8), "rdx")
        a.label("w_have_bits")

    def cfa(self) -> None:
        """rdx: the caller's stack pointer, from the entry's base register and offset."""
        a, t = self.a, self.t
        a.mov("ecx", "eax")
        a.and_("ecx", 0xF)
        a.mov("rdx", self._s(_OFFSETS))
        a.shl("rdx", 48)
        a.sar("rdx", 48)  # sp_offset
        for reg, base in ((_REG_SP, "r9"), (_REG_BP, "r10")):
            a.cmp("ecx", reg)
            a.jcc("ne", f"w_not{reg}")
            a.add("rdx", base)
            a.jmp("w_have_cfa")
            a.label(f"w_not{reg}")
        a.cmp("ecx", _REG_BP_INDIRECT)
        a.jcc("ne", "w_not_bpi")
        a.lea("rsi", mem("rdx", 0, "r10"))
        a.call("w_rd")
        a.mov("rdx", "rax")
        a.jmp("w_have_cfa")
        a.label("w_not_bpi")
        a.cmp("ecx", _REG_SP_INDIRECT)
        a.jcc("ne", "w_not_spi")
        if t.indirect_offset_after:
            a.mov("rsi", "r9")
            a.call("w_rd")
            a.add("rdx", "rax")  # [sp] + offset: the old sp saved at the new stack's top
        else:
            a.lea("rsi", mem("rdx", 0, "r9"))
            a.call("w_rd")
            a.mov("rdx", "rax")
        a.jmp("w_have_cfa")
        a.label("w_not_spi")
        for reg, name in ((_REG_R10, "r10"), (_REG_R13, "r13"), (_REG_DI, "di"), (_REG_DX, "dx")):
            a.cmp("ecx", reg)
            a.jcc("ne", f"w_not{reg}")
            a.mov("ecx", _PT[name])
            a.call("w_get_reg")
            a.mov("rdx", "rax")  # the register itself, no offset
            a.jmp("w_have_cfa")
            a.label(f"w_not{reg}")
        a.jmp("w_unsupported")
        a.label("w_have_cfa")

    def frame(self) -> None:
        """The caller's ip and sp, and the registers frame, by the entry's type."""
        a = self.a
        a.mov("rcx", self._s(_BITS))
        a.shr("ecx", 8)
        a.and_("ecx", 3)
        a.mov("rdi", "r9")
        a.cmp("ecx", 1)
        a.jcc("e", "w_regs")
        a.jcc("a", "w_iret")
        a.lea("rsi", mem("rdx", -8))
        a.call("w_rd")
        a.mov("r8", "rax")
        a.mov("r9", "rdx")
        a.xor("r11d", "r11d")
        a.xor("r12d", "r12d")
        a.jmp("w_framed")
        a.label("w_regs")
        a.lea("rsi", mem("rdx", _PT["cs"], disp32=True))
        a.call("w_rd")
        a.test("eax", 3)
        a.jcc("ne", "w_end")  # back in user mode: the stack's end
        a.lea("rsi", mem("rdx", _PT["ip"], disp32=True))
        a.call("w_rd")
        a.mov("r8", "rax")
        a.lea("rsi", mem("rdx", _PT["sp"], disp32=True))
        a.call("w_rd")
        a.mov("r9", "rax")
        a.mov("r11", "rdx")
        a.xor("r12d", "r12d")
        a.or_("r14d", 1)
        a.jmp("w_framed")
        a.label("w_iret")
        a.lea("rsi", mem("rdx", _PT["cs"] - _PT["ip"]))
        a.call("w_rd")
        a.test("eax", 3)
        a.jcc("ne", "w_end")
        a.mov("rsi", "rdx")
        a.call("w_rd")
        a.mov("r8", "rax")
        a.lea("rsi", mem("rdx", _PT["sp"] - _PT["ip"]))
        a.call("w_rd")
        a.mov("r9", "rax")
        a.test("r14d", 1)
        a.jcc("e", "w_kept_prev")
        a.mov("r12", "r11")
        a.label("w_kept_prev")
        a.lea("r11", mem("rdx", -_PT["ip"], disp32=True))
        a.and_("r14d", -2)
        a.label("w_framed")
        a.and_("r14d", -3)

    def find_bp(self) -> None:
        """The caller's bp by the entry's bp register, its signal bit, and the check
        that the stack went up."""
        a = self.a
        a.mov("rcx", self._s(_OFFSETS))
        a.shl("rcx", 32)
        a.sar("rcx", 48)  # bp_offset
        a.mov("rsi", self._s(_BITS))
        a.shr("esi", 4)
        a.and_("esi", 0xF)
        a.jcc("ne", "w_bp_defined")
        a.mov("ecx", _PT["bp"])
        a.call("w_get_reg_or_none")
        a.jcc("ne", "w_bp_done")  # no registers frame: bp stays
        a.mov("r10", "rax")
        a.jmp("w_bp_done")
        a.label("w_bp_defined")
        a.cmp("esi", _REG_PREV_SP)
        a.jcc("ne", "w_bp_not_prev")
        a.lea("rsi", mem("rdx", 0, "rcx"))
        a.call("w_rd")
        a.mov("r10", "rax")
        a.jmp("w_bp_done")
        a.label("w_bp_not_prev")
        a.cmp("esi", _REG_BP)
        a.jcc("ne", "w_unsupported")
        a.lea("rsi", mem("r10", 0, "rcx"))
        a.call("w_rd")
        a.mov("r10", "rax")
        a.label("w_bp_done")
        a.mov("rax", self._s(_BITS))
        a.test("eax", 0x10000)
        a.jcc("e", "w_no_signal")
        a.or_("r14d", 2)
        a.label("w_no_signal")
        a.mov("rax", "r9")
        a.xor("rax", "rdi")
        a.cmp("rax", _STACK_PAGE, imm32=True)
        a.jcc("ae", "w_text")
        a.cmp("r9", "rdi")
        a.jcc("be", "w_wrong_way")

    def ends(self) -> None:
        """The new ip: a frame of the key, and on, if it is vmlinux text; else the end."""
        a, t = self.a, self.t
        a.label("w_text")
        for lo, hi in (t.text, t.init_text):
            a.movabs("rax", lo)
            a.mov("rcx", "r8")
            a.sub("rcx", "rax")
            a.movabs("rax", hi - lo)
            a.cmp("rcx", "rax")
            a.jcc("b", "w_in_text")
        a.test("r8", "r8")
        a.jcc("e", "w_end")  # (the kernel's text check refuses 0: the end)
        a.mov("eax", CUT_OUTSIDE)
        a.jmp("w_keep")
        a.label("w_in_text")
        a.xor("eax", "eax")
        a.label("w_keep")
        a.cmp("r15d", self.depth)
        a.jcc("ae", "w_too_deep")
        a.mov(mem("rbx", self.key + 8, "r15", 8, disp32=True), "r8")
        a.inc("r15d")
        a.test("eax", "eax")
        a.jcc("e", "w_next")
        a.jmp("w_cut")
        a.label("w_too_deep")
        a.mov("eax", CUT_DEPTH)
        a.jmp("w_cut")
        for label, code in (("w_no_orc", CUT_NO_ORC), ("w_unreadable", CUT_UNREADABLE),
                            ("w_wrong_way", CUT_WRONG_WAY),
                            ("w_unsupported", CUT_UNSUPPORTED)):  # fmt: skip
            a.label(label)
            a.mov("eax", code)
            a.jmp("w_cut")
        a.label("w_end")
        a.xor("eax", "eax")
        a.label("w_cut")
        a.mov("rsp", self._s(_RSP))
        a.shl("eax", 8)
        a.or_("eax", "r15d")
        a.mov(mem("rbx", self.key, disp32=True), "rax")
        a.jmp("walked")

    def read_word(self) -> None:
        """``w_rd``: rax = the u64 at rsi, read only inside the task's stack or this CPU's
        IRQ stack, else the walk is cut. ``w_get_reg_or_none``: rax = the word at ecx of
        the last full registers frame (``get_reg``), ZF set; ZF clear when there is none.
        ``w_get_reg``: the same, the walk cut when there is none. rax, rsi and the flags
        change."""
        a, t = self.a, self.t
        a.label("w_rd")
        for bound in (_TASK_LO, _IRQ_LO):
            a.mov("rax", "rsi")
            a.sub("rax", self._s(bound))
            a.cmp("rax", t.thread_size - 8, imm32=True)
            a.jcc("be", "w_rd_ok")
        a.jmp("w_unreadable")
        a.label("w_rd_ok")
        a.mov("rax", mem("rsi", 0))
        a.ret()
        a.label("w_get_reg")
        a.call("w_get_reg_or_none")
        a.jcc("ne", "w_unsupported")
        a.ret()
        a.label("w_get_reg_or_none")
        a.mov("rsi", "r11")
        a.test("r14d", 1)
        a.jcc("ne", "w_reg_source")
        a.mov("rsi", "r12")
        a.label("w_reg_source")
        a.test("r11", "r11")
        a.jcc("e", "w_no_reg")
        a.test("rsi", "rsi")
        a.jcc("e", "w_no_reg")
        a.add("rsi", "rcx")
        a.call("w_rd")
        a.cmp("eax", "eax")  # ZF set: got it
        a.ret()
        a.label("w_no_reg")
        a.cmp("rsp", 0)  # ZF clear
        a.ret()
