"""Decoding and classification for probing; the boundary sweep of can_probe."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kprobevm.errors import ProbeRefused
from kprobevm.x86.insn import FTRACE_NOP5, InsnKind, boundaries, check_boundary, decode

ADDR = 0xFFFFFFFF81000100
PAD = b"\x90" * 16


@pytest.mark.parametrize(
    ("hexcode", "kind", "length"),
    [
        ("4889e5", InsnKind.PLAIN, 3),  # mov %rsp,%rbp
        ("55", InsnKind.PLAIN, 1),
        ("9c", InsnKind.PLAIN, 1),  # pushf: no TF to hide, we never single-step
        ("fa", InsnKind.PLAIN, 1),  # cli
        ("0f1f440000", InsnKind.PLAIN, 5),  # the ftrace NOP
        ("f30f1efa", InsnKind.PLAIN, 4),  # endbr64
        ("f0480fb111", InsnKind.PLAIN, 5),  # lock cmpxchg
        ("f348ab", InsnKind.PLAIN, 3),  # rep stos
        ("c5fd6f0510000000", InsnKind.PLAIN, 8),  # VEX, rip-relative
        ("62f1fd486f0510000000", InsnKind.PLAIN, 10),  # EVEX, rip-relative
        ("e800000000", InsnKind.CALL_REL, 5),
        ("2ee800000000", InsnKind.CALL_REL, 6),  # cs-prefixed thunk call
        ("e9fbffffff", InsnKind.JMP_REL, 5),
        ("ebfe", InsnKind.JMP_REL, 2),
        ("7405", InsnKind.JCC_REL, 2),
        ("0f8f00010000", InsnKind.JCC_REL, 6),
        ("c3", InsnKind.RET, 1),
        ("f3c3", InsnKind.RET, 2),
        ("c20800", InsnKind.RET_IMM, 3),
        ("ffe0", InsnKind.JMP_INDIRECT_REG, 2),
        ("41ffe3", InsnKind.JMP_INDIRECT_REG, 3),
        ("ffd0", InsnKind.CALL_INDIRECT_REG, 2),
        ("ff2510000000", InsnKind.JMP_INDIRECT_MEM, 6),
        ("ff1510000000", InsnKind.CALL_INDIRECT_MEM, 6),
        ("ff14c500000000", InsnKind.CALL_INDIRECT_MEM, 7),
        ("e2fe", InsnKind.LOOP, 2),
        ("e1fe", InsnKind.LOOP, 2),
        ("e0fe", InsnKind.LOOP, 2),
        ("e3fe", InsnKind.JCXZ, 2),
        ("67e3fe", InsnKind.JCXZ, 3),
    ],
)
def test_kinds(hexcode: str, kind: InsnKind, length: int) -> None:
    insn = decode(bytes.fromhex(hexcode) + PAD, ADDR)
    assert insn.kind is kind
    assert insn.length == length
    assert insn.bytes == bytes.fromhex(hexcode)
    assert insn.refusal is None
    insn.check_probeable()


@pytest.mark.parametrize(
    ("hexcode", "reason"),
    [
        ("cc", "int3 already there"),
        ("cd03", "software interrupt"),
        ("f1", "int1"),
        ("48cf", "iret"),
        ("480f07", "sysret"),
        ("0f35", "sysexit"),
        ("0f05", "syscall"),
        ("0f0b", "BUG"),
        ("0fb900", "ud1"),
        ("0fff", "ud0"),
        ("f4", "hlt"),
        ("8ed0", "mov to %ss"),
        ("48cb", "far return"),
        ("ff28", "far indirect"),
        ("ff18", "far indirect"),
        ("c7f800000000", "xbegin"),
        ("66e90000", "operand-size prefix"),
        ("67e2fe", "address-size"),
    ],
)
def test_refusals(hexcode: str, reason: str) -> None:
    insn = decode(bytes.fromhex(hexcode) + PAD, ADDR)
    assert insn.kind is InsnKind.REFUSED
    assert insn.refusal is not None and reason in insn.refusal
    with pytest.raises(ProbeRefused, match=reason) as info:
        insn.check_probeable(symbol="f")
    assert info.value.code == "EOPNOTSUPP" and info.value.address == ADDR


def test_ud1_takes_its_modrm_byte() -> None:
    # capstone 5 says 2 bytes; the SDM and the kernel's decoder give ud1 a ModRM (and SIB/disp)
    assert decode(bytes.fromhex("0fb900") + PAD, ADDR).length == 3
    assert decode(bytes.fromhex("0fb94424f0") + PAD, ADDR).length == 5
    assert decode(bytes.fromhex("0fb98000010000") + PAD, ADDR).length == 7


@pytest.mark.parametrize(
    ("hexcode", "offset", "target_off"),
    [
        ("488b0510000000", 3, 7 + 0x10),  # mov 0x10(%rip),%rax
        ("488d3dfcffffff", 3, 7 - 4),  # lea -4(%rip),%rdi
        ("833d0010000005", 2, 7 + 0x1000),  # cmpl $5, disp(%rip): the imm follows the disp
        ("c5fd6f0510000000", 4, 8 + 0x10),  # VEX (capstone says disp_size 2: wrong)
        ("62f1fd486f0510000000", 6, 10 + 0x10),  # EVEX
        ("65488b0510000000", 4, 8 + 0x10),  # gs:disp(%rip), percpu in newer kernels
        ("ff1510000000", 2, 6 + 0x10),
    ],
)
def test_rip_relative_displacement(hexcode: str, offset: int, target_off: int) -> None:
    insn = decode(bytes.fromhex(hexcode) + PAD, ADDR)
    assert insn.rip_disp_offset == offset
    assert insn.rip_target == ADDR + target_off


def test_absolute_and_stack_operands_are_not_rip_relative() -> None:
    assert decode(bytes.fromhex("65488b042528000000"), ADDR).rip_disp_offset is None
    assert decode(bytes.fromhex("488b442408"), ADDR).rip_disp_offset is None


def test_branch_facts() -> None:
    call = decode(bytes.fromhex("e8fb0f0000"), ADDR)
    assert call.target == ADDR + 0x1000 and call.next_addr == ADDR + 5
    jcc = decode(bytes.fromhex("0f8cfaffffff"), ADDR)
    assert jcc.cc == 0xC and jcc.target == ADDR
    assert decode(bytes.fromhex("41ffd3"), ADDR).reg == "r11"
    mem = decode(bytes.fromhex("ff14c508000000"), ADDR).mem
    assert mem is not None and (mem.base, mem.index, mem.scale, mem.disp) == (None, "rax", 8, 8)
    assert decode(FTRACE_NOP5, ADDR).is_ftrace_nop
    assert decode(bytes.fromhex("f30f1efa"), ADDR).is_endbr


def test_undecodable_bytes() -> None:
    with pytest.raises(ProbeRefused) as info:
        decode(bytes.fromhex("06"), ADDR)  # push %es: invalid in 64-bit mode
    assert info.value.code == "EILSEQ"
    with pytest.raises(ProbeRefused):
        decode(bytes.fromhex("488b"), ADDR)  # cut off


# A small function: endbr, ftrace nop, push, rip-relative load, call, jcc, pop, ret, int3.
FUNC = bytes.fromhex(
    "f30f1efa"  # 0  endbr64
    "0f1f440000"  # 4  nop5
    "55"  # 9  push %rbp
    "488b0510000000"  # 10 mov 0x10(%rip),%rax
    "e800000000"  # 17 call
    "85c0"  # 22 test %eax,%eax
    "7402"  # 24 je
    "5d"  # 26 pop %rbp
    "c3"  # 27 ret
    "cc"  # 28 int3 padding
)
FUNC_STARTS = [0, 4, 9, 10, 17, 22, 24, 26, 27, 28]


def test_boundaries_sweep() -> None:
    assert boundaries(FUNC, ADDR) == [ADDR + o for o in FUNC_STARTS]


def test_boundaries_report_the_offset_of_bad_bytes() -> None:
    with pytest.raises(ProbeRefused, match="offset 0x4") as info:
        boundaries(FUNC[:4] + bytes.fromhex("06") + FUNC[4:], ADDR)
    assert info.value.code == "EILSEQ" and info.value.address == ADDR + 4
    with pytest.raises(ProbeRefused, match="0xa"):
        boundaries(FUNC[:12], ADDR)  # the mov at 10 is cut off


def test_check_boundary() -> None:
    for off in FUNC_STARTS:
        check_boundary(FUNC, ADDR, ADDR + off)
    with pytest.raises(ProbeRefused, match="inside the instruction at offset 0xa") as info:
        check_boundary(FUNC, ADDR, ADDR + 12, symbol="f")
    assert info.value.code == "BAD_INSN_BNDRY" and info.value.symbol == "f"
    with pytest.raises(ProbeRefused, match="outside the function"):
        check_boundary(FUNC, ADDR, ADDR + len(FUNC))
    hidden = FUNC[:9] + b"\xcc" + FUNC[10:]  # someone's int3 on the push
    with pytest.raises(ProbeRefused, match="int3 not ours") as info:
        check_boundary(hidden, ADDR, ADDR + 22)
    assert info.value.code == "EILSEQ"


@pytest.mark.skipif(shutil.which("as") is None, reason="GNU as is not installed")
def test_boundaries_agree_with_gas() -> None:
    lines = [
        "endbr64", "nopl 0x0(%rax,%rax,1)", "push %rbp", "mov %rsp,%rbp",
        "mov 0x1234(%rip),%rax", "lock cmpxchg %rdx,(%rdi)", "vmovdqu 0x40(%rip),%ymm1",
        "cmpl $5,0x10(%rip)", "movabs $0x1122334455667788,%r11", "rep stosq",
        "call *%r11", "jmp *0x8(%rax,%rcx,8)", "ud2", "ud1 0x10(%rax),%eax", "loop .",
        "jrcxz .", "xchg %ax,%ax", "pop %rbp", "ret", "int3",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        src, obj, lst = Path(tmp, "f.s"), Path(tmp, "f.o"), Path(tmp, "f.bin")
        src.write_text(".text\n" + "".join(f"m{i}: {line}\n" for i, line in enumerate(lines)))
        subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
        syms = subprocess.run(["nm", str(obj)], check=True, capture_output=True, text=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(lst)], check=True)
        code = lst.read_bytes()
    offsets = sorted(int(line.split()[0], 16) for line in syms.stdout.splitlines())
    assert boundaries(code, ADDR) == [ADDR + o for o in offsets]


@pytest.mark.parametrize("hexcode", ["0f01e8", "0f01fe", "0f01ff", "f30f01fe"])
def test_group7_register_forms_capstone_lacks_are_plain(hexcode: str) -> None:
    # serialize, invlpgb, tlbsync: capstone 5 cannot decode them; the kernel uses them.
    code = bytes.fromhex(hexcode)
    insn = decode(code + b"\x41\x89\xc0", ADDR)
    assert insn.kind is InsnKind.PLAIN and insn.length == len(code)
    assert boundaries(code + b"\x41\x89\xc0", ADDR) == [ADDR, ADDR + len(code)]
    with pytest.raises(ProbeRefused):
        decode(bytes.fromhex("0f0105"), ADDR)  # sgdt disp32(%rip), cut off: no fallback
