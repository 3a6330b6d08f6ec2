"""The kretprobe return trampoline (the kernel's ``arch_rethook_trampoline``), as guest code.

A probed function returns into it; it finds the call's entry in the instance table by
the stack slot the return address was in, puts the real return address back, frees the
entry, does a watched store so the host sees the function's return registers, and
returns to the caller. It needs no host: a pending return lands right with the host gone.
"""

from __future__ import annotations

import struct

from kprobevm.x86 import asm

__all__ = ["ENTRY", "RETURN_VALUE", "build_trampoline"]

ENTRY = 16
"""Instance table entry: u64 stack slot (0 = free), u64 real return address."""
RETURN_VALUE = 3
"""The byte the trampoline's watched store writes."""


def build_trampoline(base: int, *, table: int, entries: int, mailbox: int) -> tuple[bytes, int]:
    """The return trampoline at ``base``; returns its code and the RIP after its watched store.

    On entry RSP = slot + 8 (the ``ret`` popped our address from the slot) and every
    register is as the function returned it. The trampoline saves what it uses, restores
    it before the watched store, so the host sees the function's return registers.
    """
    a = asm.Assembler(base)
    a.emit(b"\x48\x8d\x64\x24\xf8")  # lea -8(%rsp), %rsp: back onto the slot (flags kept)
    a.emit(asm.pushfq())
    for reg in ("rax", "rcx", "rdx"):
        a.emit(asm.push_r64(reg))
    a.emit(b"\x48\x8d\x44\x24\x20")  # lea 32(%rsp), %rax: the slot's address, our key
    a.emit(b"\x48\xb9" + struct.pack("<Q", table))  # movabs $table, %rcx
    a.emit(b"\xba" + struct.pack("<I", entries))  # mov $entries, %edx
    a.label("loop")
    a.emit(b"\x48\x39\x01")  # cmp %rax, (%rcx)
    a.jcc(0x4, "found")  # je
    a.emit(b"\x48\x83\xc1\x10")  # add $16, %rcx
    a.emit(b"\xff\xca")  # dec %edx
    a.jcc(0x5, "loop")  # jne
    # No entry: impossible while the host frees only entries whose slot no longer holds
    # this trampoline. Stop loudly rather than return to a wrong address.
    a.emit(b"\x0f\x0b")  # ud2
    a.label("found")
    a.emit(b"\x48\x8b\x51\x08")  # mov 8(%rcx), %rdx: the real return address
    a.emit(b"\x48\x89\x54\x24\x20")  # mov %rdx, 32(%rsp): back into the slot
    a.emit(b"\x48\xc7\x01\x00\x00\x00\x00")  # movq $0, (%rcx): the entry is free
    for reg in ("rdx", "rcx", "rax"):
        a.emit(asm.pop_r64(reg))
    a.emit(asm.popfq())
    a.emit(asm.movb_store_rip(a.here, mailbox, RETURN_VALUE))
    store_end = a.here
    a.emit(b"\xeb\x00")  # jmp .+2: a late stop still lands here (see ooline.TB_BREAK)
    a.emit(b"\xc3")  # ret: to the caller, RSP as after the function's own ret
    return a.finish(), store_end
