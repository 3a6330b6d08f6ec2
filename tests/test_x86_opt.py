"""Which instructions an optimized probe's jump may cover (the decoder's rules, on
hand-assembled functions), and the slot code that copies them."""

from __future__ import annotations

import struct

from kprobevm.x86.insn import Insn, InsnKind, decode
from kprobevm.x86.ooline import make_slot_code
from kprobevm.x86.opt import OptRegion, find_region

BASE = 0xFFFFFFFF81000000
SLOT = 0xFFFFFFFFFEE01000
MAILBOX = 0xFFFFFFFFFEE00000
NOP5 = bytes.fromhex("0f1f440000")
PUSHES = bytes.fromhex("4157 4156 4155 4154")  # push r15, r14, r13, r12
RET = b"\xc3"


def _free(lo: int, hi: int) -> str | None:
    return None


def _region(code: bytes, offset: int = 5, **kw: object) -> OptRegion | str:
    reserved = kw.get("reserved", _free)
    fixup = kw.get("fixup", lambda addr: None)
    return find_region(code, BASE, BASE + offset, reserved=reserved, fixup=fixup)  # type: ignore[arg-type]


def _jne_to(at: int, target: int) -> bytes:
    """``jne target`` (``0f 85 rel32``) placed at ``at``."""
    return b"\x0f\x85" + struct.pack("<i", target - (at + 6))


def test_plain_instructions_after_the_nop_are_covered_up_to_five_bytes() -> None:
    region = _region(NOP5 + PUSHES + RET)
    assert isinstance(region, OptRegion), region
    assert [i.addr - BASE for i in region.insns] == [5, 7, 9]
    assert region.end == BASE + 11 and region.original == PUSHES[:6]


def test_a_branch_into_the_covered_bytes_refuses_but_one_to_the_probe_does_not() -> None:
    body = NOP5 + PUSHES
    inside = body + _jne_to(BASE + len(body), BASE + 7) + RET
    assert "lands inside the jump, at 0xffffffff81000007" in str(_region(inside))
    to_probe = body + _jne_to(BASE + len(body), BASE + 5) + RET
    assert isinstance(_region(to_probe), OptRegion)
    past = body + _jne_to(BASE + len(body), BASE + 11) + RET  # the first byte after it
    assert isinstance(_region(past), OptRegion)


def test_only_plain_instructions_are_covered() -> None:
    call = NOP5 + b"\x41\x57" + b"\xe8" + struct.pack("<i", 0x100) + RET
    assert "is not a plain instruction (call_rel)" in str(_region(call))
    ret = NOP5 + b"\x41\x57" + RET + PUSHES
    assert "is not a plain instruction (ret)" in str(_region(ret))


def test_an_indirect_jump_anywhere_in_the_function_refuses() -> None:
    code = NOP5 + PUSHES + b"\xff\xe0" + RET  # jmp *%rax
    assert "an indirect jump at" in str(_region(code))


def test_too_close_to_the_end_of_the_function() -> None:
    code = NOP5 + PUSHES[:4] + RET  # 5 bytes left, but the ret is not plain
    assert "not a plain instruction" in str(_region(code))
    assert "fewer than 5 bytes" in str(_region(NOP5 + PUSHES[:2] + RET + RET, offset=6))


def test_what_the_caller_reserves_refuses() -> None:
    code = NOP5 + PUSHES + RET
    seen: list[tuple[int, int]] = []

    def reserved(lo: int, hi: int) -> str | None:
        seen.append((lo, hi))
        return "jump label at 0x1 under the jump"

    assert _region(code, reserved=reserved) == "jump label at 0x1 under the jump"
    assert seen == [(BASE + 5, BASE + 11)]
    fixup = _region(code, fixup=lambda a: "an exception-table entry" if a == BASE + 13 else None)
    assert "an exception-table entry: its fixup may jump back" in str(fixup)


def _decode_all(code: bytes, at: int) -> list[Insn]:
    out = []
    end = at + len(code)
    while at < end:
        insn = decode(code[at - SLOT :], at)
        out.append(insn)
        at = insn.next_addr
    return out


def test_slot_code_copies_every_covered_instruction_and_goes_on_after_them() -> None:
    data = BASE + 0x2000
    mov = b"\x48\x8b\x05" + struct.pack("<i", data - (BASE + 7 + 7))  # mov data(%rip), %rax
    region = _region(NOP5 + b"\x41\x57" + mov + RET)
    assert isinstance(region, OptRegion) and len(region.insns) == 2
    code = make_slot_code(region.insns[0], SLOT, mailbox=MAILBOX, covers=region.insns)
    store, brk, push, load, back = _decode_all(code.bytes, SLOT)
    assert store.rip_target == MAILBOX and brk.kind is InsnKind.JMP_REL
    assert push.bytes == b"\x41\x57"
    assert load.mnemonic == "mov" and load.rip_target == data  # relocated, same operand
    assert back.kind is InsnKind.JMP_REL and back.target == region.end == BASE + 14
    cont = make_slot_code(region.insns[0], SLOT, mailbox=MAILBOX, pre_store=False,
                          covers=region.insns)  # fmt: skip
    push, load, back = _decode_all(cont.bytes, SLOT)
    assert load.rip_target == data and back.target == region.end
