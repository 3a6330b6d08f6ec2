"""The assembler: encodings decoded back with capstone and assembled by GNU as from the
listing; range checks and malformed operands raise."""

from __future__ import annotations

import struct
from collections.abc import Callable

import capstone
import pytest

from kprobevm.errors import KprobeError
from kprobevm.x86 import asm
from kprobevm.x86.ooline import TB_BREAK
from tests._gas import gas_text, needs_gas

SRC = 0xFFFFFFFFA0000000
TEXT = 0xFFFFFFFF81234560


def _one(code: bytes, addr: int = SRC) -> tuple[str, str, int]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = list(md.disasm(code, addr))
    assert len(insns) == 1 and insns[0].size == len(code), code.hex()
    return insns[0].mnemonic, insns[0].op_str, insns[0].size


def test_jmp_call_jcc_rel32() -> None:
    assert _one(asm.jmp_rel32(SRC, TEXT)) == ("jmp", f"{TEXT:#x}", 5)
    assert _one(asm.call_rel32(SRC, TEXT)) == ("call", f"{TEXT:#x}", 5)
    names = ["jo", "jno", "jb", "jae", "je", "jne", "jbe", "ja",
             "js", "jns", "jp", "jnp", "jl", "jge", "jle", "jg"]  # fmt: skip
    for cc, name in enumerate(names):
        assert _one(asm.jcc_rel32(cc, SRC, TEXT)) == (name, f"{TEXT:#x}", 6)
    with pytest.raises(KprobeError, match="condition code"):
        asm.jcc_rel32(16, SRC, TEXT)


# From 0xffffffffa0000000 a jump to 0x1000 wraps around 2**64 and is in reach.
@pytest.mark.parametrize("dst", [0xFFFF888000000000, 0x100000000, SRC + (1 << 31) + 5])
def test_rel32_out_of_reach_names_both_ends(dst: int) -> None:
    with pytest.raises(KprobeError, match=f"{dst & (2**64 - 1):#x}.*out of rel32 reach"):
        asm.jmp_rel32(SRC, dst)


def test_rel32_edges() -> None:
    end = SRC + 5
    assert asm.jmp_rel32(SRC, end + (1 << 31) - 1)[1:] == struct.pack("<i", (1 << 31) - 1)
    assert asm.jmp_rel32(SRC, end - (1 << 31))[1:] == struct.pack("<i", -(1 << 31))
    with pytest.raises(KprobeError):
        asm.jmp_rel32(SRC, end + (1 << 31))


def test_push_imm32_requires_sign_extension() -> None:
    # capstone prints the imm32 signed; the CPU sign-extends it to the text address
    assert _one(asm.push_imm32(TEXT)) == ("push", f"-{2**64 - TEXT:#x}", 5)
    assert _one(asm.push_imm32(0x7FFFFFFF)) == ("push", "0x7fffffff", 5)
    for bad in (0x80000000, 0xFFFF888000000000, 0xFFFFFFFF7FFFFFFF):
        with pytest.raises(KprobeError, match="sign-extend"):
            asm.push_imm32(bad)


def test_push_u64_long_form_is_lea_and_two_stores() -> None:
    assert asm.push_u64(TEXT) == asm.push_imm32(TEXT)
    code = asm.push_u64(0x81000005)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    text = [f"{i.mnemonic} {i.op_str}" for i in md.disasm(code, SRC)]
    assert text == [
        "lea rsp, [rsp - 8]",
        "mov dword ptr [rsp], 0x81000005",
        "mov dword ptr [rsp + 4], 0",
    ]


def test_movb_store_rip() -> None:
    mailbox = SRC + 0x1000
    mnem, ops, size = _one(asm.movb_store_rip(SRC, mailbox, 1))
    assert (mnem, size) == ("mov", 7)
    assert ops == f"byte ptr [rip + {mailbox - SRC - 7:#x}], 1"
    with pytest.raises(KprobeError, match="does not fit in 8 bits"):
        asm.movb_store_rip(SRC, mailbox, 256)
    with pytest.raises(KprobeError, match=r"mov \[rip\+disp32\].*out of rel32 reach"):
        asm.movb_store_rip(SRC, 0xFFFF888000000000, 1)


def test_small_encodings() -> None:
    assert _one(asm.int3())[:2] == ("int3", "")
    assert _one(asm.iretq())[:2] == ("iretq", "")
    assert _one(asm.pushfq())[:2] == ("pushfq", "")
    assert _one(asm.popfq())[:2] == ("popfq", "")
    for name in asm.REG64:
        assert _one(asm.push_r64(name))[:2] == ("push", name)
        assert _one(asm.pop_r64(name))[:2] == ("pop", name)
    with pytest.raises(KprobeError, match="unknown"):
        asm.push_r64("eax")


def test_indirect_jumps() -> None:
    ptr = SRC + 0x800
    assert _one(asm.jmp_mem_rip(SRC, ptr)) == ("jmp", f"qword ptr [rip + {ptr - SRC - 6:#x}]", 6)
    code = asm.jmp_abs(0xFFFF888012345678)
    assert len(code) == 14 and code[:6] == b"\xff\x25\x00\x00\x00\x00"
    assert struct.unpack("<Q", code[6:])[0] == 0xFFFF888012345678


def test_assembler_labels() -> None:
    a = asm.Assembler(SRC)
    a.jmp("end")
    a.label("back")
    a.emit(b"\x90")
    a.jcc(0x5, "back")
    a.loop("end")
    a.label("end")
    code = a.finish()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    text = [(i.mnemonic, i.op_str) for i in md.disasm(code, SRC)]
    end = f"{SRC + len(code):#x}"
    assert text == [("jmp", end), ("nop", ""), ("jne", f"{SRC + 5:#x}"), ("loop", end)]
    bad = asm.Assembler(SRC)
    bad.jmp("nowhere")
    with pytest.raises(KprobeError, match="undefined label"):
        bad.finish()
    far = asm.Assembler(SRC)
    far.jrcxz("x")
    far.emit(b"\x90" * 200)
    far.label("x")
    with pytest.raises(KprobeError, match="rel8"):
        far.finish()


def _every_form(a: asm.Assembler) -> None:
    """One of each instruction form the programs use, and the ModRM/SIB corner cases."""
    a.label("top")
    for base in ("rax", "rsp", "rbp", "r12", "r13", "r8", None):
        for disp in (0, 8, -128, 127, 128, -129, 0x12345678):
            for index in (None, "rcx", "r12", "r13"):
                a.mov("rax", asm.mem(base, disp, index, 4 if index else 1))
                a.mov(asm.mem(base, disp, index, size=8, disp32=True), "r9")
    a.mov("r13d", asm.mem(disp=0x40, seg="gs"))
    for op in (a.add, a.or_, a.and_, a.sub, a.xor, a.cmp):
        for dst in ("rax", "rcx", "r12", "eax", "r13d", "ax", "al", "cl"):
            for value in (0, 1, 127, -128, *((128, -129, 0x7FFF) if dst[-1] != "l" else ())):
                op(dst, value)
                op(dst, value, imm32=True)
        op("rcx", "rdx")
        op("rax", asm.rip(SRC + 0x2000))
        op(asm.mem("rbx", 8, size=8), 5)
    for dst, src in (("cl", "cl"), ("rax", "rax"), ("al", 3), ("ecx", 0x100)):
        a.test(dst, src)
    a.test(asm.mem("rsp", 16, size=1), 3)
    for reg, value in (("cl", 1), ("sil", 2), ("r9b", 0xCC), ("ecx", 208), ("r10d", 0xFFFFFFFF)):
        a.mov(reg, value)
    a.mov("rax", -14)
    a.mov("ax", 0x1234)
    a.mov(asm.mem("rbx", 12, size=2, disp32=True), 7)
    a.mov(asm.mem("rbx", 14, disp32=True), "r13w")
    a.mov(asm.mem("rax", 0, "r13", size=1), 0)
    a.mov(asm.mem("rbx", 0x100, size=8), TEXT)
    a.mov("ax", "cs")
    a.mov("ax", "ss")
    a.movabs("rcx", 0x9E3779B97F4A7C15)
    a.movabs("r11", 5)
    a.lea("rsp", asm.mem("rsp", -8))
    a.xchg(asm.mem("rax", 0, "r13", size=1), "cl")
    a.xchg(asm.mem("rax", size=1), "sil")
    a.lock_cmpxchg(asm.rip(SRC + 0x1000), "rsi")
    a.lock_inc(asm.rip(SRC + 0x3000, size=8))
    a.lock_inc(asm.mem("rbx", size=4))
    a.inc("rax")
    a.dec("edx")
    a.dec("r9")
    a.inc(asm.mem("rax", size=1))
    a.imul("rcx", "rax")
    a.imul("r9", asm.mem("rsi", 8))
    for shift, reg, count in ((a.shr, "rcx", 60), (a.shl, "rdx", 32), (a.shr, "rcx", 1)):
        shift(reg, count)
    a.bts("r8", 63)
    a.bts("eax", 3)
    a.bt("rcx", 23)
    a.btr("rcx", 16)
    a.btr("r9d", 1)
    for gpr, cr in (("rdx", "cr0"), ("r9", "cr4"), ("rax", "cr8"), ("r11", "cr3")):
        a.mov(gpr, cr)
        a.mov(cr, gpr)
    a.lock_or(asm.mem("rax", size=1), 0)
    a.lock_or(asm.mem("r13", 5, size=1), 0x80)
    a.lock_or(asm.mem("rbx", 8, size=4), 1)
    for reg in ("rax", "r8", "r15", "rsp"):
        a.push(reg)
        a.pop(reg)
    for value in (5, TEXT, -0x7F, 0x81000005):
        a.push_u64(value)
    for simple in (a.pushfq, a.popfq, a.iretq, a.cld, a.rdtsc, a.ud2, a.ret, a.int3, a.rep_movsq):
        simple()
    a.jmp("top")
    a.jmp("end")
    a.jmp(SRC + 0x10)  # near, yet rel32 like every jmp
    a.call(TEXT)
    for reg in ("rax", "r11"):
        a.jmp(reg)
    a.jmp(asm.rip("ptr"))
    a.jmp(asm.mem("rax", 8))
    for cc in range(16):
        a.jcc(cc, "end")
    a.jcc("z", TEXT)
    a.label("near")
    for rel8 in (a.loop, a.loope, a.loopne, a.jrcxz, a.jecxz):
        rel8("near")
    a.jmp_next()
    a.emit(b"\x48\x8b\x05\x00\x00\x00\x00", "copied")
    a.align(8, 0xCC)
    a.label("ptr")
    a.quad(TEXT)
    a.label("end")


@needs_gas
def test_every_form_matches_gas() -> None:
    a = asm.Assembler(SRC)
    _every_form(a)
    program = a.assemble()
    assert gas_text(program.listing) == program.code


def test_encodings_of_the_corner_cases() -> None:
    def code(build: Callable[[asm.Assembler], None]) -> bytes:
        a = asm.Assembler(SRC)
        build(a)
        return a.finish()

    # rbp/r13 as a base need a disp8 of 0; rsp/r12 as a base need a SIB byte
    assert code(lambda a: a.mov("rax", asm.mem("rbp"))) == bytes.fromhex("488b4500")
    assert code(lambda a: a.mov("rax", asm.mem("r12"))) == bytes.fromhex("498b0424")
    # no base: SIB with base 101 (mod 00 rm 101 would be rip-relative)
    assert code(lambda a: a.mov("eax", asm.mem(disp=0x40, seg="gs"))) == bytes.fromhex(
        "658b042540000000"
    )
    # spl..dil need an empty REX, else they would be ah..bh
    assert code(lambda a: a.mov("sil", 1)) == bytes.fromhex("40b601")
    assert code(lambda a: a.cmp("rax", 0x80)) == bytes.fromhex("483d80000000")
    assert code(lambda a: a.cmp("rax", 5, imm32=True)) == bytes.fromhex("483d05000000")
    assert code(lambda a: a.jmp_next()) == TB_BREAK


def test_listing_spells_what_gas_needs() -> None:
    a = asm.Assembler(SRC)
    a.and_("rcx", 3, imm32=True)
    a.mov(asm.mem("rbx", 8, disp32=True), "rax")
    a.call(TEXT)
    a.jcc("e", "out")
    a.label("out")
    listing = a.assemble().listing
    assert "and rcx, offset .Limm32.0x3" in listing
    assert ".set .Limm32.0x3, 0x3" in listing.splitlines()[-1]
    assert "{disp32} mov [rbx+0x8], rax" in listing
    assert f"{{disp32}} call .Lbase-{SRC - TEXT:#x}\t# {TEXT:#x}" in listing
    assert "{disp32} je .Lout" in listing


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda a: a.mov("rax", asm.mem("rax", 0, "rsp")), "rsp cannot be an index"),
        (lambda a: a.mov("rax", asm.mem("rax", 0, "rcx", 3)), "scale 3"),
        (lambda a: a.mov("rax", asm.mem("eax")), "not a 64-bit register"),
        (lambda a: a.mov("rax", asm.mem("rax", 1 << 31)), "does not fit in 32 bits"),
        (lambda a: a.mov("xax", 1), "unknown register"),
        (lambda a: a.mov(asm.mem("rax"), 1), "operand size unknown"),
        (lambda a: a.mov("eax", "rcx"), "operand sizes differ"),
        (lambda a: a.mov("rax", 0x80000000), "does not sign-extend"),
        (lambda a: a.mov("eax", 1 << 32), "does not fit in 32 bits"),
        (lambda a: a.movabs("rax", 1 << 64), "does not fit in 64 bits"),
        (lambda a: a.shl("eax", 32), "not below 32"),
        (lambda a: a.jcc("maybe", "x"), "unknown condition"),
        (lambda a: a.label("rax"), "cannot be a label"),
        (lambda a: a.label("base"), "cannot be a label"),
        (lambda a: a.call(0xFFFF888000000000), "call rel32.*out of rel32 reach"),
        (lambda a: a.lea("rax", asm.rip(0x1000_0000_0000)), r"lea \[rip\+disp32\]"),
        (lambda a: a.mov(asm.mem("rax"), asm.mem("rbx")), "no form"),
        (lambda a: a.align(3, 0xCC), "power of two"),
        (lambda a: asm.Mem(base="rip"), "a rip operand has a target"),
    ],
)
def test_malformed_instructions_raise(
    build: Callable[[asm.Assembler], object], message: str
) -> None:
    with pytest.raises(KprobeError, match=message):
        build(asm.Assembler(SRC))


def test_label_listing_and_offsets_agree() -> None:
    a = asm.Assembler(SRC)
    a.pushfq()
    a.label("after")
    a.jmp("after")
    program = a.assemble()
    assert program.labels == {"after": 1}
    assert program.code == b"\x9c\xe9\xfb\xff\xff\xff"
    assert ".Lafter:\n\t{disp32} jmp .Lafter" in program.listing
