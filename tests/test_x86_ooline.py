"""Slot code: run the original at its address and the slot copy in unicorn, compare states."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

import capstone
import pytest

from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.x86.insn import InsnKind, decode
from kprobevm.x86.ooline import POST_VALUE, PRE_VALUE, SLOT_SIZE, make_slot_code, relocate
from tests._x86_unicorn import GPRS, Machine


@dataclass(frozen=True)
class Layout:
    text: int
    slot: int
    mailbox: int
    stack: int


KERNEL = Layout(
    text=0xFFFFFFFF81000000,
    slot=0xFFFFFFFFA0000040,
    mailbox=0xFFFFFFFFA0001000,
    stack=0xFFFFC90000008000,
)
# Above 2 GiB but below 4 GiB: return addresses do not sign-extend from 32 bits, so
# calls take the 20-byte flag-preserving push.
LOW = Layout(text=0x81000000, slot=0xA0000040, mailbox=0xA0001000, stack=0x7F0000008000)
Build = Callable[[int, int], bytes]
ARITH_FLAGS = 0x8D5 | 0x400  # CF PF AF ZF SF OF, DF


def _rel(src_end: int, dst: int, size: int) -> bytes:
    return struct.pack("<i" if size == 4 else "<b", dst - src_end)


@dataclass(frozen=True)
class Case:
    name: str
    build: Build  # (addr, data) -> instruction bytes
    regs: dict[str, int]


def _cases() -> list[Case]:
    t = 0x100  # instruction offset in text; data lives at text+0x1000

    def rip(prefix: bytes, suffix: bytes = b"") -> Build:
        def build(addr: int, data: int) -> bytes:
            length = len(prefix) + 4 + len(suffix)
            return prefix + _rel(addr + length, data, 4) + suffix

        return build

    def rel(op: bytes, target_off: int, size: int) -> Build:
        def build(addr: int, data: int) -> bytes:
            text = addr - t
            return op + _rel(addr + len(op) + size, text + target_off, size)

        return build

    def raw(code: bytes) -> Build:
        return lambda addr, data: code

    zf, cf, sf, of = 0x40, 0x1, 0x80, 0x800
    return [
        Case("mov rip load", rip(b"\x48\x8b\x05"), {}),
        Case("lea rip", rip(b"\x48\x8d\x05"), {}),
        Case("mov rip store", rip(b"\x48\x89\x1d"), {}),
        Case("cmpl imm rip", rip(b"\x83\x3d", b"\x05"), {}),
        Case("lock add rip", rip(b"\xf0\x48\x01\x05"), {}),
        Case("push rbx", raw(b"\x53"), {}),
        Case("pop rbx", raw(b"\x5b"), {}),
        Case("add", raw(b"\x48\x01\xd8"), {}),
        Case("ftrace nop", raw(bytes.fromhex("0f1f440000")), {}),
        Case("call rel32", rel(b"\xe8", 0x800, 4), {}),
        Case("cs call rel32", rel(b"\x2e\xe8", 0x800, 4), {}),
        Case("jmp rel8", rel(b"\xeb", 0x140, 1), {}),
        Case("jmp rel32", rel(b"\xe9", 0x900, 4), {}),
        Case("je taken", rel(b"\x74", 0x150, 1), {"eflags": 0x2 | zf}),
        Case("je not taken", rel(b"\x74", 0x150, 1), {"eflags": 0x2}),
        Case("jl taken", rel(b"\x0f\x8c", 0x40, 4), {"eflags": 0x2 | sf}),
        Case("jl not taken", rel(b"\x0f\x8c", 0x40, 4), {"eflags": 0x2 | sf | of}),
        Case("jbe taken", rel(b"\x76", 0xC0, 1), {"eflags": 0x2 | cf}),
        Case("ret", raw(b"\xc3"), {}),
        Case("ret imm16", raw(b"\xc2\x10\x00"), {}),
        Case("call *rax", raw(b"\xff\xd0"), {"rax": 0x900}),
        Case("call *r11", raw(b"\x41\xff\xd3"), {"r11": 0x900}),
        Case("jmp *rax", raw(b"\xff\xe0"), {"rax": 0x900}),
        Case("call *disp(rip)", rip(b"\xff\x15"), {}),
        Case("jmp *disp(rip)", rip(b"\xff\x25"), {}),
        Case("call *8(rbx)", raw(b"\xff\x53\x08"), {"rbx": 0x1000 - 8}),
        Case("loop taken", rel(b"\xe2", 0x180, 1), {"rcx": 5}),
        Case("loop not taken", rel(b"\xe2", 0x180, 1), {"rcx": 1}),
        Case("loope zf clear", rel(b"\xe1", 0x180, 1), {"rcx": 5, "eflags": 0x2}),
        Case("loopne zf clear", rel(b"\xe0", 0x180, 1), {"rcx": 5, "eflags": 0x2}),
        Case("jrcxz taken", rel(b"\xe3", 0x180, 1), {"rcx": 0}),
        Case("jrcxz not taken", rel(b"\xe3", 0x180, 1), {"rcx": 7}),
        Case("jecxz upper bits", rel(b"\x67\xe3", 0x180, 1), {"rcx": 1 << 32}),
    ]


CASES = _cases()
# Register values that are text offsets, made absolute per layout.
_TEXT_RELATIVE = {"call *rax", "call *r11", "jmp *rax", "call *8(rbx)"}


class World:
    """One machine: text with data, a slot page, the mailbox and a stack."""

    def __init__(self, layout: Layout) -> None:
        self.lay = layout
        m = Machine()
        m.map(layout.text, 0x2000, b"\xf4")
        m.map(layout.slot & ~0xFFF, 0x1000, b"\xcc")
        m.map(layout.mailbox, 0x1000)
        m.map(layout.stack - 0x1000, 0x2000)
        m.start_paging(0xFFFFFFFFFF000000)
        self.m = m
        self.addr = layout.text + 0x100
        self.data = layout.text + 0x1000
        # data: a pointer into text (for indirect branches) then a pattern
        m.write(self.data, struct.pack("<QQ", layout.text + 0xA00, 0x1122334455667788))
        # the stack: a return address into text for ret, then a pattern
        self.rsp = layout.stack - 0x80
        m.write(self.rsp, struct.pack("<QQQ", layout.text + 0xB00, 0xAAAA, 0xBBBB))

    def set_regs(self, case: Case) -> None:
        rng = random.Random(case.name)
        regs = {r: rng.getrandbits(64) for r in GPRS}
        regs["rbx"] = self.data + 8  # harmless for pop/push/add, a pointer for stores
        regs.update(case.regs)
        if case.name in _TEXT_RELATIVE:
            for r in ("rax", "r11"):
                if r in case.regs:
                    regs[r] = self.lay.text + case.regs[r]
            if case.name == "call *8(rbx)":
                regs["rbx"] = self.lay.text + case.regs["rbx"]
        regs["rsp"] = self.rsp
        regs.setdefault("eflags", case.regs.get("eflags", 0x2 | 0x1 | 0x4))
        self.m.set_regs(regs)

    def snapshot(self) -> tuple[dict[str, int], bytes, bytes]:
        regs = self.m.regs()
        regs["eflags"] &= ARITH_FLAGS
        stack = self.m.read(self.lay.stack - 0x100, 0x100)
        data = self.m.read(self.data, 0x20)
        return regs, stack, data


@pytest.mark.parametrize("layout", [KERNEL, LOW], ids=["kernel-half", "low-4g"])
@pytest.mark.parametrize("post", [False, True], ids=["pre", "pre+post"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_slot_runs_like_the_original(case: Case, layout: Layout, post: bool) -> None:
    original = World(layout)
    code = case.build(original.addr, original.data)
    insn = decode(code + b"\x90" * 8, original.addr)
    assert insn.length == len(code)
    assert insn.kind is not InsnKind.REFUSED, insn.refusal
    from kprobevm.x86.ooline import POST_STORE_KINDS

    if post and insn.kind not in POST_STORE_KINDS:
        with pytest.raises(ProbeRefused, match="emulate it on the host"):
            make_slot_code(insn, layout.slot, mailbox=layout.mailbox, post_store=True)
        return

    original.m.write(original.addr, code)
    original.set_regs(case)
    original.m.run(original.addr, inside=(original.addr, original.addr + insn.length))
    want = original.snapshot()
    assert want[0]["rip"] != original.addr

    copy = World(layout)
    copy.m.write(copy.addr, b"\xcc" + code[1:])  # the probe's int3: the slot never reads it
    slot = make_slot_code(insn, layout.slot, mailbox=layout.mailbox, post_store=post)
    assert slot.length <= SLOT_SIZE
    assert slot.pre_store_end == layout.slot + 7
    copy.m.write(layout.slot, slot.bytes)
    copy.set_regs(case)
    executed = copy.m.run(
        layout.slot, inside=(layout.slot & ~0xFFF, (layout.slot & ~0xFFF) + 0x1000)
    )
    got = copy.snapshot()
    assert got[0] == want[0]
    assert got[1] == want[1], "stack differs"
    assert got[2] == want[2], "data differs"
    mailbox = copy.m.read(layout.mailbox, 1)[0]
    assert mailbox == (POST_VALUE if post else PRE_VALUE)
    if post:
        hit = [end for end, _ in slot.post_exits if end in executed]
        assert len(hit) == 1
        assert slot.resume_ip(hit[0]) == want[0]["rip"]


def test_relocate_refuses_a_target_out_of_reach() -> None:
    addr = 0xFFFFFFFF81000100
    insn = decode(b"\x48\x8b\x05\x00\x00\x00\x00", addr)
    assert relocate(insn, addr) == insn.bytes
    with pytest.raises(ProbeRefused, match="out of reach") as info:
        relocate(insn, 0xFFFF888000000000)
    assert info.value.code == "EINVAL"


def test_refused_instruction_gets_no_slot_code() -> None:
    insn = decode(b"\x0f\x0b", 0xFFFFFFFF81000100)
    with pytest.raises(ProbeRefused, match="ud2") as info:
        make_slot_code(insn, KERNEL.slot, mailbox=KERNEL.mailbox)
    assert info.value.code == "EOPNOTSUPP"


@pytest.mark.parametrize(
    "code", [b"\xff\xd4", b"\xff\x54\x24\x08"], ids=["call *rsp", "call *8(rsp)"]
)
def test_call_through_the_stack_pointer_is_refused(code: bytes) -> None:
    insn = decode(code, 0xFFFFFFFF81000100)
    with pytest.raises(ProbeRefused, match=r"rsp|push"):
        make_slot_code(insn, KERNEL.slot, mailbox=KERNEL.mailbox)


def test_slot_layout_without_pre_store_and_decoded_targets() -> None:
    addr = 0xFFFFFFFF81000100
    insn = decode(b"\x74\x10", addr)
    slot = make_slot_code(insn, KERNEL.slot, mailbox=KERNEL.mailbox, pre_store=False)
    assert slot.pre_store_end is None and slot.post_store_end is None
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    decoded = [(i.mnemonic, i.op_str) for i in md.disasm(slot.bytes, KERNEL.slot)]
    assert decoded == [("je", f"{addr + 0x12:#x}"), ("jmp", f"{addr + 2:#x}")]


def test_slot_too_far_from_the_mailbox_is_an_error() -> None:
    insn = decode(b"\x90", 0xFFFFFFFF81000100)
    with pytest.raises(KprobeError, match="out of rel32 reach"):
        make_slot_code(insn, KERNEL.slot, mailbox=0xFFFF888000000000)
