"""The host's writer of the #BP stub's hash table agrees with the stub's own probing:
after inserts it holds what ``table_image`` says the stub expects, and removals leave
tombstones that keep later keys on a chain reachable."""

from __future__ import annotations

import struct

import pytest

from kprobevm.errors import KprobeError
from kprobevm.trap.stubtable import TABLE_SLOTS, StubTable
from kprobevm.x86.stub import TOMBSTONE, probe_sequence, stub_hash, table_image

BASE = 0xFFFFFFFFFE010000


class _FlatMemory:
    """Guest-physical bytes, as much as the table needs."""

    def __init__(self) -> None:
        self.data = bytearray(16 * TABLE_SLOTS)

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.data[paddr : paddr + len(data)] = data


class _IdentityArea:
    def phys(self, vaddr: int) -> int:
        return vaddr - BASE


def _table() -> tuple[StubTable, _FlatMemory]:
    memory = _FlatMemory()
    return StubTable(memory, _IdentityArea(), BASE), memory  # type: ignore[arg-type]


def _colliding(n: int) -> list[int]:
    """``n`` kernel text addresses with the same first index."""
    found: list[int] = []
    addr = 0xFFFFFFFF81000000
    first = stub_hash(addr, TABLE_SLOTS)
    while len(found) < n:
        if stub_hash(addr, TABLE_SLOTS) == first:
            found.append(addr)
        addr += 1
    return found


def test_inserts_give_the_image_the_stub_expects() -> None:
    table, memory = _table()
    entries = {0xFFFFFFFF81000000 + 0x1000 * i: 0xFFFFFFFFFE200000 + 128 * i for i in range(50)}
    for addr, slot in entries.items():
        table.insert(addr, slot)
    assert bytes(memory.data) == table_image(entries, TABLE_SLOTS)


def test_remove_leaves_a_tombstone_and_the_chain_stays_reachable() -> None:
    table, memory = _table()
    a, b, c = _colliding(3)
    for i, addr in enumerate((a, b, c)):
        table.insert(addr, 0x100 * (i + 1))
    table.remove(b)
    indexes = list(probe_sequence(a, TABLE_SLOTS))[:3]
    keys = [struct.unpack_from("<Q", memory.data, 16 * i)[0] for i in indexes]
    assert keys == [a, TOMBSTONE, c]
    table.insert(b, 0x999)  # reuses the tombstone, before c
    assert struct.unpack_from("<QQ", memory.data, 16 * indexes[1]) == (b, 0x999)
    table.insert(c, 0x777)  # an existing key is replaced in place
    assert struct.unpack_from("<QQ", memory.data, 16 * indexes[2]) == (c, 0x777)


def test_a_full_table_is_refused() -> None:
    table, _ = _table()
    table.keys = [0xFFFFFFFF80000000 + i for i in range(TABLE_SLOTS)]
    with pytest.raises(KprobeError, match="full"):
        table.insert(0xFFFFFFFF81234567, 0x1)
