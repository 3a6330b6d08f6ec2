"""Decode and classify one x86-64 instruction for probing (capstone 5, 64-bit mode).

The classification answers the question the kernel's ``arch_prepare_kprobe`` asks: can
this instruction run out of line from an instruction slot, and how? ``PLAIN`` means a
copy (RIP-relative displacement rewritten) followed by a jump back is exact; the branch
kinds get an equivalent sequence (:mod:`kprobevm.x86.ooline`) or host emulation
(:mod:`kprobevm.x86.emulate`); ``REFUSED`` carries the reason. :func:`boundaries` is the
linear sweep that ``can_probe`` does from a function's start.
"""

from __future__ import annotations

import builtins
import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import capstone
from capstone import x86 as csx86

from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.x86.constants import MASK64

__all__ = [
    "FTRACE_NOP5",
    "MAX_INSN_SIZE",
    "Insn",
    "InsnKind",
    "MemOperand",
    "boundaries",
    "check_boundary",
    "decode",
]

MAX_INSN_SIZE = 15
#: The 5-byte NOP that ftrace leaves at a function's entry (``nopl 0x0(%rax,%rax,1)``).
FTRACE_NOP5 = bytes.fromhex("0f1f440000")
ENDBR64 = bytes.fromhex("f30f1efa")

_LEGACY_PREFIXES = frozenset((0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67))


class InsnKind(enum.Enum):
    """How an instruction runs out of line (names follow the kernel's emulate ops)."""

    PLAIN = "plain"  # copy (+ rip fix-up) and jump back
    JMP_REL = "jmp_rel"
    JCC_REL = "jcc_rel"
    CALL_REL = "call_rel"
    RET = "ret"
    RET_IMM = "ret_imm"
    JMP_INDIRECT_REG = "jmp_indirect_reg"
    CALL_INDIRECT_REG = "call_indirect_reg"
    JMP_INDIRECT_MEM = "jmp_indirect_mem"
    CALL_INDIRECT_MEM = "call_indirect_mem"
    LOOP = "loop"  # loop, loope, loopne: decrement rcx, maybe branch
    JCXZ = "jcxz"  # jrcxz / jecxz: branch if the count register is zero
    REFUSED = "refused"


#: Kinds whose next RIP is not simply the following instruction.
BRANCH_KINDS = frozenset(InsnKind) - {InsnKind.PLAIN, InsnKind.REFUSED}


@dataclass(frozen=True)
class MemOperand:
    """A memory operand as x86 computes it: ``segment:disp(base, index, scale)``.

    Register names are capstone's (``rax``, ``r11``, ``rip``); ``None`` when absent.
    """

    segment: str | None
    base: str | None
    index: str | None
    scale: int
    disp: int


@dataclass(frozen=True)
class Insn:
    """One decoded instruction at ``addr`` and what probing it takes."""

    addr: int
    length: int
    bytes: builtins.bytes
    mnemonic: str
    op_str: str
    kind: InsnKind
    #: Why the instruction may not be probed (``kind`` is REFUSED), else None.
    refusal: str | None = None
    #: Absolute branch target of the relative branch kinds.
    target: int | None = None
    #: Condition code (0..15, the low nibble of ``7x``/``0f 8x``) of JCC_REL.
    cc: int | None = None
    #: Register of the *_INDIRECT_REG kinds (capstone's name, e.g. ``rax``).
    reg: str | None = None
    #: Memory operand of the *_INDIRECT_MEM kinds.
    mem: MemOperand | None = None
    #: Byte offset of the disp32 of a RIP-relative operand inside ``bytes``, else None.
    rip_disp_offset: int | None = None
    #: Offset of the first opcode byte (after legacy prefixes and REX).
    opcode_offset: int = 0
    #: Legacy prefix bytes, in order.
    prefixes: tuple[int, ...] = ()
    #: Offset of the ModRM byte, or None.
    modrm_offset: int | None = None

    @property
    def next_addr(self) -> int:
        """The address of the following instruction (what a call pushes)."""
        return self.addr + self.length

    @property
    def opcode(self) -> int:
        """The first opcode byte (``0x0f`` for two-byte opcodes)."""
        return self.bytes[self.opcode_offset]

    @property
    def is_branch(self) -> bool:
        """True for the kinds that change RIP other than by falling through."""
        return self.kind in BRANCH_KINDS

    @property
    def is_refused(self) -> bool:
        """True when the instruction may not be probed."""
        return self.kind is InsnKind.REFUSED

    @property
    def address_size32(self) -> bool:
        """True with an address-size (``67``) prefix: loop/jcxz then count with ``ecx``."""
        return 0x67 in self.prefixes

    @property
    def rip_disp(self) -> int | None:
        """The signed disp32 of the RIP-relative operand, if any."""
        if self.rip_disp_offset is None:
            return None
        off = self.rip_disp_offset
        return int(struct.unpack_from("<i", self.bytes, off)[0])

    @property
    def rip_target(self) -> int | None:
        """The absolute address the RIP-relative operand refers to, if any."""
        disp = self.rip_disp
        if disp is None:
            return None
        return (self.next_addr + disp) & MASK64

    @property
    def is_ftrace_nop(self) -> bool:
        """The 5-byte NOP ftrace patches at function entry (the kernel's ftrace location)."""
        return self.bytes == FTRACE_NOP5

    @property
    def is_endbr(self) -> bool:
        """``endbr64``: with IBT the kernel moves a function-entry probe past it."""
        return self.bytes == ENDBR64

    def check_probeable(self, symbol: str | None = None) -> None:
        """Raise :class:`ProbeRefused` (``EOPNOTSUPP``) if the instruction is REFUSED."""
        if self.kind is InsnKind.REFUSED:
            raise ProbeRefused(
                "EOPNOTSUPP",
                f"cannot probe `{f'{self.mnemonic} {self.op_str}'.strip()}`: {self.refusal}",
                address=self.addr,
                symbol=symbol,
            )

    def __str__(self) -> str:
        text = f"{self.addr:#x}: {self.bytes.hex(' ')}  {self.mnemonic} {self.op_str}".rstrip()
        return f"{text}  [{self.kind.value}]"


@lru_cache(maxsize=2)
def _cs(detail: bool) -> capstone.Cs:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = detail
    return md


def _regname(md: capstone.Cs, reg: int) -> str | None:
    if reg == csx86.X86_REG_INVALID:
        return None
    return str(md.reg_name(reg))


def _prefix_end(code: builtins.bytes) -> tuple[tuple[int, ...], int]:
    """Legacy prefixes and the offset of the opcode (REX, which must come last, skipped)."""
    i = 0
    prefixes: list[int] = []
    while i < len(code) and code[i] in _LEGACY_PREFIXES:
        prefixes.append(code[i])
        i += 1
    if i < len(code) and 0x40 <= code[i] <= 0x4F:
        i += 1
    return tuple(prefixes), i


def _modrm_length(code: builtins.bytes, pos: int) -> int:
    """Bytes taken by a ModRM byte at ``pos`` with its SIB and displacement (64-bit mode)."""
    if pos >= len(code):
        raise IndexError(pos)
    modrm = code[pos]
    mod, rm = modrm >> 6, modrm & 7
    length = 1
    if mod == 3:
        return length
    if rm == 4:  # a SIB byte follows
        if pos + 1 >= len(code):
            raise IndexError(pos + 1)
        length += 1
        if mod == 0 and code[pos + 1] & 7 == 5:  # no base: disp32
            return length + 4
    if mod == 1:
        return length + 1
    if mod == 2 or (mod == 0 and rm == 5):  # disp32, or disp32(%rip)
        return length + 4
    return length


def _grp7_register_form_length(code: builtins.bytes, op: int) -> int | None:
    """Length of a ``0f 01 /r`` register form capstone 5 does not know, else None.

    Group 7 register forms (mod == 3) are three opcode bytes with no operand bytes;
    capstone 5 lacks some that the kernel uses (``0f 01 e8`` serialize, ``0f 01 fe``
    invlpgb, ``0f 01 ff`` tlbsync). Position-independent, so they run from a slot.
    """
    if code[op : op + 2] == b"\x0f\x01" and len(code) > op + 2 and code[op + 2] >> 6 == 3:
        return op + 3
    return None


def _undecodable(code: builtins.bytes, addr: int) -> ProbeRefused:
    return ProbeRefused(
        "EILSEQ",
        f"undecodable instruction bytes {code[:MAX_INSN_SIZE].hex(' ')}",
        address=addr,
    )


def _insn_length_fixup(code: builtins.bytes, op: int, mnemonic: str, length: int) -> int:
    """Correct capstone 5's length where it disagrees with the SDM and the kernel.

    Capstone decodes ``ud1`` (``0f b9 /r``) without its ModRM byte; the kernel's
    decoder (Grp10) and the SDM give it one, and a sweep that missed it would lose sync.
    """
    if mnemonic == "ud1" and code[op : op + 2] == b"\x0f\xb9":
        return op + 2 + _modrm_length(code, op + 2)
    return length


def decode(code: builtins.bytes, addr: int) -> Insn:
    """Decode the first instruction of ``code`` (at ``addr``) and classify it.

    Raises :class:`ProbeRefused` (``EILSEQ``) when the bytes do not decode.
    """
    md = _cs(True)
    prefixes, op = _prefix_end(code)
    try:
        cs_insn = next(md.disasm(code[:MAX_INSN_SIZE], addr, 1))
    except StopIteration:
        length = _grp7_register_form_length(code, op)
        if length is None:
            raise _undecodable(code, addr) from None
        return Insn(
            addr=addr,
            length=length,
            bytes=builtins.bytes(code[:length]),
            mnemonic=f"(0f 01 {code[op + 2]:02x})",
            op_str="",
            kind=InsnKind.PLAIN,
            opcode_offset=op,
            prefixes=prefixes,
            modrm_offset=op + 2,
        )
    try:
        length = _insn_length_fixup(code, op, cs_insn.mnemonic, cs_insn.size)
    except IndexError:
        raise _undecodable(code, addr) from None
    if length > len(code) or length > MAX_INSN_SIZE:
        raise _undecodable(code, addr)
    raw = builtins.bytes(code[:length])
    modrm_offset = cs_insn.modrm_offset or None
    fields: dict[str, object] = {
        "addr": addr,
        "length": length,
        "bytes": raw,
        "mnemonic": cs_insn.mnemonic,
        "op_str": cs_insn.op_str,
        "opcode_offset": op,
        "prefixes": prefixes,
        "modrm_offset": modrm_offset,
    }
    fields["rip_disp_offset"] = _rip_disp_offset(md, cs_insn, raw, addr)
    fields.update(_classify(md, cs_insn, raw, op, prefixes))
    return Insn(**fields)  # type: ignore[arg-type]


def _rip_disp_offset(
    md: capstone.Cs, cs_insn: capstone.CsInsn, raw: builtins.bytes, addr: int
) -> int | None:
    """The offset of the disp32 of a ``disp(%rip)`` operand, checked against the bytes.

    Capstone 5 gives ``disp_offset`` (right) and ``disp_size`` (wrong for VEX: it says
    2 for a disp32): a RIP-relative displacement is always 32 bits, so only the offset
    is taken, and it must reproduce capstone's decoded displacement.
    """
    rip_mem = [
        o
        for o in cs_insn.operands
        if o.type == csx86.X86_OP_MEM and o.mem.base == csx86.X86_REG_RIP
    ]
    if not rip_mem:
        return None
    off = int(cs_insn.disp_offset)
    disp = int(rip_mem[0].mem.disp)
    if not 0 < off <= len(raw) - 4 or struct.unpack_from("<i", raw, off)[0] != disp:
        raise KprobeError(
            f"capstone's displacement offset {off} does not match disp {disp:#x} in {raw.hex(' ')}",
            address=addr,
        )
    return off


_REFUSED_OPCODES_1: dict[int, str] = {
    0xCC: "int3 already there (another debugger's breakpoint, or text being patched)",
    0xCD: "software interrupt (int n) changes the flow through the IDT",
    0xF1: "int1 (icebp) raises #DB",
    0xCF: "iret changes privilege state; in-kernel iret is not supported",
    0xCA: "far return (lret) loads CS",
    0xCB: "far return (lret) loads CS",
    0xF4: (
        "hlt: it follows sti in the idle path, and the sti interrupt shadow that keeps"
        " `sti; hlt` atomic is lost across the trap (a missed wakeup)"
    ),
    0x17: "pop %ss masks exceptions on the next instruction",
}

_REFUSED_OPCODES_0F: dict[int, str] = {
    0x05: "syscall saves RIP in rcx (the slot address would leak)",
    0x07: "sysret returns to user mode",
    0x34: "sysenter changes privilege state",
    0x35: "sysexit returns to user mode",
    0x0B: "ud2: a BUG()/WARN() site, decoded by the kernel's trap handler at its address",
    0xB9: "ud1: a trap site (UBSAN/WARN) decoded by the kernel at its address",
    0xFF: "ud0: a trap site decoded by the kernel at its address",
}


def _classify(
    md: capstone.Cs,
    cs_insn: capstone.CsInsn,
    raw: builtins.bytes,
    op: int,
    prefixes: tuple[int, ...],
) -> dict[str, object]:
    """The kind and its facts (target, cc, reg, mem) from the opcode bytes.

    Decided on opcode bytes, not mnemonics: ``ff /3`` and ``ff /5`` (far) print as
    ``jmp``/``call`` in capstone too.
    """
    if raw[op] in (0xC4, 0xC5, 0x62):  # VEX / EVEX in 64-bit mode: never a branch
        return {"kind": InsnKind.PLAIN}
    reason = _refusal(raw, op, prefixes)
    if reason is not None:
        return {"kind": InsnKind.REFUSED, "refusal": reason}
    facts = _branch_facts(md, cs_insn, raw, op)
    if facts is not None:
        return facts
    if cs_insn.group(csx86.X86_GRP_BRANCH_RELATIVE):
        # Anything else RIP-relative in its control flow would be wrong from a slot.
        return {
            "kind": InsnKind.REFUSED,
            "refusal": f"relative branch `{cs_insn.mnemonic}` not understood",
        }
    # A rip-relative data operand is PLAIN too: the copy gets a new disp32.
    return {"kind": InsnKind.PLAIN}


def _refusal(raw: builtins.bytes, op: int, prefixes: tuple[int, ...]) -> str | None:
    """Why the instruction may not run from a slot, or None."""
    b0 = raw[op]
    b1 = raw[op + 1] if op + 1 < len(raw) else None
    if b0 in _REFUSED_OPCODES_1:
        return _REFUSED_OPCODES_1[b0]
    if b0 == 0x0F and b1 is not None and b1 in _REFUSED_OPCODES_0F:
        return _REFUSED_OPCODES_0F[b1]
    if b0 == 0x8E and (raw[op + 1] >> 3) & 7 == 2:
        return "mov to %ss masks exceptions on the next instruction"
    if b0 == 0xC7 and b1 == 0xF8:
        return "xbegin has a RIP-relative abort target"
    group5 = (raw[op + 1] >> 3) & 7 if b0 == 0xFF else None  # ff /digit
    is_near_branch = (
        b0 in (0xE8, 0xE9, 0xEB, 0xC2, 0xC3)
        or group5 in (2, 4)
        or 0x70 <= b0 <= 0x7F
        or (b0 == 0x0F and b1 is not None and 0x80 <= b1 <= 0x8F)
    )
    if 0x66 in prefixes and is_near_branch:
        return "operand-size prefix on a near branch (16-bit target)"
    if b0 in (0xE0, 0xE1, 0xE2) and 0x67 in prefixes:
        return "loop with an address-size prefix (counts in ecx)"
    if group5 in (3, 5):
        return "far indirect call/jmp loads CS"
    return None


#: One-byte opcodes of the relative branches other than jcc.
_RELATIVE_BRANCHES = {
    0xE9: InsnKind.JMP_REL, 0xEB: InsnKind.JMP_REL, 0xE8: InsnKind.CALL_REL,
    0xE0: InsnKind.LOOP, 0xE1: InsnKind.LOOP, 0xE2: InsnKind.LOOP, 0xE3: InsnKind.JCXZ,
}  # fmt: skip


def _imm_target(cs_insn: capstone.CsInsn) -> int:
    """A relative branch's absolute target, as capstone computed it."""
    return int(cs_insn.operands[0].imm) & MASK64


def _branch_facts(
    md: capstone.Cs, cs_insn: capstone.CsInsn, raw: builtins.bytes, op: int
) -> dict[str, object] | None:
    """The kind and facts of a near branch or return, or None for anything else."""
    b0 = raw[op]
    b1 = raw[op + 1] if op + 1 < len(raw) else None
    if b0 in _RELATIVE_BRANCHES:
        return {"kind": _RELATIVE_BRANCHES[b0], "target": _imm_target(cs_insn)}
    if 0x70 <= b0 <= 0x7F:
        return {"kind": InsnKind.JCC_REL, "target": _imm_target(cs_insn), "cc": b0 & 0xF}
    if b0 == 0x0F and b1 is not None and 0x80 <= b1 <= 0x8F:
        return {"kind": InsnKind.JCC_REL, "target": _imm_target(cs_insn), "cc": b1 & 0xF}
    if b0 in (0xC3, 0xC2):
        return {"kind": InsnKind.RET if b0 == 0xC3 else InsnKind.RET_IMM}
    if b0 != 0xFF or (raw[op + 1] >> 3) & 7 not in (2, 4):
        return None
    is_call = (raw[op + 1] >> 3) & 7 == 2
    operand = cs_insn.operands[0]
    if raw[op + 1] >> 6 == 3:  # mod 11: through a register
        kind = InsnKind.CALL_INDIRECT_REG if is_call else InsnKind.JMP_INDIRECT_REG
        return {"kind": kind, "reg": _regname(md, operand.reg)}
    kind = InsnKind.CALL_INDIRECT_MEM if is_call else InsnKind.JMP_INDIRECT_MEM
    mem = MemOperand(
        segment=_regname(md, operand.mem.segment),
        base=_regname(md, operand.mem.base),
        index=_regname(md, operand.mem.index),
        scale=int(operand.mem.scale),
        disp=int(operand.mem.disp),
    )
    return {"kind": kind, "mem": mem}


def _sweep(code: builtins.bytes, start: int) -> Iterator[tuple[int, int | None]]:
    """``(offset, length)`` of each instruction from the top of ``code``; length None at
    bytes that do not decode (the sweep ends there).

    One capstone call runs over as much of the buffer as it can (per-instruction calls
    cost 5x more); it is restarted only after bytes capstone cannot decode or mis-sizes.
    """
    md = _cs(False)
    pos = 0
    while pos < len(code):
        restart = False
        for addr, size, mnemonic, _ in md.disasm_lite(code[pos:], start + pos):
            off = addr - start
            if mnemonic == "ud1":
                window = code[off : off + MAX_INSN_SIZE]
                try:
                    fixed = _insn_length_fixup(window, _prefix_end(window)[1], mnemonic, size)
                except IndexError:
                    yield off, None
                    return
                if fixed != size:
                    yield off, fixed
                    pos, restart = off + fixed, True
                    break
            yield off, size
            pos = off + size
        if restart or pos >= len(code):
            continue
        window = code[pos : pos + MAX_INSN_SIZE]
        length = _grp7_register_form_length(window, _prefix_end(window)[1])
        yield pos, length
        if length is None:
            return
        pos += length


def boundaries(code: builtins.bytes, start: int) -> list[int]:
    """Instruction start addresses found by a linear sweep of ``code`` placed at ``start``.

    ``code`` is a whole function (its size from kallsyms), with any probe int3s already
    replaced by the original bytes. Raises :class:`ProbeRefused` (``EILSEQ``) with the
    offset of bytes that do not decode (an instruction cut off by the end included).
    """
    starts: list[int] = []
    for off, size in _sweep(code, start):
        if size is None or off + size > len(code):
            raise ProbeRefused(
                "EILSEQ",
                f"undecodable bytes at offset {off:#x}: {code[off : off + MAX_INSN_SIZE].hex(' ')}",
                address=start + off,
            )
        starts.append(start + off)
    return starts


def check_boundary(code: builtins.bytes, start: int, addr: int, symbol: str | None = None) -> None:
    """Refuse ``addr`` unless it starts an instruction, sweeping from ``start`` like ``can_probe``.

    Raises ``ProbeRefused("BAD_INSN_BNDRY")`` off a boundary, and ``ProbeRefused("EILSEQ")``
    when an ``int3`` lies before ``addr`` (someone else's breakpoint hides the bytes).
    """
    if not start <= addr < start + len(code):
        raise ProbeRefused(
            "BAD_INSN_BNDRY",
            f"address is outside the function [{start:#x}, {start + len(code):#x})",
            address=addr,
            symbol=symbol,
        )
    pos = prev = 0
    for off, size in _sweep(code[: addr - start + MAX_INSN_SIZE], start):
        if off >= addr - start:
            break
        if size is None:
            raise ProbeRefused(
                "EILSEQ",
                f"undecodable bytes at offset {off:#x}: {code[off : off + MAX_INSN_SIZE].hex(' ')}",
                address=start + off,
                symbol=symbol,
            )
        if code[off] == 0xCC:
            raise ProbeRefused(
                "EILSEQ",
                f"an int3 not ours at offset {off:#x} hides the original instruction",
                address=start + off,
                symbol=symbol,
            )
        prev, pos = off, off + size
    if start + pos != addr:
        raise ProbeRefused(
            "BAD_INSN_BNDRY",
            f"not an instruction boundary (offset {addr - start:#x} is inside the"
            f" instruction at offset {prev:#x})",
            address=addr,
            symbol=symbol,
        )
