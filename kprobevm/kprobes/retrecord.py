"""Recorded return probes: the guest's part of the return table, and each function's
hijack and return programs (:mod:`kprobevm.x86.retrecord`).

A return probe whose handler reads only what a record holds is recorded like an entry
probe: its entry kprobe carries a :class:`~kprobevm.kprobes.recorder.RecordSpec` with
``at_return``, and the guest both hijacks the call's return at the entry and records
the return, with no VM stop. The first :data:`GUEST_ENTRIES` entries of the return table
are the guest's (the host's own return probes take the others), and a page beside the
table holds each entry's probe mask and return program.

A call in flight keeps its function's return program: when the program is rebuilt (a
probe comes or goes on the function) the entries that name the old one are pointed at
the new one, and when the function has no recorded return probe left, at none: such a
return then stops at the trampoline's watched store, which the host counts as stale.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kprobevm.errors import GuestFaultError, ProbeRefused
from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.x86 import record as rec
from kprobevm.x86.funclatency import STAMP, LatencyMap
from kprobevm.x86.rethook import ENTRY
from kprobevm.x86.retrecord import (
    MAX_RETURN_PROBES,
    ReturnProbe,
    ReturnTable,
    build_hijack_program,
    build_return_program,
)
from kprobevm.x86.slotmap import SlotArea

__all__ = ["GUEST_ENTRIES", "ReturnRecords"]

GUEST_ENTRIES = 64
"""Calls in flight at once through recorded return probes (their table entries)."""
_ENTRY = struct.Struct("<QQ")
_STAMPS_AT = 2048  # past the active counts (8 bytes per probe bit)


@dataclass(frozen=True)
class _Bound:
    """A recorded return probe's bit and bound."""

    bit: int
    maxactive: int


class ReturnRecords:
    """The bits, counters and table entries of recorded return probes (VM stopped)."""

    def __init__(
        self, memory: GuestMemory, area: SlotArea, *, table: int, info: int, trampoline: int
    ) -> None:
        """``table``: the return table (the guest's entries first); ``info``: its parallel
        page; ``trampoline``: the return trampoline. Maps the page of active counts."""
        self.memory = memory
        actives = area.map_page(executable=False, writable=True)
        stamps = actives + _STAMPS_AT  # the page's second half: latency probes' stamps
        memory.write(stamps, bytes(STAMP * GUEST_ENTRIES))
        self.table = ReturnTable(
            table=table, entries=GUEST_ENTRIES, info=info, actives=actives,
            trampoline=trampoline, stamps=stamps,
        )  # fmt: skip
        self.bounds: dict[int, _Bound] = {}
        """Record id -> its bit and maxactive."""
        self._free_bits = list(range(MAX_RETURN_PROBES))

    def add(self, probe_id: int, maxactive: int) -> None:
        """A bit for the return probe with record id ``probe_id``."""
        if not self._free_bits:
            raise ProbeRefused("ENOSPC", f"more than {MAX_RETURN_PROBES} recorded return probes")
        bit = self._free_bits.pop(0)
        self.memory.write(self.table.actives + 8 * bit, bytes(8))
        self.bounds[probe_id] = _Bound(bit, maxactive)

    def forget(self, probe_id: int) -> int:
        """Take the bit of a retired probe out of the calls in flight (VM stopped, once no
        vCPU can be inside a hijack that set it), so that a probe given the bit later
        neither records their returns nor counts them as its instances; how many."""
        bound = self.bounds.get(probe_id)
        if bound is None:
            return 0
        cleared = 0
        for i, _, _, _ in self._entries():
            at = self.table.info + ENTRY * i
            mask = self.memory.u64(at)
            if mask >> bound.bit & 1:
                self.memory.write(at, struct.pack("<Q", mask & ~(1 << bound.bit)))
                cleared += 1
        return cleared

    def release(self, probe_id: int) -> None:
        """The id is free again (settled: no vCPU is inside its programs any more)."""
        bound = self.bounds.pop(probe_id, None)
        if bound is not None:
            self._free_bits.append(bound.bit)

    def probes(
        self,
        ids: list[int],
        layouts: dict[int, rec.RecordLayout],
        latency: dict[int, LatencyMap] | None = None,
    ) -> tuple[ReturnProbe, ...]:
        """The return probes among record ids ``ids``, in the site's order; those in
        ``latency`` count their calls' latency there instead of recording."""
        latency = latency or {}
        return tuple(
            ReturnProbe(self.bounds[i].bit, i, self.bounds[i].maxactive, layouts[i],
                        latency.get(i))
            for i in ids if i in self.bounds
        )  # fmt: skip

    def hijack(
        self,
        at: int,
        probes: tuple[ReturnProbe, ...],
        *,
        ring: rec.RingLayout,
        program: int,
        cont: int,
    ) -> bytes:
        """The entry's hijack code at ``at``, going on at ``cont``."""
        return build_hijack_program(
            at, probes=probes, returns=self.table, ring=ring, program=program, cont=cont
        ).code

    def hijack_size(self, probes: tuple[ReturnProbe, ...], *, ring: rec.RingLayout) -> int:
        """Bytes of the hijack code (its shape does not depend on addresses)."""
        t = self.table
        return len(self.hijack(t.trampoline, probes, ring=ring, program=t.trampoline,
                               cont=t.trampoline))  # fmt: skip

    def return_program(
        self,
        at: int,
        probes: tuple[ReturnProbe, ...],
        *,
        ring: rec.RingLayout,
        helpers: rec.CopyHelpers,
    ) -> bytes:
        """The return program at ``at``; ``probes`` in the order they run at the entry.
        Their records are written the last hooked first, as the kernel's rethook runs
        the handlers."""
        return build_return_program(
            at, probes=probes[::-1], returns=self.table, ring=ring, helpers=helpers
        ).code

    # -- calls in flight (VM stopped) ---------------------------------------------------

    def _entries(self) -> list[tuple[int, int, int, int]]:
        """The guest's entries in use: (index, slot, real return address, program)."""
        t, memory = self.table, self.memory
        raw = memory.read(t.table, ENTRY * t.entries)
        info = memory.read(t.info, ENTRY * t.entries)
        out = []
        for i in range(t.entries):
            slot, ret = _ENTRY.unpack_from(raw, ENTRY * i)
            if slot:
                out.append((i, slot, ret, _ENTRY.unpack_from(info, ENTRY * i)[1]))
        return out

    def redirect(self, old: int, new: int) -> int:
        """Point the calls in flight whose return program is ``old`` at ``new`` (0: none,
        they stop at the trampoline's store); how many."""
        moved = 0
        for i, _, _, program in self._entries():
            if program == old:
                self.memory.write(self.table.info + ENTRY * i + 8, struct.pack("<Q", new))
                moved += 1
        return moved

    def unhijack(self) -> int:
        """Give every call in flight its real return address back (VM stopped); the
        entries stay, for a vCPU already inside the trampoline. How many."""
        restored = 0
        trampoline = self.table.trampoline
        for _, slot, ret, _ in self._entries():
            try:
                pending = self.memory.u64(slot) == trampoline
            except GuestFaultError:
                pending = False  # the task and its stack are gone
            if pending:
                self.memory.write(slot, struct.pack("<Q", ret))
                restored += 1
        return restored
