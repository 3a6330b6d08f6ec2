"""Recorded return probes as guest code: the hijack at a function's entry, the record at
its return. Neither stops the VM.

At the entry, the *hijack* takes an instance for each recorded return probe of the
function that is under its ``maxactive`` (a ``lock cmpxchg`` on the probe's active
count; over it, the probe's missed counter), takes a free entry of the guest's part of
the return table for the call (keyed by the stack slot of the return address, as the
host's entries are), notes the real return address, the probes' bits and the function's
*return program* in the entry and its info, and puts the return trampoline's address in
the slot, last. The trampoline (:mod:`kprobevm.x86.rethook`) later returns into the
return program with the mask at RSP and the real return address above it. That program
gives the instances back and writes a record per probe of the mask, with the registers
as the function returned them (``ip`` the caller, ``sp`` past the return address), as
the record program of an entry does (:mod:`kprobevm.x86.record`), then returns to the
caller.

A table entry left by a call that never came back (its stack slot is being used by a new
call now) is taken over by the hijack that meets it before a free one, so the trampoline,
which looks in the same order, never finds a stale one first.
"""

from __future__ import annotations

from dataclasses import dataclass

from kprobevm.x86 import asm
from kprobevm.x86 import record as rec
from kprobevm.x86.asm import mem, rip
from kprobevm.x86.funclatency import LatencyMap, emit_latency, emit_stamp
from kprobevm.x86.rethook import ENTRY

__all__ = [
    "MAX_RETURN_PROBES",
    "ReturnProbe",
    "ReturnTable",
    "build_hijack_program",
    "build_return_program",
]

MAX_RETURN_PROBES = 64
"""Recorded return probes at once: each has a bit in an entry's u64 mask."""
_HIJACK_SAVED = ("rax", "rcx", "rdx", "rsi")
_HIJACK_SLOT = 8 * (1 + len(_HIJACK_SAVED))  # the return address, above flags and the saves
_MASK_AT = rec._ENTRY_SP  # the return program's mask, above its saved registers
_RETURN_AT = _MASK_AT + 8  # the real return address


@dataclass(frozen=True)
class ReturnTable:
    """The guest's part of the return table and what goes with it (guest addresses)."""

    table: int
    """The first of ``entries`` guest-made entries (u64 slot, u64 real return address)."""
    entries: int
    info: int
    """Per entry: u64 mask of the probes with an instance, u64 return program."""
    actives: int
    """Per probe bit: u64 instances in flight."""
    trampoline: int
    stamps: int = 0
    """Per entry: the call's stamp for latency probes (:mod:`kprobevm.x86.funclatency`)."""

    def active(self, bit: int) -> asm.Mem:
        """The active count of the probe with bit ``bit``."""
        return rip(self.actives + 8 * bit, size=8)


@dataclass(frozen=True)
class ReturnProbe:
    """One recorded return probe in a function's programs: its bit, record id, bound."""

    bit: int
    probe_id: int
    maxactive: int
    layout: rec.RecordLayout
    latency: LatencyMap | None = None
    """A latency probe's histogram: its return is counted there, not recorded."""


def build_hijack_program(
    at: int,
    *,
    probes: tuple[ReturnProbe, ...],
    returns: ReturnTable,
    ring: rec.RingLayout,
    program: int,
    cont: int,
) -> asm.Program:
    """The entry's hijack for ``probes`` at ``at``; ``program`` is their return program,
    ``cont`` where the entry goes on (its record program, or the slot's continuation)."""
    a = asm.Assembler(at)
    a.pushfq()
    for reg in _HIJACK_SAVED:
        a.push(reg)
    a.xor("edx", "edx")  # the mask of probes with an instance
    for p in probes:
        name = f"b{p.bit}"
        a.mov("rax", returns.active(p.bit))
        a.label(f"{name}_try")
        a.cmp("rax", p.maxactive, imm32=True)
        a.jcc("ae", f"{name}_over")
        a.lea("rcx", mem("rax", 1))
        a.lock_cmpxchg(returns.active(p.bit), "rcx")
        a.jcc("ne", f"{name}_try")  # rax holds the count another vCPU left
        a.bts("rdx", p.bit)
        a.jmp(f"{name}_next")
        a.label(f"{name}_over")
        a.lock_inc(rip(ring.counters + 16 * p.probe_id + 8, size=8))  # missed
        a.label(f"{name}_next")
    a.test("rdx", "rdx")
    a.jcc("e", "leave")
    a.lea("rsi", mem("rsp", _HIJACK_SLOT))  # the slot: the entry's key
    stamping = any(p.latency is not None for p in probes)
    if stamping:
        _take_loop(a, returns, "fresh", skip_waiting_stamps=True)
    # Take the first entry that is free, or that a call which never came back left at
    # this very slot (the slot is a new call's now). The trampoline looks from the first
    # entry too, so a stale one after ours is never found before ours.
    _take_loop(a, returns, "take", skip_waiting_stamps=False)
    # No free entry: the instances go back, each hit is missed.
    for p in probes:
        _if_bit(a, p, f"n{p.bit}", mask="rdx")
        a.lock_dec(returns.active(p.bit))
        a.lock_inc(rip(ring.counters + 16 * p.probe_id + 8, size=8))
        a.label(f"n{p.bit}_skip")
    a.jmp("leave")
    a.label("taken")
    info = returns.info - returns.table
    a.mov("rax", mem("rsi"))  # the real return address
    a.mov(mem("rcx", 8), "rax")
    a.mov(mem("rcx", info, disp32=True), "rdx")
    a.lea("rax", rip(program))
    a.mov(mem("rcx", info + 8, disp32=True), "rax")
    if stamping:
        emit_stamp(a, returns)
    a.lea("rax", rip(returns.trampoline))
    a.mov(mem("rsi"), "rax")  # the hijack, last: the entry is complete
    a.label("leave")
    for reg in reversed(_HIJACK_SAVED):
        a.pop(reg)
    a.popfq()
    a.jmp(cont)
    return a.assemble()


def _take_loop(a: asm.Assembler, returns: ReturnTable, name: str, *,
               skip_waiting_stamps: bool) -> None:
    """One look through the guest's entries for the call (slot in rsi): an entry already
    at this slot, or a free one taken with ``lock cmpxchg``; found, to ``taken`` with rcx
    the entry, else on past the loop.

    ``skip_waiting_stamps``: the first look of a hijack that stamps passes over a free
    entry whose stamp a return program still has to take (the trampoline frees a call's
    entry before its return program takes the stamp beside it, and a stamp written over
    in between loses that call's latency). A stamp nobody will take (its call returned
    through no latency program) only sends the entry to the second look."""
    end = returns.table + ENTRY * returns.entries
    a.movabs("rcx", returns.table)
    a.label(name)
    a.cmp(mem("rcx"), "rsi")
    a.jcc("e", "taken")
    if skip_waiting_stamps:
        a.cmp(mem("rcx", returns.stamps - returns.table, size=8, disp32=True), 0)
        a.jcc("ne", f"{name}_next")  # its call's return program may not have taken it yet
    a.xor("eax", "eax")
    a.lock_cmpxchg(mem("rcx"), "rsi")
    a.jcc("e", "taken")
    if skip_waiting_stamps:
        a.label(f"{name}_next")
    a.add("rcx", ENTRY)
    a.lea("rax", rip(end))
    a.cmp("rcx", "rax")
    a.jcc("b", name)


def build_return_program(
    at: int,
    *,
    probes: tuple[ReturnProbe, ...],
    returns: ReturnTable,
    ring: rec.RingLayout,
    helpers: rec.CopyHelpers,
) -> asm.Program:
    """The return program of one function at ``at``: a record per probe of the mask (a
    latency probe's return counted in its histogram instead)."""
    a = asm.Assembler(at)
    rec._save(a)
    a.mov("r14", mem("rsp", _MASK_AT, disp32=True))
    # the instances go back first, whatever becomes of the records
    for p in probes:
        _if_bit(a, p, f"a{p.bit}")
        a.lock_dec(returns.active(p.bit))
        a.label(f"a{p.bit}_skip")
    emit_latency(a, probes, returns=returns, ring=ring, helpers=helpers, slot_at=_RETURN_AT)
    recorded = tuple(p for p in probes if p.latency is None)
    if recorded:  # (a latency probe's return has no record)
        a.mov("r13d", mem(disp=helpers.cpu_number, seg="gs"))
        a.cmp("r13d", ring.max_cpus, imm32=True)
        a.jcc("ae", "missed_all")
        busy = mem("rax", 0, "r13", size=1)
        a.lea("rax", rip(ring.busy))
        a.mov("cl", 1)
        a.xchg(busy, "cl")
        a.test("cl", "cl")
        a.jcc("ne", "missed_all")
        for p in recorded:
            name = f"r{p.bit}"
            _if_bit(a, p, name)
            site = rec._Site(a, name, p.probe_id, p.layout, ring)
            rec._reserve(site)
            rec._header(site, helpers)
            _return_registers(site)
            rec._captures(site, helpers)
            rec._complete(site)
            a.label(f"{name}_skip")
        a.lea("rax", rip(ring.busy))
        a.mov(busy, 0)
    a.label("leave")
    for reg in reversed(rec._PUSHED):
        a.pop(reg)
    a.popfq()
    a.lea("rsp", mem("rsp", 8))  # past the mask (lea keeps the flags)
    a.ret()  # to the caller
    if recorded:
        a.label("missed_all")
        for p in recorded:
            _if_bit(a, p, f"m{p.bit}")
            a.lock_inc(rip(ring.counters + 16 * p.probe_id + 8, size=8))
            a.label(f"m{p.bit}_skip")
        a.jmp("leave")
    return a.assemble()


def _if_bit(a: asm.Assembler, p: ReturnProbe, name: str, *, mask: str = "r14") -> None:
    """Go on if ``mask`` has ``p``'s bit, else to ``{name}_skip`` (rax is lost)."""
    a.mov("rax", mask)
    a.shr("rax", p.bit)  # even by 0: only bit 1 takes a shorter form
    a.test("al", 1)
    a.jcc("e", f"{name}_skip")


def _return_registers(s: rec._Site) -> None:
    """The registers as the function returned them: ``ip`` is the caller, ``sp`` past the
    return address (as right after the function's ``ret``)."""
    a = s.a
    a.mov("rsi", "rsp")
    a.lea("rdi", rec._rec(rec.REGS_OFFSET))
    a.mov("ecx", len(rec._PUSHED))
    a.rep_movsq()
    pushed = len(rec._PUSHED)
    for i, reg in enumerate(rec.SNAPSHOT_REGS[pushed:], start=pushed):
        if reg == "ip":
            a.mov("rax", mem("rsp", _RETURN_AT, disp32=True))
        elif reg == "flags":
            a.mov("rax", mem("rsp", rec._FLAGS_AT, disp32=True))
        elif reg == "sp":
            a.lea("rax", mem("rsp", _RETURN_AT + 8, disp32=True))
        else:
            a.xor("eax", "eax")
            a.mov("ax", reg)
        a.mov(rec._rec(rec.REGS_OFFSET + 8 * i), "rax")
