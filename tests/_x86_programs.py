"""Representative parameters for every guest program kprobevm generates, and their outputs.

``tests/data/x86_programs.json`` holds the bytes (and the addresses the host relies on)
each case produced when the programs were hand-encoded; ``test_x86_golden`` keeps every
later encoder to them, and ``test_x86_listing`` assembles each case's listing with GNU
as. Regenerate the golden file only for a deliberate change of a program::

    PYTHONPATH=. python -m tests._x86_programs > tests/data/x86_programs.json
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kprobevm.x86 import record as rec
from kprobevm.x86.insn import decode
from kprobevm.x86.ooline import POST_STORE_KINDS, make_slot_code
from kprobevm.x86.record import Capture, CopyHelpers, RecordLayout, RingLayout
from kprobevm.x86.rethook import assemble_trampoline, build_trampoline
from kprobevm.x86.stub import build_int3_stub

GOLDEN = Path(__file__).parent / "data" / "x86_programs.json"

Facts = dict[str, object]
"""What one case produced: ``code`` as hex, plus the addresses the host relies on."""


@dataclass(frozen=True)
class Built:
    """One case's output: the facts kept in the golden file, and the program's listing."""

    facts: Facts
    listing: str

    @property
    def code(self) -> bytes:
        """The program's bytes, as the public builder returned them."""
        return bytes.fromhex(str(self.facts["code"]))


_KTEXT = 0xFFFFFFFF81000000
_SLOTS = 0xFFFFFFFFA0000000
_LOW_TEXT = 0x81000000  # above 2 GiB: return addresses that do not sign-extend


def _stub(base: int, table: int, slots: int, real: int) -> Built:
    stub = build_int3_stub(base, table=table, table_slots=slots, real_handler=real,
                           vanished=base + 0x3FF8)  # fmt: skip
    return Built({"code": stub.code.hex(), "offsets": dict(stub.offsets)}, stub.listing)


def _stub_cases() -> dict[str, Callable[[], Built]]:
    params = [
        (_SLOTS, _SLOTS + 0x1000, 16, _KTEXT + 0x1234),
        (_SLOTS + 0x40, _SLOTS + 0x2000, 2, _KTEXT + 0xF00),
        (_SLOTS + 3, 0xFFFF888012340000, 1024, _KTEXT + 0x10),
        (_SLOTS + 0x800, 0x7FFF0000, 1 << 30, 0xFFFFFFFF80000000),
    ]
    return {f"stub{n}_slots{p[2]}": partial(_stub, *p) for n, p in enumerate(params)}


def _trampoline(base: int, table: int, entries: int, mailbox: int) -> Built:
    code, store_end = build_trampoline(base, table=table, entries=entries, mailbox=mailbox)
    program = assemble_trampoline(base, table=table, entries=entries, mailbox=mailbox)
    return Built({"code": code.hex(), "store_end": store_end}, program.listing)


def _trampoline_cases() -> dict[str, Callable[[], Built]]:
    params = [
        (_SLOTS + 0x3000, _SLOTS + 0x4000, 64, _SLOTS + 0x5000),
        (_SLOTS + 0x3010, 0xFFFF888000100000, 1, _SLOTS - 0x7000000),
        (0xA0003000, 0x10000, 4096, 0xA0001000),
    ]
    return {f"trampoline{n}": partial(_trampoline, *p) for n, p in enumerate(params)}


_RING = RingLayout(
    head=_SLOTS + 0x2000, tail=_SLOTS + 0x2040, drain=_SLOTS + 0x2080, busy=_SLOTS + 0x2100,
    max_cpus=256, counters=_SLOTS + 0x3000, ring=_SLOTS + 0x4000, ring_size=0x1000,
    high_water=0x800,
)  # fmt: skip
# Small numbers where the program keeps a 32-bit field anyway, and a ring behind the program.
_RING_SMALL = RingLayout(
    head=_SLOTS - 0x10000, tail=_SLOTS - 0xFF00, drain=_SLOTS - 0xFE00, busy=_SLOTS - 0xFD00,
    max_cpus=8, counters=_SLOTS - 0xF000, ring=_SLOTS + 0x100000, ring_size=1 << 20,
    high_water=64,
)  # fmt: skip
_HELPERS = CopyHelpers(
    copy_from_kernel=_KTEXT + 0x100000, copy_from_user=_KTEXT + 0x100010,
    strncpy_from_kernel=_KTEXT + 0x100020, strncpy_from_user=_KTEXT + 0x100030,
    cpu_number=0x40, current_task=0x21C80, task_pid=0x5A0, task_comm=0x7B8,
)  # fmt: skip
_LAYOUTS = {
    "bare": RecordLayout(()),
    "regs": RecordLayout((Capture(0, 8, reg="di"), Capture(-0x18, 16, reg="sp"))),
    "every_read": RecordLayout(
        (
            Capture(0x10, 8, reg="si"),
            Capture(8, 4, from_capture=0),
            Capture(0xFFFF888000400000, 32, string=True),
            Capture(0x601000, 64, reg="dx", string=True, user=True),
            Capture(-8, 4096, reg="r15", user=True),
            Capture(0, 1, reg="flags"),
        )
    ),
}


_PROGRAM = _SLOTS + 0x8000
_CONT = _SLOTS + 0x40
Probes = tuple[tuple[int, RecordLayout], ...]


def _record(probes: Probes, ring: RingLayout, ip: int) -> Built:
    program = rec.build_record_program(
        _PROGRAM, probes=probes, probe_ip=ip, ring=ring, helpers=_HELPERS, cont=_CONT
    )
    return Built({"code": program.code.hex()}, program.listing)


def _count(counters: tuple[int, ...]) -> Built:
    program = rec.build_count_program(_PROGRAM, counters=counters, cont=_CONT)
    return Built({"code": program.code.hex()}, program.listing)


def _record_cases() -> dict[str, Callable[[], Built]]:
    params: dict[str, tuple[Probes, RingLayout, int]] = {
        "bare": (((0, _LAYOUTS["bare"]),), _RING, _KTEXT + 0x123),
        "regs": (((7, _LAYOUTS["regs"]),), _RING, _KTEXT + 0x4560),
        "every_read": (((3, _LAYOUTS["every_read"]),), _RING, _KTEXT + 0x77),
        "two_probes": (((1, _LAYOUTS["regs"]), (2, _LAYOUTS["bare"])), _RING, _KTEXT),
        "small_ring_fields": (((9, _LAYOUTS["every_read"]),), _RING_SMALL, _KTEXT + 0x9),
    }
    cases: dict[str, Callable[[], Built]] = {
        f"record_{name}": partial(_record, *p) for name, p in params.items()
    }
    counters = ((_SLOTS + 0x3000,), (_SLOTS + 0x3000, _SLOTS + 0x3010, _SLOTS - 0x7FFF0000))
    cases.update({f"count{n}": partial(_count, c) for n, c in enumerate(counters)})
    return cases


def _rel(op: bytes, end_pad: int, target: int, at: int, size: int) -> bytes:
    """``op`` then a rel field reaching ``target`` from an instruction at ``at``."""
    end = at + len(op) + size + end_pad
    return op + struct.pack("<i" if size == 4 else "<b", target - end)


# (name, instruction bytes given its address): every kind the slot code rebuilds.
_INSNS: list[tuple[str, Callable[[int], bytes]]] = [
    ("push_rbp", lambda a: b"\x55"),
    ("nop5", lambda a: bytes.fromhex("0f1f440000")),
    ("mov_rip", lambda a: _rel(b"\x48\x8b\x05", 0, a + 0x1000, a, 4)),
    ("cmpl_imm_rip", lambda a: _rel(b"\x83\x3d", 1, a - 0x2000, a, 4) + b"\x05"),
    ("jmp8", lambda a: _rel(b"\xeb", 0, a + 0x40, a, 1)),
    ("jmp32", lambda a: _rel(b"\xe9", 0, a - 0x900, a, 4)),
    ("je8", lambda a: _rel(b"\x74", 0, a + 0x12, a, 1)),
    ("jl32", lambda a: _rel(b"\x0f\x8c", 0, a + 0x4000, a, 4)),
    ("call32", lambda a: _rel(b"\xe8", 0, a + 0x800, a, 4)),
    ("cs_call32", lambda a: _rel(b"\x2e\xe8", 0, a + 0x800, a, 4)),
    ("loop", lambda a: _rel(b"\xe2", 0, a - 0x10, a, 1)),
    ("loope", lambda a: _rel(b"\xe1", 0, a + 0x20, a, 1)),
    ("loopne", lambda a: _rel(b"\xe0", 0, a + 0x20, a, 1)),
    ("jrcxz", lambda a: _rel(b"\xe3", 0, a + 0x7F, a, 1)),
    ("jecxz", lambda a: _rel(b"\x67\xe3", 0, a - 0x7D, a, 1)),
    ("ret", lambda a: b"\xc3"),
    ("ret_imm", lambda a: b"\xc2\x10\x00"),
    ("jmp_rax", lambda a: b"\xff\xe0"),
    ("jmp_r11", lambda a: b"\x41\xff\xe3"),
    ("jmp_mem_rip", lambda a: _rel(b"\xff\x25", 0, a + 0x3000, a, 4)),
    ("call_rax", lambda a: b"\xff\xd0"),
    ("call_r11", lambda a: b"\x41\xff\xd3"),
    ("call_r15", lambda a: b"\x41\xff\xd7"),
    ("call_mem_rip", lambda a: _rel(b"\xff\x15", 0, a + 0x3000, a, 4)),
    ("call_8_rbx", lambda a: b"\xff\x53\x08"),
    ("call_rax_rcx8", lambda a: b"\xff\x14\xc8"),
]
# (name, text address, slot address, mailbox)
_SLOT_PLACES = [
    ("kernel", _KTEXT + 0x100, _SLOTS + 0x40, _SLOTS + 0x1000),
    ("low", _LOW_TEXT + 0x100, 0xA0000040, 0xA0001000),
]


@dataclass(frozen=True)
class _SlotOptions:
    pre_store: bool = True
    post_store: bool = False
    own_pre_mailbox: bool = False  # the pre store writes next to the mailbox


_SLOT_OPTIONS = {
    "pre": _SlotOptions(),
    "post": _SlotOptions(post_store=True),
    "bare": _SlotOptions(pre_store=False),
    "own_pre_mailbox": _SlotOptions(post_store=True, own_pre_mailbox=True),
}


def _slot_case(insn_bytes: bytes, addr: int, slot: int, mailbox: int, opt: _SlotOptions) -> Built:
    s = make_slot_code(
        decode(insn_bytes, addr),
        slot,
        mailbox=mailbox,
        pre_mailbox=mailbox + 0x10 if opt.own_pre_mailbox else None,
        pre_store=opt.pre_store,
        post_store=opt.post_store,
    )
    facts: Facts = {
        "code": s.bytes.hex(),
        "pre_store_end": s.pre_store_end,
        "post_exits": [list(e) for e in s.post_exits],
    }
    return Built(facts, s.listing)


def _slot_cases() -> dict[str, Callable[[], Built]]:
    cases: dict[str, Callable[[], Built]] = {}
    for iname, build in _INSNS:
        for pname, addr, slot, mailbox in _SLOT_PLACES:
            code = build(addr)
            for oname, opt in _SLOT_OPTIONS.items():
                if opt.post_store and decode(code, addr).kind not in POST_STORE_KINDS:
                    continue
                cases[f"slot_{iname}_{pname}_{oname}"] = partial(
                    _slot_case, code, addr, slot, mailbox, opt
                )
    return cases


def cases() -> dict[str, Callable[[], Built]]:
    """Every case by name: a call builds the program and returns what it produced."""
    return {**_stub_cases(), **_trampoline_cases(), **_record_cases(), **_slot_cases()}


def main() -> None:
    """Print the golden file for the current encoders."""
    out = {name: build().facts for name, build in cases().items()}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
