"""The kretprobe return trampoline (the kernel's ``arch_rethook_trampoline``), as guest code.

A probed function returns into it; it finds the call's entry in the instance table by
the stack slot the return address was in, puts the real return address back, frees the
entry, does a watched store so the host sees the function's return registers, and
returns to the caller. It needs no host: a pending return lands right with the host gone.

An entry the guest made itself (a recorded return probe's, :mod:`kprobevm.x86.retrecord`)
names a return program in the entry's info: the trampoline then returns into that program
instead of stopping, with the entry's probe mask and the real return address on the
stack (the program records the return and returns to the caller).
"""

from __future__ import annotations

from kprobevm.x86 import asm
from kprobevm.x86.asm import mem, rip

__all__ = ["ENTRY", "KEPT_BELOW_SLOT", "RETURN_VALUE", "assemble_trampoline", "build_trampoline"]

ENTRY = 16
"""Instance table entry: u64 stack slot (0 = free), u64 real return address."""
RETURN_VALUE = 3
"""The byte the trampoline's watched store writes."""
_SAVED = ("rax", "rcx", "rdx")
KEPT_BELOW_SLOT = 40
"""Bytes below the slot the trampoline leaves as the function left them: where the
kernel's own trampoline frame has its ``pt_regs`` cs word (32 below the slot), which a
6.9+ kernel fills only in part (kernel_rules' selector_cs), so a return probe reads them."""
_SLOT = 8 * (1 + len(_SAVED)) + KEPT_BELOW_SLOT  # the slot's offset from rsp after the saves


def build_trampoline(
    base: int, *, table: int, entries: int, mailbox: int, info: int | None = None
) -> tuple[bytes, int]:
    """The return trampoline at ``base``; returns its code and the RIP after its watched store."""
    program = assemble_trampoline(base, table=table, entries=entries, mailbox=mailbox, info=info)
    return program.code, base + program.labels["store_end"]


def assemble_trampoline(
    base: int, *, table: int, entries: int, mailbox: int, info: int | None = None
) -> asm.Program:
    """The return trampoline at ``base``, with its listing; label ``store_end`` follows the store.

    ``info``: a page parallel to the table (u64 probe mask, u64 return program per
    entry; a program of 0 is the host's entry): with it, a guest-made entry's return is
    recorded by its program rather than stopping the VM.

    On entry RSP = slot + 8 (the ``ret`` popped our address from the slot) and every
    register is as the function returned it. The trampoline saves what it uses, restores
    it before the watched store, so the host sees the function's return registers.
    """
    a = asm.Assembler(base)
    # below the slot and the words kept there (lea keeps the flags)
    a.lea("rsp", mem("rsp", -8 - KEPT_BELOW_SLOT))
    a.pushfq()
    for reg in _SAVED:
        a.push(reg)
    a.lea("rax", mem("rsp", _SLOT))  # the slot's address: our key
    a.movabs("rcx", table)
    a.mov("edx", entries)
    a.label("loop")
    a.cmp(mem("rcx"), "rax")
    a.jcc("e", "found")
    a.add("rcx", ENTRY)
    a.dec("edx")
    a.jcc("ne", "loop")
    # No entry: impossible while the host frees only entries whose slot no longer holds
    # this trampoline. Stop loudly rather than return to a wrong address.
    a.ud2()
    a.label("found")
    a.mov("rdx", mem("rcx", 8))  # the real return address
    if info is not None:
        a.cmp(mem("rcx", info - table + 8, size=8, disp32=True), 0)
        a.jcc("ne", "recorded")
    # Free the entry before the slot loses our address: the host reuses an entry only
    # once its slot no longer holds the trampoline, so it must be free in the guest by
    # then (the other order let a reused entry be zeroed under a new call).
    a.mov(mem("rcx", size=8), 0)
    a.mov(mem("rsp", _SLOT), "rdx")  # back into the slot
    for reg in reversed(_SAVED):
        a.pop(reg)
    a.popfq()
    a.lea("rsp", mem("rsp", KEPT_BELOW_SLOT))  # back onto the slot
    a.mov(rip(mailbox, size=1), RETURN_VALUE)
    a.label("store_end")
    a.jmp_next()  # a late stop still lands here (see ooline.TB_BREAK)
    a.ret()  # to the caller, RSP as after the function's own ret
    if info is not None:
        _recorded_return(a, info - table)
    return a.assemble()


def _recorded_return(a: asm.Assembler, info: int) -> None:
    """A guest-made entry (rcx; rdx its return address): its mask and program go in the
    two words below the slot, the entry is freed and the real address put back, and a
    ``ret`` pops the program's address (a push-free jump no interrupt can clobber): the
    program starts with the mask at RSP and the return address above it."""
    a.label("recorded")
    a.mov("rax", mem("rcx", info, disp32=True))
    a.mov(mem("rsp", _SLOT - 8), "rax")  # the mask
    a.mov("rax", mem("rcx", info + 8, disp32=True))
    a.mov(mem("rsp", _SLOT - 16), "rax")  # the program
    a.mov(mem("rcx", size=8), 0)  # free the entry (before the slot loses our address)
    a.mov(mem("rsp", _SLOT), "rdx")
    for reg in reversed(_SAVED):
        a.pop(reg)
    a.popfq()
    a.lea("rsp", mem("rsp", KEPT_BELOW_SLOT - 16))  # onto the program's address
    a.ret()
