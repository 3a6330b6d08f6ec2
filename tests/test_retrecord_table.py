"""The host's side of recorded return probes over fake memory, no QEMU: calls in flight
follow their function's return program when it is rebuilt or dropped, lose a retired
probe's bit, and get their return addresses back at close."""

from __future__ import annotations

import struct
from typing import cast

from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.kprobes.retrecord import GUEST_ENTRIES, ReturnRecords
from kprobevm.x86.rethook import ENTRY
from kprobevm.x86.slotmap import SlotArea
from tests.test_recorder_accounting import _Area, _Ram

TABLE, INFO, TRAMPOLINE = 0xFFFFFFFFFD000000, 0xFFFFFFFFFD001000, 0xFFFFFFFFFD002000
SLOT, CALLER, PROGRAM, OTHER = 0xFFFFC90000003FF8, 0xFFFFFFFF81234567, 0xFFFFFFFFFE100000, 0


def _table() -> tuple[_Ram, ReturnRecords]:
    ram = _Ram()
    returns = ReturnRecords(GuestMemory(ram), cast("SlotArea", _Area()), table=TABLE, info=INFO,
                            trampoline=TRAMPOLINE)  # fmt: skip
    return ram, returns


def _in_flight(ram: _Ram, index: int, mask: int, program: int, slot: int = SLOT) -> None:
    """A call the guest's hijack took, as it leaves the table and the stack."""
    ram.write_memory(TABLE + ENTRY * index, struct.pack("<QQ", slot, CALLER))
    ram.write_memory(INFO + ENTRY * index, struct.pack("<QQ", mask, program))
    ram.write_memory(slot, struct.pack("<Q", TRAMPOLINE))


def _u64(ram: _Ram, addr: int) -> int:
    value: int = struct.unpack("<Q", ram.read_memory(addr, 8))[0]
    return value


def test_bits_are_given_and_taken_back() -> None:
    ram, returns = _table()
    returns.add(7, maxactive=4)
    returns.add(9, maxactive=2)
    bits = {i: b.bit for i, b in returns.bounds.items()}
    assert bits == {7: 0, 9: 1}
    ram.write_memory(returns.table.actives, struct.pack("<Q", 3))  # its old instances
    returns.release(7)
    for probe_id in range(100, 200):  # released bits are handed out again last
        returns.add(probe_id, maxactive=1)
        if returns.bounds[probe_id].bit == 0:
            break
    assert returns.bounds[probe_id].bit == 0 and _u64(ram, returns.table.actives) == 0


def test_calls_in_flight_follow_their_program() -> None:
    ram, returns = _table()
    _in_flight(ram, 0, 0b1, PROGRAM)
    _in_flight(ram, 3, 0b1, OTHER + 0x1000, slot=SLOT - 0x100)
    assert returns.redirect(PROGRAM, PROGRAM + 0x800) == 1
    assert _u64(ram, INFO + 8) == PROGRAM + 0x800
    assert _u64(ram, INFO + ENTRY * 3 + 8) == OTHER + 0x1000
    assert returns.redirect(PROGRAM + 0x800, 0) == 1  # the function has none left
    assert _u64(ram, INFO + 8) == 0


def test_a_retired_probe_leaves_the_masks() -> None:
    ram, returns = _table()
    returns.add(7, maxactive=4)
    returns.add(9, maxactive=4)
    _in_flight(ram, 0, 0b11, PROGRAM)
    assert returns.forget(7) == 1
    assert _u64(ram, INFO) == 0b10
    assert returns.forget(7) == 0


def test_close_gives_every_pending_return_back() -> None:
    ram, returns = _table()
    _in_flight(ram, 0, 1, PROGRAM)
    _in_flight(ram, GUEST_ENTRIES - 1, 1, PROGRAM, slot=SLOT - 0x200)
    ram.write_memory(SLOT - 0x200, struct.pack("<Q", 0x1234))  # that call came back since
    assert returns.unhijack() == 1
    assert _u64(ram, SLOT) == CALLER and _u64(ram, SLOT - 0x200) == 0x1234
    assert _u64(ram, TABLE) == SLOT  # the entry stays, for a vCPU inside the trampoline
