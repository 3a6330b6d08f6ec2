"""The kernel's ORC unwinder, run on the host over a hit's registers and stack memory.

After ``arch/x86/kernel/unwind_orc.c`` and ``stacktrace.c``: :func:`unwind` does what
``stack_trace_save_regs()`` does in a kprobe handler (``arch_stack_walk`` with regs): the
interrupted address first, then one return address per frame, found with the ORC entry
of each address (:mod:`kprobevm.kernel.orc`). A ``pt_regs`` or iret frame on the stack
(the entry code, an interrupt, an exception) is how the walk crosses from the IRQ or
exception stack to the stack below, and a frame whose ``cs`` is a user selector ends
it, as in the kernel. The int3 that brought the hit is not part of it: the walk starts
from the registers as they were at the probe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from kprobevm.kernel.orc import (
    FP_ORC_ENTRY,
    ORC_REG_BP,
    ORC_REG_BP_INDIRECT,
    ORC_REG_DI,
    ORC_REG_DX,
    ORC_REG_PREV_SP,
    ORC_REG_R10,
    ORC_REG_R13,
    ORC_REG_SP,
    ORC_REG_SP_INDIRECT,
    ORC_REG_UNDEFINED,
    OrcEntry,
    OrcFormat,
    OrcType,
)
from kprobevm.x86.constants import MASK64

__all__ = [
    "MAX_STACK_ENTRIES",
    "PT_REGS",
    "KernelStack",
    "OrcLookup",
    "StackReader",
    "unwind",
]

MAX_STACK_ENTRIES = 128
"""A walk stops here (bad data could loop; the kernel's own trace keeps fewer)."""

#: Byte offsets in ``struct pt_regs`` (x86-64) of the words the unwinder reads.
PT_REGS = {
    "r15": 0, "r14": 8, "r13": 16, "r12": 24, "bp": 32, "bx": 40, "r11": 48, "r10": 56,
    "r9": 64, "r8": 72, "ax": 80, "cx": 88, "dx": 96, "si": 104, "di": 112,
    "orig_ax": 120, "ip": 128, "cs": 136, "flags": 144, "sp": 152, "ss": 160,
}  # fmt: skip
_IRET_FRAME_OFFSET = PT_REGS["ip"]
_SP_BASES = {ORC_REG_R10: "r10", ORC_REG_R13: "r13", ORC_REG_DI: "di", ORC_REG_DX: "dx"}
_STACK_BLOCK = 1 << 12  # the wrong-direction check compares sp within one page


class OrcLookup(Protocol):
    """Where the walk finds the ORC entry of an address (``orc_find``), and its layout."""

    @property
    def format(self) -> OrcFormat: ...

    def find(self, ip: int) -> OrcEntry | None: ...


StackReader = Callable[[int], int | None]
"""A u64 of guest stack memory at an address, None when it cannot be read (a fault, or
outside the recorded slice of a recorded hit)."""


@dataclass(frozen=True)
class KernelStack:
    """A kernel stack trace: the addresses, innermost first, and how the walk ended."""

    entries: tuple[int, ...]
    error: str | None = None
    """None when the walk reached the end of the stack (user mode, or a kernel thread's
    first frame); else why it stopped early (the kernel stops there too, silently)."""

    def lines(self, describe: Callable[[int], str]) -> list[str]:
        """The entries as ftrace prints them with ``options/sym-offset``: `` => sym+0x6a/0xa0``."""
        return [f" => {describe(addr)}" for addr in self.entries]


@dataclass
class _State:
    """``struct unwind_state``: where the walk is, and the registers frame it last saw."""

    ip: int
    sp: int
    bp: int
    regs: Mapping[str, int] | int | None
    """The hit's registers (a mapping), a ``pt_regs`` on the stack (its address), or none."""
    full_regs: bool
    prev_regs: Mapping[str, int] | int | None = None
    signal: bool = True
    error: str | None = None
    done: bool = False


def unwind(
    regs: Mapping[str, int],
    table: OrcLookup,
    read: StackReader,
    is_text: Callable[[int], bool],
    *,
    ip: int | None = None,
    limit: int = MAX_STACK_ENTRIES,
) -> KernelStack:
    """The stack at a hit whose registers (pt_regs names) are ``regs``.

    ``ip`` is the first entry's address when it differs from ``regs["ip"]`` (a kprobe
    handler sees ``regs->ip`` one past the probe); ``is_text`` is the kernel's
    ``__kernel_text_address``: the walk ends at the first return address it refuses.
    """
    first = regs["ip"] if ip is None else ip
    entries = [first]
    if regs.get("cs", 0) & 3:
        return KernelStack(tuple(entries))
    state = _State(ip=first, sp=regs["sp"], bp=regs["bp"], regs=regs, full_regs=True)
    _next_frame(state, table, read)  # skip the regs frame itself, as __unwind_start does
    while not state.done and len(entries) < limit:
        if not is_text(state.ip):
            break
        entries.append(state.ip)
        _next_frame(state, table, read)
    if len(entries) >= limit and not state.done:
        state.error = f"more than {limit} frames"
    return KernelStack(tuple(entries), state.error)


def _get_reg(state: _State, name: str, read: StackReader) -> int | None:
    """A register of the last ``pt_regs`` seen (``get_reg``): a full frame's, or the full
    one before an iret frame."""
    source = state.regs if state.full_regs else state.prev_regs
    return None if source is None else _regs_word(source, name, read)


def _fail(state: _State, why: str) -> None:
    state.error = why
    state.done = True


def _next_frame(state: _State, table: OrcLookup, read: StackReader) -> None:
    """``unwind_next_frame``: move ``state`` to the caller's frame, or end the walk."""
    if state.regs is not None:
        cs = _regs_word(state.regs, "cs", read)
        if cs is not None and cs & 3:
            state.done = True  # back in user mode: the stack's end
            return
    orig_ip, prev_sp = state.ip, state.sp
    # a return address is looked up at the call (ip - 1): the call may be the last
    # instruction of a noreturn caller
    lookup = state.ip if state.signal else (state.ip - 1) & MASK64
    orc = table.find(lookup)
    if orc is None:
        orc = FP_ORC_ENTRY
        state.error = f"no ORC entry for {lookup:#x} (a module or generated code)"
    elif orc.type == OrcType.UNDEFINED:
        return _fail(state, f"undefined ORC entry at {lookup:#x}")
    elif orc.type == OrcType.END_OF_STACK:
        state.done = True
        return None
    sp = _cfa(state, orc, table.format, read)
    if sp is None:
        return _fail(state, f"cannot find the frame of {orig_ip:#x} (ORC base {orc.sp_reg})")
    if orc.type == OrcType.CALL:
        ret = read((sp - 8) & MASK64)
        if ret is None:
            return _fail(state, f"cannot read the return address at {sp - 8:#x}")
        state.ip, state.sp, state.regs, state.prev_regs = ret, sp, None, None
    elif orc.type == OrcType.REGS:
        ip, new_sp = read(sp + PT_REGS["ip"]), read(sp + PT_REGS["sp"])
        if ip is None or new_sp is None:
            return _fail(state, f"cannot read pt_regs at {sp:#x}")
        state.ip, state.sp, state.regs, state.prev_regs = ip, new_sp, sp, None
        state.full_regs = True
    elif orc.type == OrcType.REGS_PARTIAL:
        ip, new_sp = read(sp), read(sp + PT_REGS["sp"] - _IRET_FRAME_OFFSET)
        if ip is None or new_sp is None:
            return _fail(state, f"cannot read the iret frame at {sp:#x}")
        if state.full_regs:
            state.prev_regs = state.regs
        state.ip, state.sp, state.regs = ip, new_sp, sp - _IRET_FRAME_OFFSET
        state.full_regs = False
    else:
        return _fail(state, f"ORC entry of {orig_ip:#x} has an {orc.type}")
    state.signal = orc.signal
    if not _find_bp(state, orc, sp, read):
        return _fail(state, f"cannot find the frame pointer of {orig_ip:#x}")
    if (state.sp ^ prev_sp) < _STACK_BLOCK and state.sp <= prev_sp:
        return _fail(state, f"stack going in the wrong direction at {orig_ip:#x}")
    return None


def _regs_word(regs: Mapping[str, int] | int, name: str, read: StackReader) -> int | None:
    """A word of a registers frame: the hit's own, or a ``pt_regs`` on the stack."""
    if isinstance(regs, int):
        return read((regs + PT_REGS[name]) & MASK64)
    return regs.get(name)


def _cfa(state: _State, orc: OrcEntry, table_format: OrcFormat, read: StackReader) -> int | None:
    """The caller's stack pointer before the call: the entry's base plus its offset."""
    reg = orc.sp_reg
    if reg in (ORC_REG_SP, ORC_REG_SP_INDIRECT):
        base = state.sp
    elif reg in (ORC_REG_BP, ORC_REG_BP_INDIRECT):
        base = state.bp
    elif reg in _SP_BASES:
        got = _get_reg(state, _SP_BASES[reg], read)
        if got is None:
            return None
        return got
    else:
        return None
    if reg == ORC_REG_SP_INDIRECT and table_format.indirect_offset_after:
        # the stack switch saved the old sp at the new stack's top: [sp] + offset
        at = read(base)
        return None if at is None else (at + orc.sp_offset) & MASK64
    sp = (base + orc.sp_offset) & MASK64
    if reg in (ORC_REG_BP_INDIRECT, ORC_REG_SP_INDIRECT):
        return read(sp)
    return sp


def _find_bp(state: _State, orc: OrcEntry, sp: int, read: StackReader) -> bool:
    if orc.bp_reg == ORC_REG_UNDEFINED:
        got = _get_reg(state, "bp", read) if state.regs is not None else None
        if got is not None:
            state.bp = got
        return True
    if orc.bp_reg == ORC_REG_PREV_SP:
        got = read((sp + orc.bp_offset) & MASK64)
    elif orc.bp_reg == ORC_REG_BP:
        got = read((state.bp + orc.bp_offset) & MASK64)
    else:
        return False
    if got is None:
        return False
    state.bp = got
    return True
