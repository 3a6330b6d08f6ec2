"""The probe hash table the #BP stub reads in guest memory: probe address -> slot.

Open addressing with linear probing over 16-byte entries (u64 key, u64 slot entry);
the stub hashes the trapping address the same way (:func:`kprobevm.x86.stub.stub_hash`).
A removed key leaves a tombstone so that later keys on the same chain stay reachable.
The host keeps a copy of the keys and writes each entry physically, 16 bytes at once.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError
from kprobevm.x86.stub import EMPTY, ENTRY_SIZE, TOMBSTONE, probe_sequence

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.x86.slotmap import SlotArea

__all__ = ["TABLE_SLOTS", "StubTable"]

TABLE_SLOTS = 4096
"""Entries: 64 KiB, good for 2,048 probes at half load."""
_ENTRY = struct.Struct("<QQ")  # key, slot entry: ENTRY_SIZE bytes


class StubTable:
    """The table at ``base`` (contiguous pages of ``area``)."""

    def __init__(self, memory: GuestMemory, area: SlotArea, base: int) -> None:
        self.memory = memory
        self.area = area
        self.base = base
        self.keys = [EMPTY] * TABLE_SLOTS

    def _write(self, index: int, key: int, value: int) -> None:
        self.memory.write_phys(self.area.phys(self.base + ENTRY_SIZE * index),
                               _ENTRY.pack(key, value))  # fmt: skip
        self.keys[index] = key

    def insert(self, addr: int, slot_entry: int) -> None:
        """Map ``addr`` to ``slot_entry`` (replacing its entry if it has one)."""
        free = None
        for index in probe_sequence(addr, TABLE_SLOTS):
            key = self.keys[index]
            if key == addr:
                free = index
                break
            if key == TOMBSTONE and free is None:
                free = index
            if key == EMPTY:
                if free is None:
                    free = index
                break
        if free is None:
            raise KprobeError("the stub's probe table is full", address=addr)
        self._write(free, addr, slot_entry)

    def remove(self, addr: int) -> None:
        """Forget ``addr`` (a no-op when it is not in the table)."""
        for index in probe_sequence(addr, TABLE_SLOTS):
            key = self.keys[index]
            if key == addr:
                self._write(index, TOMBSTONE, 0)
                return
            if key == EMPTY:
                return
