"""The #BP stub placed in the slot page: send a probe's int3 to its slot with no host.

IDT vector 3 points here. The stub does in a few instructions what the kernel's
``kprobe_int3_handler`` does: look the int3 address up in a hash table the host keeps
in guest memory; found, rewrite the exception frame's RIP to the probe's slot and
``iretq`` (the slot's watched store then stops the vCPU for the host, or, with no host,
the probe simply runs on); not found and the int3 is gone, return to re-execute the
address; otherwise go on to the guest's own ``asm_exc_int3`` with every register and
flag as the CPU delivered them. The host fills the table with :func:`stub_hash`, the
same hash the stub computes.

An int3 that is gone from memory may still be in QEMU's translation of the address.
Under TCG with more than one vCPU, a vCPU that translates the code while another is
between QEMU's dropping of the old translations and its store of the new byte keeps a
translation of the old byte, and nothing drops it later: a ``text_poke_bp`` of the
guest's own (a static key) then leaves behind an int3 that only this vCPU still runs,
and re-executing it traps again for ever, interrupts off, while the poking vCPU waits
for it. x86 asks a CPU to serialize before it runs code another CPU changed, and the
kernel does (an IPI to every CPU), but a serializing instruction drops nothing in TCG;
a store to the byte does. So before it sends a vCPU back, the stub rewrites the byte
with a locked ``or`` of 0, which changes nothing in memory and no other CPU's store can
split, but makes QEMU drop every translation holding it. Kernel text is read-only: the
store is made with CR0.WP clear (interrupts are off), unless CR4.CET pins WP.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from kprobevm.errors import KprobeError
from kprobevm.x86 import asm
from kprobevm.x86.asm import mem, rip
from kprobevm.x86.constants import MASK64

__all__ = [
    "EMPTY",
    "ENTRY_SIZE",
    "HASH_MULTIPLIER",
    "TOMBSTONE",
    "Int3Stub",
    "build_int3_stub",
    "probe_sequence",
    "stub_hash",
    "table_image",
]

#: Fibonacci hashing: 2**64 divided by the golden ratio, odd.
HASH_MULTIPLIER = 0x9E3779B97F4A7C15
ENTRY_SIZE = 16
#: A key that ends a probe sequence (never a kernel address).
EMPTY = 0
#: A deleted entry: lookups continue past it, inserts may reuse it.
TOMBSTONE = 1

# The stub's stack while it works: pushfq, then rax rcx rdx rsi, then the CPU's frame.
_SAVED = ("rax", "rcx", "rdx", "rsi")
_FRAME = 8 * (1 + len(_SAVED))  # offset of the frame's RIP from %rsp after the saves
_CR0_WP = 16  # supervisor writes honour read-only pages
_CR4_CET = 23  # control-flow enforcement: CR0.WP may not be cleared while it is set


def _log2(table_slots: int) -> int:
    if table_slots < 2 or table_slots & (table_slots - 1) or table_slots > 1 << 30:
        raise KprobeError(f"hash table size {table_slots} is not a power of two in [2, 2**30]")
    return table_slots.bit_length() - 1


def stub_hash(addr: int, table_slots: int) -> int:
    """The first table index for ``addr``: the top log2(slots) bits of addr * multiplier."""
    return ((addr * HASH_MULTIPLIER) & MASK64) >> (64 - _log2(table_slots))


def probe_sequence(addr: int, table_slots: int) -> Iterator[int]:
    """The indexes the stub visits for ``addr``, in order (linear probing, one lap)."""
    first = stub_hash(addr, table_slots)
    for i in range(table_slots):
        yield (first + i) & (table_slots - 1)


def table_image(entries: Mapping[int, int], table_slots: int) -> bytes:
    """A fresh table holding ``entries`` (probe address -> slot entry address)."""
    keys: list[int] = [EMPTY] * table_slots
    values: list[int] = [0] * table_slots
    for addr, slot in entries.items():
        if addr in (EMPTY, TOMBSTONE):
            raise KprobeError(f"{addr:#x} cannot be a key: it marks empty/deleted entries")
        for index in probe_sequence(addr, table_slots):
            if keys[index] == EMPTY:
                keys[index], values[index] = addr & MASK64, slot & MASK64
                break
        else:
            raise KprobeError(f"hash table of {table_slots} entries is full")
    return b"".join(struct.pack("<QQ", k, v) for k, v in zip(keys, values, strict=True))


@dataclass(frozen=True)
class Int3Stub:
    """The assembled stub and where its parts are (offsets from ``base``)."""

    base: int
    code: bytes
    #: Offset of each part: ``entry``, ``lookup``, ``probe``, ``found``, ``redirect``,
    #: ``not_found``, ``forward``, ``forward_flags`` (the user-mode path), ``went_away``,
    #: ``real_handler_ptr``.
    offsets: Mapping[str, int]
    #: The stub as GNU as source (:class:`~kprobevm.x86.asm.Assembler`).
    listing: str = ""

    @property
    def length(self) -> int:
        """Bytes taken by the stub, its handler pointer included."""
        return len(self.code)

    @property
    def real_handler_ptr(self) -> int:
        """Address of the u64 the stub jumps through to reach the guest's handler."""
        return self.base + self.offsets["real_handler_ptr"]


def build_int3_stub(
    base: int, *, table: int, table_slots: int, real_handler: int, vanished: int
) -> Int3Stub:
    """Assemble the #BP stub to run at ``base``.

    ``table`` is the address of ``table_slots`` 16-byte entries (u64 key = probe
    address, u64 value = slot entry); ``real_handler`` the guest's ``asm_exc_int3``.
    Both are reached by absolute address, so the stub works at any distance from them.
    ``vanished`` is a u64 in data memory within rel32 reach that counts the int3s found
    gone (outside a code page: a store there would drop the stub's own translations).
    """
    shift = 64 - _log2(table_slots)
    a = asm.Assembler(base)
    # On entry: [rsp] RIP (int3 + 1), +8 CS, +16 RFLAGS, +24 RSP, +32 SS; IF is clear.
    a.label("entry")
    a.pushfq()  # the live flags are restored before the real handler
    a.test(mem("rsp", 16, size=1), 3)  # the frame's CS: its RPL
    a.jcc("ne", "forward_flags")  # from user mode: not ours
    for reg in _SAVED:
        a.push(reg)
    a.label("lookup")
    a.mov("rax", mem("rsp", _FRAME))  # the frame's RIP
    a.dec("rax")  # the int3's address
    a.movabs("rcx", HASH_MULTIPLIER)
    a.imul("rcx", "rax")
    a.shr("rcx", shift)  # the index
    a.add("rcx", "rcx")  # index * 2 quadwords (16-byte entries)
    a.movabs("rsi", table & MASK64)
    a.mov("edx", table_slots)  # probe at most all of them
    a.label("probe")
    entry_key = mem("rsi", 0, "rcx", 8, size=8)
    a.cmp(entry_key, "rax")
    a.jcc("e", "found")
    a.cmp(entry_key, EMPTY)  # an empty entry ends the sequence
    a.jcc("e", "not_found")
    a.add("rcx", 2)  # the next entry (tombstones fall through here)
    a.and_("rcx", 2 * table_slots - 1, imm32=True)  # the same length for any table size
    a.dec("edx")
    a.jcc("ne", "probe")
    a.jmp("not_found")
    a.label("found")
    # The host may rewrite the entry while this vCPU is stopped between reading its key
    # and its value (a probe removed: TOMBSTONE and 0). The value counts only if the key
    # is still ours after it was read; else look again.
    a.mov("rdx", mem("rsi", 8, "rcx", 8))  # the entry's value: the slot
    a.cmp(entry_key, "rax")
    a.jcc("ne", "lookup")
    a.mov("rax", "rdx")
    a.label("redirect")
    a.mov(mem("rsp", _FRAME), "rax")  # the frame's new RIP
    for reg in reversed(_SAVED):
        a.pop(reg)
    a.popfq()
    a.iretq()  # the frame's RFLAGS, RSP and SS are the interrupted context's
    a.label("not_found")
    a.cmp(mem("rax", size=1), asm.INT3)
    a.jcc("ne", "went_away")
    a.label("forward")
    for reg in reversed(_SAVED):
        a.pop(reg)
    a.label("forward_flags")
    a.popfq()
    a.jmp(rip("real_handler_ptr"))
    a.label("went_away")  # re-execute the original at addr, translated anew (see above)
    a.lock_inc(rip(vanished, size=8))
    a.mov("rcx", "cr4")
    a.bt("rcx", _CR4_CET)
    a.jcc("c", "redirect")  # WP cannot be cleared (no TCG has CET: never the case there)
    a.mov("rdx", "cr0")
    a.mov("rsi", "rdx")
    a.btr("rsi", _CR0_WP)
    a.mov("cr0", "rsi")
    a.lock_or(mem("rax", size=1), 0)
    a.mov("cr0", "rdx")
    a.jmp("redirect")
    a.align(8, asm.INT3)  # never executed
    a.label("real_handler_ptr")
    a.quad(real_handler)
    program = a.assemble()
    return Int3Stub(base, program.code, program.labels, program.listing)
