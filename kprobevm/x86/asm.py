"""kprobevm's x86-64 assembler: the guest programs, written as assembly and range-checked.

:class:`Assembler` has a method per mnemonic the programs use (``a.lea("rsp",
mem("rsp", -8))``, ``a.jcc("e", "found")``), encodes each (REX, ModRM, SIB,
displacement and immediate sizes) and keeps a GNU as listing of what it emitted
(:mod:`kprobevm.x86.encoder`). Every relative encoding is computed from the address the
bytes will *run* at; a target out of reach raises :class:`~kprobevm.errors.KprobeError`
naming both ends instead of wrapping silently. The module-level functions are
one-instruction shortcuts for code placed on its own.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable

from kprobevm.errors import KprobeError
from kprobevm.x86.encoder import Encoder, Operand, Program, rel32, to_u64
from kprobevm.x86.operands import (
    CONTROL,
    REG64,
    SEGMENTS,
    Mem,
    Reg,
    fits_s8,
    fits_s32,
    is_reg,
    mem,
    reg,
    rip,
    signed64,
)

__all__ = [
    "INT3",
    "REG64",
    "Assembler",
    "Mem",
    "Program",
    "call_rel32",
    "fits_s32",
    "int3",
    "iretq",
    "jcc_rel32",
    "jmp_abs",
    "jmp_mem_rip",
    "jmp_rel32",
    "mem",
    "movb_store_rip",
    "pop_r64",
    "popfq",
    "push_imm32",
    "push_r64",
    "push_u64",
    "pushfq",
    "rel32",
    "rip",
    "rip_disp32",
    "to_u64",
]

INT3 = 0xCC

#: Condition codes by number (the low nibble of ``0f 8x``), as the mnemonics spell them.
_CC_NAMES = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")
_CC_ALIASES = {
    "c": 2, "nae": 2, "nb": 3, "nc": 3, "z": 4, "nz": 5, "na": 6, "nbe": 7,
    "pe": 10, "po": 11, "nge": 12, "nl": 13, "ng": 14, "nle": 15,
}  # fmt: skip
#: The ALU operations offered, by their opcode extension (``80``/``81``/``83 /digit``);
#: the operation's reg-form opcodes are ``8 * digit`` plus 0..3.
_ALU = {"add": 0, "or": 1, "and": 4, "sub": 5, "xor": 6, "cmp": 7}


def rip_disp32(insn_end: int, target: int, *, what: str = "rip-relative operand") -> bytes:
    """The disp32 of a ``[rip + disp32]`` operand in an instruction ending at ``insn_end``."""
    return rel32(insn_end, target, what=what)


def _cc(cc: int | str) -> tuple[int, str]:
    """A condition code and its mnemonic suffix, from either."""
    if isinstance(cc, str):
        number = _CC_NAMES.index(cc) if cc in _CC_NAMES else _CC_ALIASES.get(cc)
        if number is None:
            raise KprobeError(f"jcc: unknown condition {cc!r}")
        return number, cc
    if not 0 <= cc <= 15:
        raise KprobeError(f"jcc: condition code {cc} is not 0..15")
    return cc, _CC_NAMES[cc]


def _imm(value: int, size: int) -> bytes:
    """``value`` as the immediate field of a ``size``-byte operation (a 64-bit operation
    takes a 32-bit immediate the CPU sign-extends)."""
    if size == 8:
        signed = signed64(value)
        if not fits_s32(signed):
            raise KprobeError(f"immediate {to_u64(value):#x} does not sign-extend from 32 bits")
        return struct.pack("<i", signed)
    bits = 8 * size
    if not -(1 << (bits - 1)) <= value < 1 << bits:
        raise KprobeError(f"immediate {value:#x} does not fit in {bits} bits")
    return (value & ((1 << bits) - 1)).to_bytes(size, "little")


def _shown(value: int, size: int) -> int:
    """An immediate as the listing writes it: as given, or sign-extended for 64 bits."""
    return signed64(value) if size == 8 else value


def _fits_imm8(field: bytes) -> bool:
    """True when the immediate field's value also fits a sign-extended imm8."""
    return fits_s8(int.from_bytes(field, "little", signed=True))


def _rm(op: str | Mem) -> Reg | Mem:
    """An r/m operand: a register by name, or the memory operand itself."""
    return reg(op) if isinstance(op, str) else op


def _reg64(name: str) -> Reg:
    """A 64-bit register, for the instructions that take no other width here."""
    if name not in REG64:
        raise KprobeError(f"unknown 64-bit register {name!r}")
    return reg(name)


def _width(op: Reg | Mem, other: Reg | None = None) -> int:
    """The operation's size: a register's, else the memory operand's own."""
    size = op.size if op.size is not None else (other.size if other is not None else None)
    if size is None:
        raise KprobeError("operand size unknown: give the memory operand a size")
    if other is not None and other.size != size:
        raise KprobeError(f"operand sizes differ: {size} and {other.size} bytes")
    return size


def _needs_rex(*ops: Reg | Mem) -> bool:
    """True when a byte register among ``ops`` exists only with a REX prefix."""
    return any(isinstance(op, Reg) and op.needs_rex for op in ops)


class Assembler(Encoder):
    """Guest code at a known address, written one mnemonic at a time.

    Operands are Intel order (destination first): a register by name (``"rax"``,
    ``"r13d"``, ``"cl"``), a :class:`Mem` from :func:`mem` or :func:`rip`, or an int
    immediate. Branch targets are a label of this program or an absolute address.
    """

    # -- no operands

    def _fixed(self, text: str, code: bytes) -> None:
        self._buf += code
        self._line(text)

    def pushfq(self) -> None:
        """``pushfq``."""
        self._fixed("pushfq", b"\x9c")

    def popfq(self) -> None:
        """``popfq``."""
        self._fixed("popfq", b"\x9d")

    def iretq(self) -> None:
        """``iretq``: REX.W selects the 64-bit frame."""
        self._fixed("iretq", b"\x48\xcf")

    def cld(self) -> None:
        """``cld``."""
        self._fixed("cld", b"\xfc")

    def cli(self) -> None:
        """``cli``: no maskable interrupt on this CPU until ``popfq`` restores IF."""
        self._fixed("cli", b"\xfa")

    def rdtsc(self) -> None:
        """``rdtsc``: the TSC in edx:eax."""
        self._fixed("rdtsc", b"\x0f\x31")

    def ud2(self) -> None:
        """``ud2``: an invalid opcode, on purpose."""
        self._fixed("ud2", b"\x0f\x0b")

    def ret(self) -> None:
        """``ret``."""
        self._fixed("ret", b"\xc3")

    def int3(self) -> None:
        """``int3``."""
        self._fixed("int3", bytes((INT3,)))

    def rep_movsq(self) -> None:
        """``rep movsq``: copy rcx quadwords from [rsi] to [rdi]."""
        self._fixed("rep movsq", b"\xf3\x48\xa5")

    # -- the stack

    def push(self, src: str | int) -> None:
        """``push reg``, or ``push imm32`` (always 4 bytes, so the length is fixed)."""
        if isinstance(src, int):
            field = _imm(src, 8)
            wide = _fits_imm8(field)  # gas would pick push imm8
            self._encode("push", [_shown(src, 8)], b"\x68", imm=field, wide_imm=wide)
        else:
            self._encode("push", [src], b"\x50", opreg=_reg64(src))

    def pop(self, dst: str) -> None:
        """``pop reg``."""
        self._encode("pop", [dst], b"\x58", opreg=_reg64(dst))

    def push_u64(self, value: int) -> None:
        """Push any 64-bit value without touching a register or a flag.

        ``push imm32`` when the value sign-extends; otherwise ``lea rsp, [rsp-8]`` (lea
        leaves the flags alone, unlike ``sub``) and two 32-bit stores, 20 bytes.
        """
        if fits_s32(signed64(value)):
            self.push(value)
            return
        self.lea("rsp", mem("rsp", -8))
        self.mov(mem("rsp", size=4), to_u64(value) & 0xFFFFFFFF)
        self.mov(mem("rsp", 4, size=4), to_u64(value) >> 32)

    # -- moves

    def mov(self, dst: str | Mem, src: Operand) -> None:
        """``mov dst, src`` (a 64-bit immediate that does not sign-extend needs :meth:`movabs`)."""
        if isinstance(src, int):
            self._mov_imm(dst, src)
        elif isinstance(src, str) and src in CONTROL and isinstance(dst, str):  # mov r64, crN
            self._encode("mov", [dst, src], b"\x0f\x20", rm=_reg64(dst), reg=CONTROL[src])
        elif isinstance(dst, str) and dst in CONTROL:  # mov crN, r64
            self._encode("mov", [dst, src], b"\x0f\x22", rm=_reg64(str(src)), reg=CONTROL[dst])
        elif isinstance(src, str) and src in SEGMENTS:
            rm = _rm(dst)  # mov r16, Sreg: the segment register goes in the reg field
            self._encode("mov", [dst, src], b"\x8c", rm=rm, reg=SEGMENTS[src], size=2)
        else:
            self._binary("mov", 0x88, dst, src)

    def _mov_imm(self, dst: str | Mem, value: int) -> None:
        rm = _rm(dst)
        size = _width(rm)
        field, shown = _imm(value, size), _shown(value, size)
        if isinstance(rm, Reg) and size != 8:  # b0+r / b8+r: the register in the opcode
            opcode = b"\xb0" if size == 1 else b"\xb8"
            self._encode("mov", [dst, shown], opcode, opreg=rm, size=size, imm=field)
        else:  # c6 /0, c7 /0 (a 64-bit one sign-extends its imm32)
            opcode = b"\xc6" if size == 1 else b"\xc7"
            self._encode("mov", [dst, shown], opcode, rm=rm, size=size, imm=field)

    def movabs(self, dst: str, value: int) -> None:
        """``movabs reg, imm64``: any 64-bit value, 10 bytes."""
        if not -(1 << 63) <= value < 1 << 64:
            raise KprobeError(f"movabs: {value:#x} does not fit in 64 bits")
        field = struct.pack("<Q", to_u64(value))
        self._encode("movabs", [dst, to_u64(value)], b"\xb8", opreg=_reg64(dst), size=8, imm=field)

    def lea(self, dst: str, src: Mem) -> None:
        """``lea reg, [address]``: the address, no memory access and no flag changed."""
        r = reg(dst)
        self._encode("lea", [dst, src], b"\x8d", rm=src, reg=r.num, size=r.size)

    def xchg(self, dst: Mem, src: str) -> None:
        """``xchg [mem], reg`` (locked by the CPU whatever the prefixes)."""
        self._binary("xchg", 0x86, dst, src, load=False)

    def lock_cmpxchg(self, dst: Mem, src: str) -> None:
        """``lock cmpxchg [mem], reg``: store ``src`` if [mem] equals rax, else load rax."""
        self._binary("lock cmpxchg", 0xB0, dst, src, load=False, prefix=b"\xf0", escape=b"\x0f")

    def _binary(
        self,
        mnemonic: str,
        op8: int,
        dst: str | Mem,
        src: Operand,
        *,
        load: bool = True,
        prefix: bytes = b"",
        escape: bytes = b"",
    ) -> None:
        """Register and r/m operands: opcode ``op8`` (+1 when wider than a byte) stores the
        reg field into r/m; ``op8 + 2`` loads r/m into it (used for a memory source)."""
        if isinstance(src, str):
            r, rm, loads = reg(src), _rm(dst), False
        elif isinstance(src, Mem) and isinstance(dst, str) and load:
            r, rm, loads = reg(dst), src, True
        else:
            raise KprobeError(f"{mnemonic}: no form for operands {dst!r}, {src!r}")
        size = _width(rm, r)
        opcode = escape + bytes((op8 + 2 * loads + (size > 1),))
        rex = _needs_rex(r, rm)
        self._encode(
            mnemonic, [dst, src], opcode, rm=rm, reg=r.num, size=size, prefix=prefix, rex=rex
        )

    # -- arithmetic

    def add(self, dst: str | Mem, src: Operand, *, imm32: bool = False) -> None:
        """``add dst, src``; ``imm32`` keeps a 4-byte immediate even for a small one."""
        self._alu("add", dst, src, imm32)

    def or_(self, dst: str | Mem, src: Operand, *, imm32: bool = False) -> None:
        """``or dst, src``."""
        self._alu("or", dst, src, imm32)

    def and_(self, dst: str | Mem, src: Operand, *, imm32: bool = False) -> None:
        """``and dst, src``."""
        self._alu("and", dst, src, imm32)

    def sub(self, dst: str | Mem, src: Operand, *, imm32: bool = False) -> None:
        """``sub dst, src``."""
        self._alu("sub", dst, src, imm32)

    def xor(self, dst: str | Mem, src: Operand, *, imm32: bool = False) -> None:
        """``xor dst, src``."""
        self._alu("xor", dst, src, imm32)

    def cmp(self, dst: str | Mem, src: Operand, *, imm32: bool = False) -> None:
        """``cmp dst, src``: flags of dst - src."""
        self._alu("cmp", dst, src, imm32)

    def _alu(
        self, mnemonic: str, dst: str | Mem, src: Operand, imm32: bool, *, lock: bool = False
    ) -> None:
        op = _ALU[mnemonic]
        prefix = b"\xf0" if lock else b""
        if lock:
            mnemonic = f"lock {mnemonic}"
        if not isinstance(src, int):
            self._binary(mnemonic, 8 * op, dst, src, prefix=prefix)
            return
        rm = _rm(dst)
        size = _width(rm)
        field, shown = _imm(src, size), _shown(src, size)
        small = size != 1 and _fits_imm8(field)
        wide = imm32 and small  # gas would pick the imm8 form the encoding skips
        if small and not imm32:  # 83 /op: a sign-extended imm8
            opcode, field = b"\x83", field[:1]
        elif isinstance(rm, Reg) and rm.num == 0:  # al/ax/eax/rax: a form with no ModRM
            opcode = bytes((8 * op + (4 if size == 1 else 5),))
            self._encode(mnemonic, [dst, shown], opcode, size=size, imm=field, wide_imm=wide)
            return
        else:
            opcode = b"\x80" if size == 1 else b"\x81"
        self._encode(mnemonic, [dst, shown], opcode, rm=rm, reg=op, size=size, imm=field,
                     wide_imm=wide, prefix=prefix)  # fmt: skip

    def test(self, dst: str | Mem, src: str | int) -> None:
        """``test dst, src``: flags of dst & src."""
        if isinstance(src, str):
            self._binary("test", 0x84, dst, src, load=False)
            return
        rm = _rm(dst)
        size = _width(rm)
        field, shown = _imm(src, size), _shown(src, size)
        if isinstance(rm, Reg) and rm.num == 0:  # a8/a9: the accumulator form
            opcode = b"\xa8" if size == 1 else b"\xa9"
            self._encode("test", [dst, shown], opcode, size=size, imm=field)
        else:
            opcode = b"\xf6" if size == 1 else b"\xf7"
            self._encode("test", [dst, shown], opcode, rm=rm, reg=0, size=size, imm=field)

    def inc(self, dst: str | Mem) -> None:
        """``inc dst``."""
        self._unary("inc", 0, dst)

    def dec(self, dst: str | Mem) -> None:
        """``dec dst``."""
        self._unary("dec", 1, dst)

    def lock_or(self, dst: Mem, value: int) -> None:
        """``lock or [mem], imm``: a read-modify-write no other CPU can split."""
        self._alu("or", dst, value, False, lock=True)

    def lock_inc(self, dst: Mem) -> None:
        """``lock inc [mem]``: an increment no other CPU can split."""
        self._unary("lock inc", 0, dst, prefix=b"\xf0")

    def lock_dec(self, dst: Mem) -> None:
        """``lock dec [mem]``: a decrement no other CPU can split."""
        self._unary("lock dec", 1, dst, prefix=b"\xf0")

    def _unary(self, mnemonic: str, ext: int, dst: str | Mem, prefix: bytes = b"") -> None:
        rm = _rm(dst)
        size = _width(rm)
        opcode = b"\xfe" if size == 1 else b"\xff"
        rex = _needs_rex(rm)
        self._encode(mnemonic, [dst], opcode, rm=rm, reg=ext, size=size, prefix=prefix, rex=rex)

    def imul(self, dst: str, src: str | Mem) -> None:
        """``imul reg, r/m``: the low half of the signed product."""
        r = reg(dst)
        rm = _rm(src)
        self._encode("imul", [dst, src], b"\x0f\xaf", rm=rm, reg=r.num, size=_width(rm, r))

    def shl(self, dst: str | Mem, count: int) -> None:
        """``shl dst, count``."""
        self._shift("shl", 4, dst, count)

    def shr(self, dst: str | Mem, count: int) -> None:
        """``shr dst, count``."""
        self._shift("shr", 5, dst, count)

    def sar(self, dst: str | Mem, count: int) -> None:
        """``sar dst, count``: the shift that keeps the sign."""
        self._shift("sar", 7, dst, count)

    def bsr(self, dst: str, src: str | Mem) -> None:
        """``bsr reg, r/m``: the index of the highest set bit (ZF set, dst undefined: 0)."""
        r = reg(dst)
        rm = _rm(src)
        self._encode("bsr", [dst, src], b"\x0f\xbd", rm=rm, reg=r.num, size=_width(rm, r))

    def div(self, src: str | Mem) -> None:
        """``div r/m``: rdx:rax by ``src`` (unsigned), quotient in rax, remainder in rdx."""
        rm = _rm(src)
        self._encode("div", [src], b"\xf7", rm=rm, reg=6, size=_width(rm))

    def _shift(self, mnemonic: str, ext: int, dst: str | Mem, count: int) -> None:
        rm = _rm(dst)
        size = _width(rm)
        if not 0 <= count < 8 * size:
            raise KprobeError(f"{mnemonic}: count {count} is not below {8 * size}")
        if count == 1:  # d0/d1: the shift-by-one form, as gas picks it
            opcode, field = (b"\xd0" if size == 1 else b"\xd1"), b""
        else:
            opcode, field = (b"\xc0" if size == 1 else b"\xc1"), bytes((count,))
        self._encode(mnemonic, [dst, count], opcode, rm=rm, reg=ext, size=size, imm=field)

    def bt(self, dst: str | Mem, bit: int) -> None:
        """``bt dst, bit``: CF gets one bit."""
        self._bit("bt", 4, dst, bit)

    def bts(self, dst: str | Mem, bit: int) -> None:
        """``bts dst, bit``: set one bit (CF gets its old value)."""
        self._bit("bts", 5, dst, bit)

    def btr(self, dst: str | Mem, bit: int) -> None:
        """``btr dst, bit``: clear one bit (CF gets its old value)."""
        self._bit("btr", 6, dst, bit)

    def _bit(self, mnemonic: str, ext: int, dst: str | Mem, bit: int) -> None:
        rm = _rm(dst)
        size = _width(rm)
        if size == 1 or not 0 <= bit < 8 * size:
            raise KprobeError(f"{mnemonic}: bit {bit} of a {size}-byte operand")
        self._encode(mnemonic, [dst, bit], b"\x0f\xba", rm=rm, reg=ext, size=size,
                     imm=bytes((bit,)))  # fmt: skip

    # -- branches

    def jmp(self, target: int | str | Mem) -> None:
        """``jmp``: to a label or an address (rel32), through a register, or through memory."""
        if isinstance(target, Mem):  # ff /4
            shown = target if target.size else dataclasses.replace(target, size=8)
            self._encode("jmp", [shown], b"\xff", rm=target, reg=4)
        elif isinstance(target, str) and is_reg(target):
            self._encode("jmp", [target], b"\xff", rm=_reg64(target), reg=4)
        else:
            self._branch("jmp", b"\xe9", target, 4)

    def call(self, target: int | str) -> None:
        """``call`` a label or an address (rel32)."""
        self._branch("call", b"\xe8", target, 4)

    def jcc(self, cc: int | str, target: int | str) -> None:
        """``j<cc>`` to a label or an address (rel32); ``cc`` is a name (``"ne"``) or 0..15."""
        number, name = _cc(cc)
        self._branch(f"j{name}", bytes((0x0F, 0x80 | number)), target, 4)

    def loop(self, label: str) -> None:
        """``loop label``: dec rcx, branch if not zero (rel8 only)."""
        self._branch("loop", b"\xe2", label, 1)

    def loope(self, label: str) -> None:
        """``loope label``: dec rcx, branch if not zero and ZF set (rel8 only)."""
        self._branch("loope", b"\xe1", label, 1)

    def loopne(self, label: str) -> None:
        """``loopne label``: dec rcx, branch if not zero and ZF clear (rel8 only)."""
        self._branch("loopne", b"\xe0", label, 1)

    def jrcxz(self, label: str) -> None:
        """``jrcxz label``: branch if rcx is zero (rel8 only)."""
        self._branch("jrcxz", b"\xe3", label, 1)

    def jecxz(self, label: str) -> None:
        """``jecxz label``: branch if ecx is zero (the address-size prefix picks ecx)."""
        self._branch("jecxz", b"\x67\xe3", label, 1)

    def jmp_next(self) -> None:
        """``jmp .+2``: a 2-byte jump to the very next instruction, changing only RIP."""
        self._fixed("jmp .+2", b"\xeb\x00")


def _one(build: Callable[[Assembler], None], at: int = 0) -> bytes:
    """The bytes ``build`` assembles at ``at``: the shortcuts share the one encoder."""
    a = Assembler(at)
    build(a)
    return a.finish()


def jmp_rel32(src: int, dst: int) -> bytes:
    """``jmp dst`` (``e9 rel32``, 5 bytes) placed at ``src``."""
    return _one(lambda a: a.jmp(dst), src)


def call_rel32(src: int, dst: int) -> bytes:
    """``call dst`` (``e8 rel32``, 5 bytes) placed at ``src``."""
    return _one(lambda a: a.call(dst), src)


def jcc_rel32(cc: int, src: int, dst: int) -> bytes:
    """``j<cc> dst`` (``0f 8<cc> rel32``, 6 bytes); ``cc`` is the 4-bit condition code."""
    return _one(lambda a: a.jcc(cc, dst), src)


def push_imm32(value: int) -> bytes:
    """``push imm32`` (``68 imm32``): only for values that sign-extend from 32 bits.

    Kernel text (0xffffffff8xxxxxxx) and the module area do; a value that does not
    would be pushed as a different address, so it is refused.
    """
    return _one(lambda a: a.push(value))


def push_u64(value: int) -> bytes:
    """Push any 64-bit value without touching a register or a flag (see ``Assembler.push_u64``)."""
    return _one(lambda a: a.push_u64(value))


def movb_store_rip(src: int, target: int, imm8: int) -> bytes:
    """``mov byte ptr [rip + target], imm8`` (``c6 05 disp32 imm8``, 7 bytes) placed at ``src``.

    A store that changes no register and no flag: the watched-mailbox signal.
    """
    return _one(lambda a: a.mov(rip(target, size=1), imm8), src)


def jmp_mem_rip(src: int, pointer: int) -> bytes:
    """``jmp qword ptr [rip + pointer]`` (``ff 25 disp32``): jump to the u64 at ``pointer``."""
    return _one(lambda a: a.jmp(rip(pointer)), src)


def jmp_abs(dst: int) -> bytes:
    """``jmp qword ptr [rip+0]`` followed by the 8-byte ``dst``: reaches any address (14 bytes)."""

    def build(a: Assembler) -> None:
        a.jmp(rip("target"))
        a.label("target")
        a.quad(dst)

    return _one(build)


def int3() -> bytes:
    """``int3`` (``cc``)."""
    return _one(Assembler.int3)


def iretq() -> bytes:
    """``iretq`` (``48 cf``): REX.W selects the 64-bit frame."""
    return _one(Assembler.iretq)


def pushfq() -> bytes:
    """``pushfq`` (``9c``)."""
    return _one(Assembler.pushfq)


def popfq() -> bytes:
    """``popfq`` (``9d``)."""
    return _one(Assembler.popfq)


def push_r64(name: str) -> bytes:
    """``push reg`` (``[41] 50+r``)."""
    return _one(lambda a: a.push(name))


def pop_r64(name: str) -> bytes:
    """``pop reg`` (``[41] 58+r``)."""
    return _one(lambda a: a.pop(name))
