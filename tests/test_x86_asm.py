"""The emitted encodings, each decoded back with capstone; range checks raise."""

from __future__ import annotations

import struct

import capstone
import pytest

from kprobevm.errors import KprobeError
from kprobevm.x86 import asm

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
    with pytest.raises(KprobeError, match="not a byte"):
        asm.movb_store_rip(SRC, mailbox, 256)
    with pytest.raises(KprobeError, match="movb store"):
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
    a.rel8_branch(b"\xe2", "end")
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
    far.rel8_branch(b"\xeb", "x")
    far.emit(b"\x90" * 200)
    far.label("x")
    with pytest.raises(KprobeError, match="rel8"):
        far.finish()
