"""Operands of kprobevm's x86-64 assembler: registers by name and memory operands.

:func:`encode_rm` turns a register or memory operand into the REX bits, ModRM, SIB and
displacement bytes of the instruction's r/m half; :func:`render_mem` writes it the way
GNU as reads it in ``.intel_syntax noprefix``, so that a listing assembles to the same
bytes. Every malformed operand raises :class:`~kprobevm.errors.KprobeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kprobevm.errors import KprobeError
from kprobevm.x86.constants import MASK64

__all__ = [
    "CONTROL",
    "REG64",
    "SEGMENTS",
    "Mem",
    "Reg",
    "RmBytes",
    "encode_rm",
    "fits_s8",
    "fits_s32",
    "hex_imm",
    "is_reg",
    "mem",
    "reg",
    "render_mem",
    "rip",
    "signed64",
]

_NUMBERED = tuple(f"r{n}" for n in range(8, 16))
_GPR64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *_NUMBERED)
_GPR32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", *(f"{r}d" for r in _NUMBERED))
_GPR16 = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di", *(f"{r}w" for r in _NUMBERED))
_GPR8 = ("al", "cl", "dl", "bl", "spl", "bpl", "sil", "dil", *(f"{r}b" for r in _NUMBERED))

#: Register numbers of the 64-bit general registers (REX.B/R/X extend bit 3).
REG64 = {name: num for num, name in enumerate(_GPR64)}
#: Segment registers by their number in a ModRM reg field (``mov r16, Sreg``).
SEGMENTS = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}
CONTROL = {"cr0": 0, "cr2": 2, "cr3": 3, "cr4": 4, "cr8": 8}
"""The control registers ``mov`` reaches (ring 0 only), by number."""
_SEGMENT_PREFIX = {"es": 0x26, "cs": 0x2E, "ss": 0x36, "ds": 0x3E, "fs": 0x64, "gs": 0x65}
_SIZE_NAMES = {1: "byte", 2: "word", 4: "dword", 8: "qword"}


def signed64(value: int) -> int:
    """``value`` as a signed 64-bit number (an address above 2**63 becomes negative)."""
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def fits_s8(value: int) -> bool:
    """True when ``value`` fits in a sign-extended 8-bit field."""
    return -128 <= value < 128


def fits_s32(value: int) -> bool:
    """True when ``value`` (a signed difference) fits in a sign-extended 32-bit field."""
    return -(1 << 31) <= value < (1 << 31)


@dataclass(frozen=True)
class Reg:
    """A general register: its number (0..15) and its width in bytes."""

    name: str
    num: int
    size: int

    @property
    def needs_rex(self) -> bool:
        """``spl``, ``bpl``, ``sil``, ``dil``: without a REX prefix these numbers mean ah..bh."""
        return self.size == 1 and 4 <= self.num <= 7


_REGS = {
    name: Reg(name, num, size)
    for size, names in ((8, _GPR64), (4, _GPR32), (2, _GPR16), (1, _GPR8))
    for num, name in enumerate(names)
}


def reg(name: str) -> Reg:
    """The general register called ``name`` (``rax``, ``r13d``, ``cl``, ...)."""
    try:
        return _REGS[name]
    except KeyError as exc:
        raise KprobeError(f"unknown register {name!r}") from exc


def is_reg(name: str) -> bool:
    """True when ``name`` names a general or segment register (so it is not a label)."""
    return name in _REGS or name in SEGMENTS or name in CONTROL or name == "rip"


@dataclass(frozen=True)
class Mem:
    """A memory operand ``seg:[base + index*scale + disp]``, or ``[rip + target]``.

    ``size`` (bytes) is needed only when no register operand gives the width;
    ``disp32`` keeps a 32-bit displacement even for a small one, so that the code's
    length does not depend on the value. ``target`` (an address, or a label of the
    same program) is what a ``rip`` operand reaches.
    """

    base: str | None = None
    disp: int = 0
    index: str | None = None
    scale: int = 1
    seg: str | None = None
    size: int | None = None
    disp32: bool = False
    target: int | str | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size not in _SIZE_NAMES:
            raise KprobeError(f"memory operand size {self.size} is not 1, 2, 4 or 8")
        if self.seg is not None and self.seg not in _SEGMENT_PREFIX:
            raise KprobeError(f"unknown segment register {self.seg!r}")
        if self.base == "rip":
            if self.target is None or self.index is not None or self.disp:
                raise KprobeError("a rip operand has a target and nothing else")
            return
        if self.target is not None:
            raise KprobeError("only a rip operand has a target")
        for name in (self.base, self.index):
            if name is not None and name not in REG64:
                raise KprobeError(f"address register {name!r} is not a 64-bit register")
        if self.index == "rsp":  # SIB index 100 means "no index"
            raise KprobeError("rsp cannot be an index register")
        if self.scale not in (1, 2, 4, 8):
            raise KprobeError(f"scale {self.scale} is not 1, 2, 4 or 8")
        if not fits_s32(self.disp):
            raise KprobeError(f"displacement {self.disp:#x} does not fit in 32 bits")


def mem(
    base: str | None = None,
    disp: int = 0,
    index: str | None = None,
    scale: int = 1,
    *,
    seg: str | None = None,
    size: int | None = None,
    disp32: bool = False,
) -> Mem:
    """``seg:[base + index*scale + disp]``; see :class:`Mem`."""
    return Mem(base, disp, index, scale, seg=seg, size=size, disp32=disp32)


def rip(target: int | str, *, size: int | None = None) -> Mem:
    """``[rip + disp32]`` reaching ``target``: an absolute address or a label."""
    return Mem("rip", target=target, size=size)


@dataclass(frozen=True)
class RmBytes:
    """The r/m half of an instruction: REX.X/B, ModRM without its reg field, SIB, disp."""

    rex: int
    modrm: int
    tail: bytes
    prefix: bytes
    target: int | str | None = None


def encode_rm(op: Reg | Mem) -> RmBytes:
    """Encode ``op`` as the r/m operand (mod 11 for a register)."""
    if isinstance(op, Reg):
        return RmBytes(rex=op.num >> 3, modrm=0xC0 | (op.num & 7), tail=b"", prefix=b"")
    prefix = bytes((_SEGMENT_PREFIX[op.seg],)) if op.seg else b""
    if op.base == "rip":  # mod 00, rm 101: disp32 from the end of the instruction
        return RmBytes(rex=0, modrm=0x05, tail=bytes(4), prefix=prefix, target=op.target)
    ss = (1, 2, 4, 8).index(op.scale) << 6
    index = REG64[op.index] if op.index is not None else None
    rex_x = (index >> 3) << 1 if index is not None else 0
    sib_index = (index & 7) << 3 if index is not None else 0x20  # 100: no index
    disp32 = struct.pack("<i", op.disp)
    if op.base is None:
        # mod 00 with rm 101 is rip-relative in 64-bit mode; an absolute address takes a
        # SIB whose base 101 (with mod 00) means "no base, disp32".
        return RmBytes(rex_x, 0x04, bytes((ss | sib_index | 5,)) + disp32, prefix)
    base = REG64[op.base]
    if op.disp32 or not fits_s8(op.disp):
        mod, disp = 0x80, disp32
    elif op.disp or base & 7 == 5:  # rbp/r13 with mod 00 would mean rip or no base
        mod, disp = 0x40, struct.pack("<b", op.disp)
    else:
        mod, disp = 0x00, b""
    rex = rex_x | base >> 3
    if index is None and base & 7 != 4:
        return RmBytes(rex, mod | base & 7, disp, prefix)
    # rm 100 announces a SIB byte, so rsp/r12 as a base go through one with no index.
    return RmBytes(rex, mod | 4, bytes((ss | sib_index | base & 7,)) + disp, prefix)


def hex_imm(value: int) -> str:
    """A number as the listing writes it: signed hex."""
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


def render_mem(op: Mem, target_text: str = "") -> str:
    """``op`` in GNU as Intel syntax; ``target_text`` spells a rip operand's target."""
    size = f"{_SIZE_NAMES[op.size]} ptr " if op.size else ""
    seg = f"{op.seg}:" if op.seg else ""
    if op.base == "rip":
        return f"{size}{seg}[rip + {target_text}]"
    terms = [t for t in (op.base, op.index and f"{op.index}*{op.scale}") if t]
    inner = "+".join(terms)
    if op.disp or not terms:
        sign = "+" if inner and op.disp >= 0 else ""
        inner += sign + hex_imm(op.disp)
    return f"{size}{seg}[{inner}]"
