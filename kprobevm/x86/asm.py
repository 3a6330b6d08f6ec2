"""The few x86-64 encodings kprobevm emits into guest memory, each range-checked.

Every relative encoding is computed from the address the bytes will *run* at, the way
the kernel's ``synthesize_reljump`` does; a target out of reach raises
:class:`~kprobevm.errors.KprobeError` naming both ends instead of wrapping silently.
:class:`Assembler` adds labels for the handful of internal jumps the #BP stub needs.
"""

from __future__ import annotations

import struct

from kprobevm.errors import KprobeError
from kprobevm.x86.constants import MASK64

__all__ = [
    "INT3",
    "REG64",
    "Assembler",
    "call_rel32",
    "fits_s32",
    "int3",
    "iretq",
    "jcc_rel32",
    "jmp_abs",
    "jmp_mem_rip",
    "jmp_rel32",
    "movb_store_rip",
    "pop_r64",
    "popfq",
    "push_imm32",
    "push_r64",
    "push_u64",
    "pushfq",
    "rel32",
    "rip_disp32",
    "to_u64",
]

INT3 = 0xCC

#: Register numbers of the 64-bit general registers (REX.B/R extend bit 3).
REG64 = {
    "rax": 0, "rcx": 1, "rdx": 2, "rbx": 3, "rsp": 4, "rbp": 5, "rsi": 6, "rdi": 7,
    "r8": 8, "r9": 9, "r10": 10, "r11": 11, "r12": 12, "r13": 13, "r14": 14, "r15": 15,
}  # fmt: skip


def to_u64(value: int) -> int:
    """``value`` as the unsigned 64-bit pattern the CPU sees."""
    return value & MASK64


def _signed64(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >> 63 else value


def fits_s32(value: int) -> bool:
    """True when ``value`` (a signed difference) fits in a sign-extended 32-bit field."""
    return -(1 << 31) <= value < (1 << 31)


def rel32(end: int, dst: int, *, what: str = "rel32") -> bytes:
    """The rel32 field that, added to ``end`` (the next instruction), reaches ``dst``."""
    diff = _signed64(dst - end)
    if not fits_s32(diff):
        raise KprobeError(
            f"{what}: target {to_u64(dst):#x} is out of rel32 reach from {to_u64(end):#x}"
            f" (distance {diff:#x})"
        )
    return struct.pack("<i", diff)


def rip_disp32(insn_end: int, target: int, *, what: str = "rip-relative operand") -> bytes:
    """The disp32 of a ``disp(%rip)`` operand in an instruction ending at ``insn_end``."""
    return rel32(insn_end, target, what=what)


def jmp_rel32(src: int, dst: int) -> bytes:
    """``jmp dst`` (``e9 rel32``, 5 bytes) placed at ``src``."""
    return b"\xe9" + rel32(src + 5, dst, what="jmp rel32")


def call_rel32(src: int, dst: int) -> bytes:
    """``call dst`` (``e8 rel32``, 5 bytes) placed at ``src``."""
    return b"\xe8" + rel32(src + 5, dst, what="call rel32")


def jcc_rel32(cc: int, src: int, dst: int) -> bytes:
    """``j<cc> dst`` (``0f 8<cc> rel32``, 6 bytes); ``cc`` is the 4-bit condition code."""
    if not 0 <= cc <= 15:
        raise KprobeError(f"jcc: condition code {cc} is not 0..15")
    return bytes((0x0F, 0x80 | cc)) + rel32(src + 6, dst, what="jcc rel32")


def push_imm32(value: int) -> bytes:
    """``pushq $value`` (``68 imm32``): only for values that sign-extend from 32 bits.

    Kernel text (0xffffffff8xxxxxxx) and the module area do; a value that does not
    would be pushed as a different address, so it is refused.
    """
    signed = _signed64(value)
    if not fits_s32(signed):
        raise KprobeError(f"push imm32: {to_u64(value):#x} does not sign-extend from 32 bits")
    return b"\x68" + struct.pack("<i", signed)


def push_u64(value: int) -> bytes:
    """Push any 64-bit value without touching a register or a flag.

    ``push imm32`` when the value sign-extends; otherwise ``lea -8(%rsp),%rsp`` (lea
    leaves the flags alone, unlike ``sub``) and two ``movl`` stores, 20 bytes.
    """
    signed = _signed64(value)
    if fits_s32(signed):
        return push_imm32(value)
    lo, hi = to_u64(value) & 0xFFFFFFFF, to_u64(value) >> 32
    return (
        b"\x48\x8d\x64\x24\xf8"  # lea -8(%rsp),%rsp
        + b"\xc7\x04\x24" + struct.pack("<I", lo)  # movl $lo,(%rsp)
        + b"\xc7\x44\x24\x04" + struct.pack("<I", hi)  # movl $hi,4(%rsp)
    )  # fmt: skip


def movb_store_rip(src: int, target: int, imm8: int) -> bytes:
    """``movb $imm8, target(%rip)`` (``c6 05 disp32 imm8``, 7 bytes) placed at ``src``.

    A store that changes no register and no flag: the watched-mailbox signal.
    """
    if not 0 <= imm8 <= 0xFF:
        raise KprobeError(f"movb: immediate {imm8} is not a byte")
    return b"\xc6\x05" + rip_disp32(src + 7, target, what="movb store") + bytes((imm8,))


def jmp_mem_rip(src: int, pointer: int) -> bytes:
    """``jmp *pointer(%rip)`` (``ff 25 disp32``, 6 bytes): jump to the u64 stored at ``pointer``."""
    return b"\xff\x25" + rip_disp32(src + 6, pointer, what="jmp *disp(%rip)")


def jmp_abs(dst: int) -> bytes:
    """``jmp *0(%rip)`` followed by the 8-byte ``dst``: reaches any address (14 bytes)."""
    return b"\xff\x25\x00\x00\x00\x00" + struct.pack("<Q", to_u64(dst))


def int3() -> bytes:
    """``int3`` (``cc``)."""
    return bytes((INT3,))


def iretq() -> bytes:
    """``iretq`` (``48 cf``): REX.W selects the 64-bit frame."""
    return b"\x48\xcf"


def pushfq() -> bytes:
    """``pushfq`` (``9c``)."""
    return b"\x9c"


def popfq() -> bytes:
    """``popfq`` (``9d``)."""
    return b"\x9d"


def _reg(name: str) -> int:
    try:
        return REG64[name]
    except KeyError as exc:
        raise KprobeError(f"unknown 64-bit register {name!r}") from exc


def push_r64(name: str) -> bytes:
    """``push %reg`` (``[41] 50+r``)."""
    r = _reg(name)
    return (b"\x41" if r >= 8 else b"") + bytes((0x50 + (r & 7),))


def pop_r64(name: str) -> bytes:
    """``pop %reg`` (``[41] 58+r``)."""
    r = _reg(name)
    return (b"\x41" if r >= 8 else b"") + bytes((0x58 + (r & 7),))


class Assembler:
    """A byte buffer at a known address, with labels for rel32 and rel8 jumps inside it.

    Jumps to labels are emitted with a placeholder and patched by :meth:`finish`, so a
    forward reference needs no second pass by the caller.
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self._buf = bytearray()
        self._labels: dict[str, int] = {}
        # (offset of the field, size of the field, end of the instruction, label)
        self._fixups: list[tuple[int, int, int, str]] = []

    @property
    def here(self) -> int:
        """The address the next byte lands at."""
        return self.base + len(self._buf)

    @property
    def offset(self) -> int:
        """The offset of the next byte from ``base``."""
        return len(self._buf)

    def emit(self, code: bytes) -> None:
        """Append already-encoded bytes."""
        self._buf += code

    def label(self, name: str) -> None:
        """Define ``name`` at the current position."""
        if name in self._labels:
            raise KprobeError(f"assembler: label {name!r} defined twice")
        self._labels[name] = len(self._buf)

    def labels(self) -> dict[str, int]:
        """Offsets of the labels defined so far."""
        return dict(self._labels)

    def jmp(self, name: str) -> None:
        """``jmp label`` (rel32)."""
        self._buf += b"\xe9\x00\x00\x00\x00"
        self._fixups.append((len(self._buf) - 4, 4, len(self._buf), name))

    def jcc(self, cc: int, name: str) -> None:
        """``j<cc> label`` (rel32)."""
        if not 0 <= cc <= 15:
            raise KprobeError(f"jcc: condition code {cc} is not 0..15")
        self._buf += bytes((0x0F, 0x80 | cc)) + b"\x00\x00\x00\x00"
        self._fixups.append((len(self._buf) - 4, 4, len(self._buf), name))

    def rel8_branch(self, opcode: bytes, name: str) -> None:
        """A branch with an 8-bit displacement (``loop``, ``jrcxz``, ``jmp short``)."""
        self._buf += opcode + b"\x00"
        self._fixups.append((len(self._buf) - 1, 1, len(self._buf), name))

    def finish(self) -> bytes:
        """Resolve every label reference and return the code."""
        out = bytearray(self._buf)
        for field, size, end, name in self._fixups:
            if name not in self._labels:
                raise KprobeError(f"assembler: undefined label {name!r}")
            diff = self._labels[name] - end
            if size == 1:
                if not -128 <= diff <= 127:
                    raise KprobeError(f"assembler: label {name!r} out of rel8 reach ({diff})")
                out[field] = diff & 0xFF
            else:
                out[field : field + 4] = struct.pack("<i", diff)
        return bytes(out)
