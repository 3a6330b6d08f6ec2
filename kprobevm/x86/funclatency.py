"""funclatency as guest code: a call's entry time kept at the hijack, its latency folded
into a per-CPU log2 histogram by the return program. No stop, no record.

The hijack of a recorded return (:mod:`kprobevm.x86.retrecord`) that carries a latency
probe also writes a *stamp* for the call: the stack slot of its return address (the call
instance's key, as the return table's) and the TSC, in that order, before the slot is
hijacked. At the return, the return program reads the TSC again, finds the call's stamp
by the slot and takes it (``lock cmpxchg`` of the slot to 0, so a stamp another CPU's
hijack is rewriting is never used half old), and turns the cycles into the probe's unit
with the guest kernel's own ``tsc_khz`` (``cycles * 10**6 / tsc_khz`` nanoseconds): the
clock the record program stamps records with, one instruction and no kernel call (a
probed function may be the kernel's clock code itself). The delta's log2 bucket of this
CPU's region of the map is counted, with interrupts off, as the aggregate program counts
(:mod:`kprobevm.x86.aggregate`).

A stamp left by a call whose return no latency program saw (its probe went away while it
was in flight) may still hold the slot; it is older than the live call's, so the latest
stamp at the slot is the one taken. A return with no stamp, a CPU the map has no region
for, or a delta too large to scale (over 2**63 / 10**6 cycles) is a missed hit.
A delta below zero (a TSC behind the entry's) goes to bucket 0, as a negative value
does in a log2 histogram.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kprobevm.x86 import asm
from kprobevm.x86.aggregate import HEADER_SIZE, MapLayout
from kprobevm.x86.asm import mem, rip

if TYPE_CHECKING:
    from kprobevm.x86.record import CopyHelpers, RingLayout
    from kprobevm.x86.retrecord import ReturnProbe, ReturnTable

__all__ = [
    "STAMP",
    "UNITS",
    "LatencyMap",
    "LatencyScale",
    "Unit",
    "emit_latency",
    "emit_stamp",
]

Unit = Literal["ns", "us", "ms"]
UNITS: dict[Unit, int] = {"ns": 10**6, "us": 10**3, "ms": 1}
"""Each unit's count per millisecond: ``cycles * UNITS[unit] / tsc_khz`` is the unit."""
STAMP = 16
"""A call's stamp: u64 stack slot (0: none), u64 TSC at the entry."""


@dataclass(frozen=True)
class LatencyScale:
    """How a TSC delta becomes a latency: ``unit``, with the guest's ``tsc_khz``."""

    unit: Unit
    tsc_khz: int

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"latency unit {self.unit!r}: one of {', '.join(UNITS)}")
        if not 0 < self.tsc_khz < 1 << 31:
            raise ValueError(f"tsc_khz {self.tsc_khz}: not a TSC frequency")

    def of_cycles(self, cycles: int) -> int:
        """The latency of ``cycles`` in the unit, as the guest computes it."""
        return cycles * UNITS[self.unit] // self.tsc_khz


@dataclass(frozen=True)
class LatencyMap:
    """A latency probe's histogram in the guest: its map and its scale."""

    map: MapLayout
    scale: LatencyScale


def _counter(ring: RingLayout, probe_id: int, *, missed: bool) -> asm.Mem:
    return rip(ring.counters + 16 * probe_id + (8 if missed else 0), size=8)


def emit_stamp(a: asm.Assembler, returns: ReturnTable) -> None:
    """In the hijack, with rcx the call's table entry and rsi its slot: the call's stamp
    (slot first, then the TSC). Uses rax and rdx (the mask is stored already)."""
    at = returns.stamps - returns.table  # the stamp beside the entry
    a.mov(mem("rcx", at, disp32=True), "rsi")
    a.rdtsc()
    a.shl("rdx", 32)
    a.or_("rax", "rdx")
    a.mov(mem("rcx", at + 8, disp32=True), "rax")


def emit_latency(
    a: asm.Assembler,
    probes: tuple[ReturnProbe, ...],
    *,
    returns: ReturnTable,
    ring: RingLayout,
    helpers: CopyHelpers,
    slot_at: int,
) -> None:
    """In the return program (registers saved, r14 the mask, ``slot_at`` the slot's
    offset from rsp): count the call's latency in the map of each latency probe of the
    mask. Leaves r14 and the flags as they were."""
    latency = [p for p in probes if p.latency is not None]
    if not latency:
        return
    a.rdtsc()  # first: as near the return as can be
    a.shl("rdx", 32)
    a.or_("rax", "rdx")
    a.mov("r15", "rax")
    a.pushfq()
    a.cli()  # no migration between the CPU number and the update (popfq restores IF)
    a.lea("rsi", mem("rsp", slot_at + 8, disp32=True))  # (+8: the pushfq)
    a.movabs("rcx", returns.stamps)
    a.mov("edx", returns.entries)
    a.xor("r12d", "r12d")  # the latest stamp's TSC taken (0: none)
    a.xor("r9d", "r9d")
    a.label("lat_scan")
    a.cmp(mem("rcx"), "rsi")
    a.jcc("ne", "lat_next")
    a.mov("r8", mem("rcx", 8))
    a.mov("rax", "rsi")
    a.lock_cmpxchg(mem("rcx"), "r9")  # taken: the TSC read before it is the stamp's
    a.jcc("ne", "lat_next")
    a.cmp("r8", "r12")
    a.jcc("be", "lat_next")
    a.mov("r12", "r8")
    a.label("lat_next")
    a.add("rcx", STAMP)
    a.dec("edx")
    a.jcc("ne", "lat_scan")
    a.test("r12", "r12")
    a.jcc("e", "lat_lost")
    a.sub("r15", "r12")  # r15: the call's cycles
    a.mov("r13d", mem(disp=helpers.cpu_number, seg="gs"))
    for p in latency:
        assert p.latency is not None
        name, m, scale = f"l{p.bit}", p.latency.map, p.latency.scale
        _if_bit(a, p, name)
        a.cmp("r13d", m.ncpus, imm32=True)
        a.jcc("ae", f"{name}_missed")
        a.mov("rax", "r15")
        a.xor("ecx", "ecx")  # bucket 0: a TSC behind the entry's (another CPU's)
        a.test("rax", "rax")
        a.jcc("s", f"{name}_bucket")
        if UNITS[scale.unit] != 1:
            a.mov("ecx", UNITS[scale.unit])
            a.imul("rax", "rcx")
            a.jcc("o", f"{name}_missed")
        a.xor("edx", "edx")
        a.mov("ecx", scale.tsc_khz)
        a.div("rcx")
        a.test("rax", "rax")
        a.mov("ecx", 1)  # bucket 1: zero (mov leaves the flags)
        a.jcc("e", f"{name}_bucket")
        a.bsr("rcx", "rax")
        a.add("ecx", 2)  # bucket 2 + k: [2**k, 2**(k+1))
        a.label(f"{name}_bucket")
        a.mov("eax", m.stride)
        a.imul("rax", "r13")
        a.lea("rbx", rip(m.base))
        a.add("rbx", "rax")
        a.inc(mem("rbx", HEADER_SIZE, "rcx", 8, size=8, disp32=True))
        a.lock_inc(_counter(ring, p.probe_id, missed=False))
        a.jmp(f"{name}_skip")
        a.label(f"{name}_missed")
        a.lock_inc(_counter(ring, p.probe_id, missed=True))
        a.label(f"{name}_skip")
    a.jmp("lat_done")
    a.label("lat_lost")  # no stamp for this call: every latency probe of it misses it
    for p in latency:
        _if_bit(a, p, f"k{p.bit}")
        a.lock_inc(_counter(ring, p.probe_id, missed=True))
        a.label(f"k{p.bit}_skip")
    a.label("lat_done")
    a.popfq()


def _if_bit(a: asm.Assembler, p: ReturnProbe, name: str) -> None:
    """Go on if the mask (r14) has ``p``'s bit, else to ``{name}_skip`` (rax is lost)."""
    a.mov("rax", "r14")
    a.shr("rax", p.bit)
    a.test("al", 1)
    a.jcc("e", f"{name}_skip")
