"""Jump-optimized probes: which instructions a 5-byte ``jmp`` may replace (after the
kernel's ``can_optimize`` and ``copy_optimized_instructions`` in
``arch/x86/kernel/kprobes/opt.c``).

An optimized probe's first bytes become ``jmp slot``: the slot runs what the probe runs
(its watched store or record program), then copies of every instruction the jump
covers, then jumps back past them. That is only correct when nothing else can reach the
covered bytes: the whole function is decoded, and no branch in it may land inside them;
a function with an indirect jump (a jump table could land anywhere) is left alone, as is
one with an exception-table entry (a fixup jumps back into the function). The covered
instructions must run unchanged elsewhere: plain instructions only (RIP-relative
operands are rewritten), no branch, call or return. Which text the kernel patches and
where other probes are is the caller's to check (:func:`find_region` asks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kprobevm.errors import ProbeRefused
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.insn import Insn, InsnKind

__all__ = ["JMP32_SIZE", "OptRegion", "find_region"]

JMP32_SIZE = 5
"""``e9 rel32``: the bytes an optimized probe replaces at least."""

_INDIRECT_JUMPS = frozenset({InsnKind.JMP_INDIRECT_REG, InsnKind.JMP_INDIRECT_MEM})


@dataclass(frozen=True)
class OptRegion:
    """The instructions a probe's ``jmp`` covers, from the probe's address on."""

    insns: tuple[Insn, ...]

    @property
    def addr(self) -> int:
        return self.insns[0].addr

    @property
    def end(self) -> int:
        """Where the slot's copies jump back to."""
        return self.insns[-1].next_addr

    @property
    def original(self) -> bytes:
        """The covered bytes as the kernel has them."""
        return b"".join(i.bytes for i in self.insns)


def find_region(
    func: bytes,
    func_start: int,
    addr: int,
    *,
    reserved: Callable[[int, int], str | None],
    fixup: Callable[[int], str | None],
) -> OptRegion | str:
    """The region a ``jmp`` at ``addr`` would cover in the function ``func`` (its bytes
    as the kernel has them, placed at ``func_start``), or why it may not be optimized.

    ``reserved(start, end)`` names what else owns a byte of ``[start, end)`` (text the
    kernel patches, another probe); ``fixup(addr)`` names an exception-table entry of
    the instruction at ``addr``.
    """
    offset = addr - func_start
    if not 0 <= offset < len(func):
        return f"{addr:#x} is outside its function"
    if len(func) - offset < JMP32_SIZE:
        return f"fewer than {JMP32_SIZE} bytes to the end of the function"
    try:
        starts = x86insn.boundaries(func, func_start)
    except ProbeRefused as exc:
        return f"the function does not decode: {exc}"
    insns: list[Insn] = []  # the branches, and the instructions the jump may cover
    for start in starts:
        at = start - func_start
        window = func[at : at + x86insn.MAX_INSN_SIZE]
        if not addr <= start < addr + JMP32_SIZE and not _may_branch(window):
            continue  # a full decode costs about 60 us: only where it can matter
        try:
            insns.append(x86insn.decode(window, start))
        except ProbeRefused as exc:
            return f"the function does not decode: {exc}"
    covered: list[Insn] = []
    for insn in insns:
        if insn.addr < addr:
            continue
        if sum(i.length for i in covered) >= JMP32_SIZE:
            break
        if insn.kind is not InsnKind.PLAIN:
            text = f"{insn.mnemonic} {insn.op_str}".strip()
            return f"`{text}` at {insn.addr:#x} is not a plain instruction ({insn.kind.value})"
        covered.append(insn)
    if not covered or covered[0].addr != addr:
        return f"{addr:#x} is not an instruction boundary"
    region = OptRegion(tuple(covered))
    if region.end - addr < JMP32_SIZE:
        return f"fewer than {JMP32_SIZE} bytes of instructions to the end of the function"
    why = reserved(addr, region.end)
    if why is not None:
        return why
    for insn in insns:
        if insn.kind in _INDIRECT_JUMPS:
            return f"an indirect jump at {insn.addr:#x} (a jump table may land inside)"
        if insn.target is not None and addr < insn.target < region.end:
            return f"the branch at {insn.addr:#x} lands inside the jump, at {insn.target:#x}"
    for start in starts:
        entry = fixup(start)
        if entry is not None:
            return f"{entry}: its fixup may jump back into the function"
    return region


def _may_branch(code: bytes) -> bool:
    """Whether the instruction at the top of ``code`` can be a branch, by its opcode:
    the relative branches and loops, returns, and group 5 (indirect call and jump)."""
    _, op = x86insn._prefix_end(code)
    if op >= len(code):
        return True  # let the decoder say what it is
    b0 = code[op]
    if b0 == 0x0F:
        return op + 1 >= len(code) or 0x80 <= code[op + 1] <= 0x8F
    return b0 in _BRANCH_OPCODES or 0x70 <= b0 <= 0x7F


_BRANCH_OPCODES = frozenset({0xE0, 0xE1, 0xE2, 0xE3, 0xE8, 0xE9, 0xEA, 0xEB, 0xC2, 0xC3, 0xFF})
