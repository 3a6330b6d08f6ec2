"""Host branch emulation: every condition code against a CPU (unicorn), and each branch kind."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable

import pytest

from kprobevm.errors import KprobeError
from kprobevm.x86.emulate import CF, OF, PF, SF, ZF, condition_holds, emulate
from kprobevm.x86.insn import decode

ADDR = 0xFFFFFFFF81000100
RSP = 0xFFFFC90000003F00
FLAG_BITS = (CF, PF, ZF, SF, OF)
ALL_FLAGS = [sum(bits) for n in range(6) for bits in itertools.combinations(FLAG_BITS, n)]

# The SDM's table, written independently of the implementation's pairing trick.
Cond = Callable[[bool, bool, bool, bool, bool], bool]
SDM: dict[int, Cond] = {
    0x0: lambda c, p, z, s, o: o,
    0x1: lambda c, p, z, s, o: not o,
    0x2: lambda c, p, z, s, o: c,
    0x3: lambda c, p, z, s, o: not c,
    0x4: lambda c, p, z, s, o: z,
    0x5: lambda c, p, z, s, o: not z,
    0x6: lambda c, p, z, s, o: c or z,
    0x7: lambda c, p, z, s, o: not c and not z,
    0x8: lambda c, p, z, s, o: s,
    0x9: lambda c, p, z, s, o: not s,
    0xA: lambda c, p, z, s, o: p,
    0xB: lambda c, p, z, s, o: not p,
    0xC: lambda c, p, z, s, o: s != o,
    0xD: lambda c, p, z, s, o: s == o,
    0xE: lambda c, p, z, s, o: z or s != o,
    0xF: lambda c, p, z, s, o: not z and s == o,
}


def _never_read(addr: int) -> int:
    raise AssertionError(f"unexpected memory read at {addr:#x}")


@pytest.mark.parametrize("cc", range(16))
def test_condition_codes_follow_the_sdm(cc: int) -> None:
    for flags in ALL_FLAGS:
        bits = [bool(flags & b) for b in FLAG_BITS]
        assert condition_holds(cc, flags | 0x2) == SDM[cc](*bits), (cc, hex(flags))


def test_condition_codes_match_a_cpu() -> None:
    unicorn = pytest.importorskip("unicorn", reason="unicorn (test-only emulator) is not installed")
    from unicorn import x86_const as ux

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0x10000, 0x10000)
    # A fresh address per case: unicorn keeps running a cached translation otherwise.
    for n, (cc, flags) in enumerate(itertools.product(range(16), ALL_FLAGS)):
        at = 0x10000 + 0x20 * n
        uc.mem_write(at, bytes((0x70 | cc, 0x10)))
        uc.reg_write(ux.UC_X86_REG_EFLAGS, flags | 0x2)
        uc.emu_start(at, 0, count=1)
        taken = uc.reg_read(ux.UC_X86_REG_RIP) == at + 0x12
        insn = decode(bytes((0x70 | cc, 0x10)), ADDR)
        result = emulate(insn, {"rsp": RSP, "eflags": flags | 0x2}, _never_read)
        assert result.rip == (ADDR + 0x12 if taken else ADDR + 2), (cc, hex(flags))


@pytest.mark.parametrize("cc", range(16))
def test_jcc_rel32_uses_the_same_condition(cc: int) -> None:
    insn = decode(bytes((0x0F, 0x80 | cc)) + struct.pack("<i", -0x40), ADDR)
    for flags in ALL_FLAGS:
        bits = [bool(flags & b) for b in FLAG_BITS]
        result = emulate(insn, {"rsp": RSP, "eflags": flags}, _never_read)
        assert result.rip == (ADDR + 6 - 0x40 if SDM[cc](*bits) else ADDR + 6)
        assert result.rsp == RSP and result.writes == ()


def test_call_rel_pushes_the_return_address() -> None:
    insn = decode(b"\xe8" + struct.pack("<i", 0x1000), ADDR)
    result = emulate(insn, {"rsp": RSP}, _never_read)
    assert result.rip == ADDR + 5 + 0x1000
    assert result.rsp == RSP - 8
    assert result.write == (RSP - 8, struct.pack("<Q", ADDR + 5))
    assert result.registers() == {"rip": ADDR + 0x1005, "rsp": RSP - 8}


def test_call_indirect_reads_the_target_before_the_push() -> None:
    memory = {RSP: 0xFFFFFFFF81234567}
    # call *(%rsp): the operand is the old top of stack, not the pushed return address.
    insn = decode(b"\xff\x14\x24", ADDR)
    result = emulate(insn, {"rsp": RSP}, memory.__getitem__)
    assert result.rip == 0xFFFFFFFF81234567
    assert result.write == (RSP - 8, struct.pack("<Q", ADDR + 3))
    reg = emulate(
        decode(b"\x41\xff\xd3", ADDR), {"rsp": RSP, "r11": 0xFFFFFFFF82000000}, _never_read
    )
    assert reg.rip == 0xFFFFFFFF82000000 and reg.rsp == RSP - 8


def test_indirect_memory_operands() -> None:
    table = 0xFFFFFFFF82000000
    memory = {table + 0x18: 0xFFFFFFFF81111111, ADDR + 6 + 0x40: 0xFFFFFFFF82222222}
    # jmp *0x8(%rax,%rcx,8) with rcx = 2
    sib = emulate(
        decode(b"\xff\x64\xc8\x08", ADDR), {"rsp": RSP, "rax": table, "rcx": 2}, memory.__getitem__
    )
    assert sib.rip == 0xFFFFFFFF81111111 and sib.rsp == RSP
    rip = emulate(decode(b"\xff\x25\x40\x00\x00\x00", ADDR), {"rsp": RSP}, memory.__getitem__)
    assert rip.rip == 0xFFFFFFFF82222222
    gs = {0xFFFF888000010000 + 0x28: 0xFFFFFFFF83333333}
    seg = emulate(
        decode(b"\x65\xff\x24\x25\x28\x00\x00\x00", ADDR),
        {"rsp": RSP, "gs_base": 0xFFFF888000010000},
        gs.__getitem__,
    )
    assert seg.rip == 0xFFFFFFFF83333333


def test_ret_and_ret_imm16() -> None:
    memory = {RSP: 0xFFFFFFFF81ABCDEF}
    ret = emulate(decode(b"\xc3", ADDR), {"rsp": RSP}, memory.__getitem__)
    assert (ret.rip, ret.rsp) == (0xFFFFFFFF81ABCDEF, RSP + 8)
    ret16 = emulate(decode(b"\xc2\x10\x01", ADDR), {"rsp": RSP}, memory.__getitem__)
    assert (ret16.rip, ret16.rsp) == (0xFFFFFFFF81ABCDEF, RSP + 8 + 0x110)


@pytest.mark.parametrize(
    ("code", "rcx", "zf", "taken", "new_rcx"),
    [
        (b"\xe2\x10", 5, False, True, 4),  # loop
        (b"\xe2\x10", 1, False, False, 0),
        (b"\xe2\x10", 0, False, True, 2**64 - 1),  # wraps
        (b"\xe1\x10", 5, True, True, 4),  # loope
        (b"\xe1\x10", 5, False, False, 4),
        (b"\xe0\x10", 5, False, True, 4),  # loopne
        (b"\xe0\x10", 5, True, False, 4),
        (b"\xe3\x10", 0, False, True, None),  # jrcxz
        (b"\xe3\x10", 1 << 32, False, False, None),
        (b"\x67\xe3\x10", 1 << 32, False, True, None),  # jecxz looks at ecx only
    ],
)
def test_loop_and_jcxz(code: bytes, rcx: int, zf: bool, taken: bool, new_rcx: int | None) -> None:
    insn = decode(code, ADDR)
    result = emulate(insn, {"rsp": RSP, "rcx": rcx, "eflags": ZF if zf else 0}, _never_read)
    assert result.rip == (ADDR + len(code) + 0x10 if taken else ADDR + len(code))
    assert result.rcx == new_rcx
    assert result.rsp == RSP


def test_jmp_rel_and_reg() -> None:
    assert emulate(decode(b"\xeb\xfe", ADDR), {"rsp": RSP}, _never_read).rip == ADDR
    assert emulate(decode(b"\xff\xe0", ADDR), {"rsp": RSP, "rax": 7}, _never_read).rip == 7


@pytest.mark.parametrize("code", [b"\x90", b"\x48\x8b\x05\x00\x00\x00\x00", b"\x0f\x0b"])
def test_non_branches_are_not_emulated(code: bytes) -> None:
    with pytest.raises(KprobeError, match="not a branch"):
        emulate(decode(code, ADDR), {"rsp": RSP}, _never_read)


def test_missing_register_is_named() -> None:
    with pytest.raises(KprobeError, match="r11"):
        emulate(decode(b"\x41\xff\xd3", ADDR), {"rsp": RSP}, _never_read)
