"""The machinery under :class:`kprobevm.x86.asm.Assembler`: bytes, labels and listing.

:class:`Encoder` lays out one instruction from its parts (prefixes, REX, opcode, the
r/m operand of :mod:`kprobevm.x86.operands`, immediate), resolves branches and ``rip``
operands to labels once all are known, and writes each instruction's GNU as text next
to its bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kprobevm.errors import KprobeError
from kprobevm.x86.constants import MASK64
from kprobevm.x86.operands import (
    Mem,
    Reg,
    encode_rm,
    fits_s8,
    fits_s32,
    hex_imm,
    is_reg,
    render_mem,
    signed64,
)

__all__ = ["Encoder", "Operand", "Program", "rel32", "to_u64"]

#: An operand as the listing shows it: a register name, a memory operand, an immediate.
Operand = str | Mem | int


def to_u64(value: int) -> int:
    """``value`` as the unsigned 64-bit pattern the CPU sees."""
    return value & MASK64


def rel32(end: int, dst: int, *, what: str = "rel32") -> bytes:
    """The rel32 field that, added to ``end`` (the next instruction), reaches ``dst``."""
    diff = signed64(dst - end)
    if not fits_s32(diff):
        raise KprobeError(
            f"{what}: target {to_u64(dst):#x} is out of rel32 reach from {to_u64(end):#x}"
            f" (distance {diff:#x})"
        )
    return struct.pack("<i", diff)


@dataclass(frozen=True)
class Program:
    """Assembled code at its address, where its labels are, and its GNU as listing."""

    base: int
    code: bytes
    #: Offset of each label from ``base``.
    labels: Mapping[str, int]
    #: Source for ``as --64`` whose ``.text`` is exactly ``code`` (see :class:`Encoder`).
    listing: str


@dataclass(frozen=True)
class _Fixup:
    """A branch or rip operand to a label, patched once every label is known."""

    field: int  # offset of the displacement
    size: int  # 1 or 4 bytes
    end: int  # offset of the next instruction, which the displacement counts from
    label: str


class Encoder:
    """Code for a known address, built one instruction at a time, with labels.

    Jumps to labels get a placeholder patched by :meth:`assemble`, so a forward
    reference needs no second pass by the caller.

    The listing is ``.intel_syntax noprefix`` for GNU as. Two things in it are there so
    gas makes the same choices as this encoder: ``{disp32}`` where a displacement or a
    branch keeps 32 bits although 8 would do, and an immediate that keeps 32 bits
    although 8 would do is written as a symbol set at the end of the listing (gas sizes
    an operand it cannot evaluate yet for the largest value). The code runs at an
    address gas cannot put it at, so an address outside the program is written as its
    distance from the program's first byte, ``.Lbase``: a relative encoding depends on
    nothing else. The absolute address follows in a comment.
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self._buf = bytearray()
        self._labels: dict[str, int] = {}
        self._fixups: list[_Fixup] = []
        self._lines: list[str] = []
        self._wide_imms: dict[int, str] = {}

    @property
    def here(self) -> int:
        """The address the next byte lands at."""
        return self.base + len(self._buf)

    @property
    def offset(self) -> int:
        """The offset of the next byte from ``base``."""
        return len(self._buf)

    def label(self, name: str) -> None:
        """Define ``name`` at the current position."""
        self._check_label(name)
        if name in self._labels:
            raise KprobeError(f"assembler: label {name!r} defined twice")
        self._labels[name] = len(self._buf)
        self._lines.append(f".L{name}:")

    def labels(self) -> dict[str, int]:
        """Offsets of the labels defined so far."""
        return dict(self._labels)

    def emit(self, code: bytes, note: str = "") -> None:
        """Append bytes this assembler did not encode (a copied instruction, data)."""
        self._buf += code
        if code:
            self._line(".byte " + ", ".join(f"{b:#04x}" for b in code), note)

    def quad(self, value: int) -> None:
        """``.quad value``: a u64 in the code, e.g. a pointer an indirect jump reads."""
        self._buf += struct.pack("<Q", to_u64(value))
        self._line(f".quad {to_u64(value):#x}")

    def align(self, boundary: int, fill: int) -> None:
        """Pad with ``fill`` bytes to a multiple of ``boundary`` from ``base``."""
        if boundary <= 0 or boundary & (boundary - 1) or not 0 <= fill <= 0xFF:
            raise KprobeError(f"align: {boundary} is not a power of two or {fill} not a byte")
        self._buf += bytes((fill,)) * (-len(self._buf) % boundary)
        self._line(f".balign {boundary}, {fill:#x}")

    def finish(self) -> bytes:
        """Resolve every label reference and return the code."""
        return self.assemble().code

    def assemble(self) -> Program:
        """Resolve every label reference: the code, its labels and its listing."""
        out = bytearray(self._buf)
        for fix in self._fixups:
            if fix.label not in self._labels:
                raise KprobeError(f"assembler: undefined label {fix.label!r}")
            diff = self._labels[fix.label] - fix.end
            if fix.size == 1:
                if not fits_s8(diff):
                    raise KprobeError(f"assembler: label {fix.label!r} out of rel8 reach ({diff})")
                out[fix.field] = diff & 0xFF
            else:
                out[fix.field : fix.field + 4] = struct.pack("<i", diff)
        return Program(self.base, bytes(out), dict(self._labels), self._listing())

    def _listing(self) -> str:
        head = [
            f"# {len(self._buf)} bytes that run at {to_u64(self.base):#x}",
            "\t.intel_syntax noprefix",
            "\t.text",
            ".Lbase:",
        ]
        tail = [f"\t.set {name}, {hex_imm(value)}" for value, name in self._wide_imms.items()]
        return "\n".join([*head, *self._lines, *tail]) + "\n"

    def _check_label(self, name: str) -> None:
        if not name.isidentifier() or name == "base" or is_reg(name):
            raise KprobeError(f"assembler: {name!r} cannot be a label")

    def _line(self, text: str, note: str = "") -> None:
        self._lines.append(f"\t{text}\t# {note}" if note else f"\t{text}")

    def _target_text(self, target: int | str) -> tuple[str, str]:
        """A branch or rip target as the listing writes it, and its comment."""
        if isinstance(target, str):
            return f".L{target}", ""
        diff = signed64(target - self.base)
        return f".Lbase{'-' if diff < 0 else '+'}{abs(diff):#x}", f"{to_u64(target):#x}"

    def _text(self, mnemonic: str, operands: Sequence[Operand], wide_imm: bool) -> tuple[str, str]:
        """One instruction's listing line and comment."""
        texts: list[str] = []
        note = ""
        for op in operands:
            if isinstance(op, Mem):
                target, note = self._target_text(op.target) if op.target is not None else ("", "")
                texts.append(render_mem(op, target))
            elif isinstance(op, int) and wide_imm:
                name = f".Limm32.{'m' if op < 0 else ''}{abs(op):#x}"
                self._wide_imms.setdefault(op, name)
                texts.append(f"offset {name}")
            else:
                texts.append(hex_imm(op) if isinstance(op, int) else op)
        forced = any(isinstance(op, Mem) and op.disp32 for op in operands)
        text = f"{'{disp32} ' if forced else ''}{mnemonic} {', '.join(texts)}"
        return text.rstrip(), note

    def _encode(
        self,
        mnemonic: str,
        operands: Sequence[Operand],
        opcode: bytes,
        *,
        rm: Reg | Mem | None = None,
        reg: int = 0,
        opreg: Reg | None = None,
        size: int | None = None,
        imm: bytes = b"",
        prefix: bytes = b"",
        rex: bool = False,
        wide_imm: bool = False,
    ) -> None:
        """Lay out ``prefix [66] [REX] opcode [ModRM [SIB] [disp]] [imm]`` and list it.

        ``reg`` is the ModRM reg field (a register number or an opcode extension);
        ``opreg`` a register carried in the opcode's low 3 bits (``push``, ``b8+r``);
        ``size`` 2 adds the operand-size prefix and 8 sets REX.W; ``rex`` asks for a REX
        prefix even with no bit set (``sil``, ``dil``, ... need one); ``wide_imm`` lists
        the immediate so that gas too keeps 32 bits for it.
        """
        rex_bits = (8 if size == 8 else 0) | (reg >> 3) << 2
        if opreg is not None:
            rex_bits |= opreg.num >> 3
            rex = rex or opreg.needs_rex
            opcode = opcode[:-1] + bytes((opcode[-1] | opreg.num & 7,))
        tail = b""
        rmb = encode_rm(rm) if rm is not None else None
        if rmb is not None:
            rex_bits |= rmb.rex
            prefix = rmb.prefix + prefix
            tail = bytes((rmb.modrm | (reg & 7) << 3,)) + rmb.tail
        if size == 2:
            prefix += b"\x66"
        rex_byte = bytes((0x40 | rex_bits,)) if rex_bits or rex else b""
        code = prefix + rex_byte + opcode + tail + imm
        start = len(self._buf)
        self._buf += code
        if rmb is not None and rmb.target is not None:
            field = start + len(code) - len(imm) - 4
            what = f"{mnemonic} [rip+disp32]"
            self._relative(field, 4, start + len(code), rmb.target, what)
        self._line(*self._text(mnemonic, operands, wide_imm))

    def _relative(self, field: int, size: int, end: int, target: int | str, what: str) -> None:
        """Fill the displacement at ``field``; ``end`` is the next instruction's offset."""
        if isinstance(target, str):
            self._check_label(target)
            self._fixups.append(_Fixup(field, size, end, target))
        else:  # only a rel32 reaches outside the program
            self._buf[field : field + 4] = rel32(self.base + end, target, what=what)

    def _branch(self, mnemonic: str, opcode: bytes, target: int | str, size: int) -> None:
        """A relative branch with a ``size``-byte displacement to a label or an address."""
        if size == 1 and not isinstance(target, str):
            raise KprobeError(f"{mnemonic}: a rel8 branch reaches only a label of the program")
        self._buf += opcode + bytes(size)
        end = len(self._buf)
        self._relative(end - size, size, end, target, f"{mnemonic} rel{8 * size}")
        text, note = self._target_text(target)
        # gas would pick rel8 for a near target; {disp32} keeps the rel32 encoded here.
        self._line(f"{'{disp32} ' if size == 4 else ''}{mnemonic} {text}", note)
