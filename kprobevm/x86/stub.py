"""The #BP stub placed in the slot page: send a probe's int3 to its slot with no host.

IDT vector 3 points here. The stub does in a few instructions what the kernel's
``kprobe_int3_handler`` does: look the int3 address up in a hash table the host keeps
in guest memory; found, rewrite the exception frame's RIP to the probe's slot and
``iretq`` (the slot's watched store then stops the vCPU for the host, or, with no host,
the probe simply runs on); not found and the int3 is gone, return to re-execute the
address; otherwise go on to the guest's own ``asm_exc_int3`` with every register and
flag as the CPU delivered them. The host fills the table with :func:`stub_hash`, the
same hash the stub computes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from kprobevm.errors import KprobeError
from kprobevm.x86 import asm
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
_CC_E, _CC_NE = 0x4, 0x5


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
    #: Offset of each part: ``entry``, ``lookup``, ``probe``, ``found``, ``not_found``,
    #: ``forward``, ``forward_flags`` (the user-mode path), ``real_handler_ptr``.
    offsets: Mapping[str, int]

    @property
    def length(self) -> int:
        """Bytes taken by the stub, its handler pointer included."""
        return len(self.code)

    @property
    def entry_offset(self) -> int:
        """Offset of the entry point (what IDT vector 3 points at) from ``base``."""
        return self.offsets["entry"]

    @property
    def real_handler_ptr(self) -> int:
        """Address of the u64 the stub jumps through to reach the guest's handler."""
        return self.base + self.offsets["real_handler_ptr"]


def build_int3_stub(base: int, *, table: int, table_slots: int, real_handler: int) -> Int3Stub:
    """Assemble the #BP stub to run at ``base``.

    ``table`` is the address of ``table_slots`` 16-byte entries (u64 key = probe
    address, u64 value = slot entry); ``real_handler`` the guest's ``asm_exc_int3``.
    Both are reached by absolute address, so the stub works at any distance from them.
    """
    shift = 64 - _log2(table_slots)
    a = asm.Assembler(base)
    # On entry: 0(%rsp) RIP (int3 + 1), 8 CS, 16 RFLAGS, 24 RSP, 32 SS; IF is clear.
    a.label("entry")
    a.emit(asm.pushfq())  # the live flags are restored before the real handler
    a.emit(b"\xf6\x44\x24\x10\x03")  # testb $3, 16(%rsp): frame CS, RPL
    a.jcc(_CC_NE, "forward_flags")  # from user mode: not ours
    for reg in _SAVED:
        a.emit(asm.push_r64(reg))
    a.label("lookup")
    a.emit(b"\x48\x8b\x44\x24" + bytes((_FRAME,)))  # mov FRAME(%rsp), %rax: frame RIP
    a.emit(b"\x48\xff\xc8")  # dec %rax: the int3's address
    a.emit(b"\x48\xb9" + struct.pack("<Q", HASH_MULTIPLIER))  # movabs $mult, %rcx
    a.emit(b"\x48\x0f\xaf\xc8")  # imul %rax, %rcx
    a.emit(b"\x48\xc1\xe9" + bytes((shift,)))  # shr $shift, %rcx: the index
    a.emit(b"\x48\x01\xc9")  # add %rcx, %rcx: index * 2 quadwords (16-byte entries)
    a.emit(b"\x48\xbe" + struct.pack("<Q", table & MASK64))  # movabs $table, %rsi
    a.emit(b"\xba" + struct.pack("<I", table_slots))  # mov $slots, %edx: probe at most all
    a.label("probe")
    a.emit(b"\x48\x39\x04\xce")  # cmp %rax, (%rsi,%rcx,8): key == addr?
    a.jcc(_CC_E, "found")
    a.emit(b"\x48\x83\x3c\xce\x00")  # cmpq $0, (%rsi,%rcx,8): empty ends the sequence
    a.jcc(_CC_E, "not_found")
    a.emit(b"\x48\x83\xc1\x02")  # add $2, %rcx: next entry (tombstones fall through here)
    a.emit(b"\x48\x81\xe1" + struct.pack("<I", 2 * table_slots - 1))  # and $mask, %rcx
    a.emit(b"\xff\xca")  # dec %edx
    a.jcc(_CC_NE, "probe")
    a.jmp("not_found")
    a.label("found")
    a.emit(b"\x48\x8b\x44\xce\x08")  # mov 8(%rsi,%rcx,8), %rax: the slot
    a.label("redirect")
    a.emit(b"\x48\x89\x44\x24" + bytes((_FRAME,)))  # mov %rax, FRAME(%rsp): new frame RIP
    for reg in reversed(_SAVED):
        a.emit(asm.pop_r64(reg))
    a.emit(asm.popfq())
    a.emit(asm.iretq())  # the frame's RFLAGS, RSP and SS are the interrupted context's
    a.label("not_found")
    a.emit(b"\x80\x38" + bytes((asm.INT3,)))  # cmpb $0xcc, (%rax)
    a.jcc(_CC_NE, "redirect")  # the int3 went away: re-execute the original at addr
    a.label("forward")
    for reg in reversed(_SAVED):
        a.emit(asm.pop_r64(reg))
    a.label("forward_flags")
    a.emit(asm.popfq())
    ptr_at = (a.offset + 6 + 7) & ~7  # the jmp, then the pointer 8-byte aligned
    a.emit(asm.jmp_mem_rip(a.here, base + ptr_at))
    a.emit(b"\xcc" * (ptr_at - a.offset))  # never executed
    a.label("real_handler_ptr")
    a.emit(struct.pack("<Q", real_handler & MASK64))
    return Int3Stub(base=base, code=a.finish(), offsets=a.labels())
