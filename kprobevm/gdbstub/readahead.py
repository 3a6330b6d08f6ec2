"""Guest reads of one probe hit in one gdbstub round trip, where the last hit predicts them.

A trace event reads the same things at every hit: the registers, ``current``, its pid
and comm, the strings its arguments point at; in a hot loop most of those addresses
repeat from one hit to the next. :class:`HitReader` sends the previous hit's reads (per
event and vCPU) in the round trip of the register read, serves this hit's reads from
them where they fall inside, and reads the rest as usual. A wrong guess costs only
bytes: everything in the batch is memory of this very stop.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence

from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.x86.ptregs import PtRegs

__all__ = ["HitReader", "ReadPredictor"]

MAX_BATCH = 16  # reads sent ahead per hit; a trace event makes a handful


class ReadPredictor:
    """The reads each vCPU made at an event's last hit."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[tuple[int, int], ...]] = {}

    def guess(self, cpu: int) -> tuple[tuple[int, int], ...]:
        return self._last.get(cpu, ())

    def remember(self, cpu: int, reads: Sequence[tuple[int, int]]) -> None:
        # each distinct read once: two arguments may read the same string
        self._last[cpu] = tuple(dict.fromkeys(reads))[:MAX_BATCH]


class HitReader(GuestMemory):
    """Guest memory for one hit, answered from a batch read ahead where it can be."""

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory.transport, memory.direct)
        self._batch: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        """Every (address, size) this hit read, in order: the next hit's guess."""
        self.served = 0

    def read_ahead(self, regs: PtRegs, guess: Sequence[tuple[int, int]]) -> None:
        """Read ``guess`` in the round trip of ``regs``'s register read, if that is still
        due; a guess the guest refuses (unmapped now) is simply not in the batch."""
        if not guess:
            return
        replies = regs.read_along([b"m%x,%x" % (a, n) for a, n in guess])
        if replies is None:
            return
        for (address, size), reply in zip(guess, replies, strict=True):
            if len(reply) == 2 * size:
                try:
                    self._batch.append((address, binascii.unhexlify(reply)))
                except binascii.Error:
                    continue

    def read(self, addr: int, n: int) -> bytes:
        self.reads.append((addr, n))
        for start, data in self._batch:
            offset = addr - start
            if offset >= 0 and offset + n <= len(data):
                self.served += 1
                return data[offset : offset + n]
        return super().read(addr, n)
