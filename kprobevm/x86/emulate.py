"""Branch emulation on the host: the state after a jmp/jcc/call/ret/loop, from registers.

Used when a probe on a branch has a post_handler: the host computes what the branch
does (the kernel's ``kprobe_emulate_*`` ops), runs the post_handler on that state and
writes it back, so the slot's copy never runs. Register names are gdb's (``rax``,
``rsp``, ``rip``, ``eflags``, ``fs_base``, ``gs_base``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kprobevm.errors import KprobeError
from kprobevm.x86.constants import MASK64
from kprobevm.x86.insn import Insn, InsnKind, MemOperand

__all__ = [
    "CF",
    "OF",
    "PF",
    "SF",
    "ZF",
    "Emulation",
    "MemoryWrite",
    "condition_holds",
    "effective_address",
    "emulate",
]

CF = 1 << 0
PF = 1 << 2
ZF = 1 << 6
SF = 1 << 7
OF = 1 << 11


@dataclass(frozen=True)
class MemoryWrite:
    """``data`` to write at guest virtual ``addr``."""

    addr: int
    data: bytes


@dataclass(frozen=True)
class Emulation:
    """The state an emulated branch leaves: new rip, rsp (and rcx), and memory writes."""

    rip: int
    rsp: int
    writes: tuple[MemoryWrite, ...] = ()
    #: The new rcx for loop/loope/loopne, else None (unchanged).
    rcx: int | None = None

    @property
    def write(self) -> tuple[int, bytes] | None:
        """The one memory write of a call, as ``(address, data)``; None for other branches."""
        if not self.writes:
            return None
        return self.writes[0].addr, self.writes[0].data

    def registers(self) -> dict[str, int]:
        """The registers to write back, by gdb name."""
        regs = {"rip": self.rip, "rsp": self.rsp}
        if self.rcx is not None:
            regs["rcx"] = self.rcx
        return regs


def condition_holds(cc: int, eflags: int) -> bool:
    """Whether condition code ``cc`` (the low nibble of ``7x``/``0f 8x``) holds.

    Conditions come in pairs: an odd code is the negation of the even one before it.
    """
    cf, pf, zf = bool(eflags & CF), bool(eflags & PF), bool(eflags & ZF)
    sf, of = bool(eflags & SF), bool(eflags & OF)
    base = cc >> 1
    if base == 0:
        holds = of  # o
    elif base == 1:
        holds = cf  # b / c / nae
    elif base == 2:
        holds = zf  # e / z
    elif base == 3:
        holds = cf or zf  # be / na
    elif base == 4:
        holds = sf  # s
    elif base == 5:
        holds = pf  # p / pe
    elif base == 6:
        holds = sf != of  # l / nge
    elif base == 7:
        holds = zf or sf != of  # le / ng
    else:
        raise KprobeError(f"condition code {cc} is not 0..15")
    return holds != bool(cc & 1)


def _reg(regs: Mapping[str, int], name: str) -> int:
    """A 64-bit register's value; 32-bit names (``eax``) read its low half."""
    if name in regs:
        return regs[name] & MASK64
    if name.startswith("e") and "r" + name[1:] in regs:
        return regs["r" + name[1:]] & 0xFFFFFFFF
    if name.startswith("r") and name.endswith("d") and name[:-1] in regs:
        return regs[name[:-1]] & 0xFFFFFFFF
    raise KprobeError(f"register {name!r} missing from the register set")


def effective_address(
    mem: MemOperand, regs: Mapping[str, int], next_addr: int, *, address_size32: bool = False
) -> int:
    """The linear address of ``mem`` (segment base included for %fs/%gs)."""
    addr = mem.disp
    if mem.base in ("rip", "eip"):
        addr += next_addr
    elif mem.base is not None:
        addr += _reg(regs, mem.base)
    if mem.index is not None:
        addr += _reg(regs, mem.index) * mem.scale
    if address_size32:
        addr &= 0xFFFFFFFF  # 32-bit addressing (67 prefix) wraps at 4 GiB
    if mem.segment in ("fs", "gs"):
        addr += _reg(regs, f"{mem.segment}_base")
    return addr & MASK64


def emulate(insn: Insn, regs: Mapping[str, int], read_u64: Callable[[int], int]) -> Emulation:
    """What ``insn`` does from the state ``regs``; ``read_u64`` reads guest memory.

    Handles every branch kind of :class:`InsnKind`; raises :class:`KprobeError` for
    PLAIN and REFUSED instructions (those run from the slot or not at all).
    """
    rsp = _reg(regs, "rsp")
    nxt = insn.next_addr
    kind = insn.kind

    def push(value: int) -> Emulation:
        new_rsp = (rsp - 8) & MASK64
        return Emulation(rip=0, rsp=new_rsp, writes=(MemoryWrite(new_rsp, _u64(value)),))

    if kind is InsnKind.JMP_REL:
        assert insn.target is not None
        return Emulation(rip=insn.target, rsp=rsp)
    if kind is InsnKind.JCC_REL:
        assert insn.target is not None and insn.cc is not None
        taken = condition_holds(insn.cc, _reg(regs, "eflags"))
        return Emulation(rip=insn.target if taken else nxt, rsp=rsp)
    if kind is InsnKind.CALL_REL:
        assert insn.target is not None
        pushed = push(nxt)
        return Emulation(rip=insn.target, rsp=pushed.rsp, writes=pushed.writes)
    if kind in (InsnKind.CALL_INDIRECT_REG, InsnKind.CALL_INDIRECT_MEM):
        target = _indirect_target(insn, regs, read_u64)  # read before the push, as the CPU
        pushed = push(nxt)
        return Emulation(rip=target, rsp=pushed.rsp, writes=pushed.writes)
    if kind in (InsnKind.JMP_INDIRECT_REG, InsnKind.JMP_INDIRECT_MEM):
        return Emulation(rip=_indirect_target(insn, regs, read_u64), rsp=rsp)
    if kind is InsnKind.RET:
        return Emulation(rip=read_u64(rsp) & MASK64, rsp=(rsp + 8) & MASK64)
    if kind is InsnKind.RET_IMM:
        (imm16,) = struct.unpack_from("<H", insn.bytes, insn.opcode_offset + 1)
        return Emulation(rip=read_u64(rsp) & MASK64, rsp=(rsp + 8 + imm16) & MASK64)
    if kind is InsnKind.LOOP:
        assert insn.target is not None
        rcx = (_reg(regs, "rcx") - 1) & MASK64
        zf = bool(_reg(regs, "eflags") & ZF)
        taken = rcx != 0
        if insn.opcode == 0xE1:  # loope
            taken = taken and zf
        elif insn.opcode == 0xE0:  # loopne
            taken = taken and not zf
        return Emulation(rip=insn.target if taken else nxt, rsp=rsp, rcx=rcx)
    if kind is InsnKind.JCXZ:
        assert insn.target is not None
        count = _reg(regs, "rcx")
        if insn.address_size32:
            count &= 0xFFFFFFFF  # jecxz
        return Emulation(rip=insn.target if count == 0 else nxt, rsp=rsp)
    raise KprobeError(
        f"`{insn.mnemonic} {insn.op_str}` ({kind.value}) is not a branch to emulate",
        address=insn.addr,
    )


def _indirect_target(insn: Insn, regs: Mapping[str, int], read_u64: Callable[[int], int]) -> int:
    if insn.reg is not None:
        return _reg(regs, insn.reg)
    assert insn.mem is not None
    ea = effective_address(insn.mem, regs, insn.next_addr, address_size32=insn.address_size32)
    return read_u64(ea) & MASK64


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value & MASK64)
