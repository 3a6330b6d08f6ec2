"""The x86 answers the generic probe table asks for (the kernel's ``arch_*`` hooks)."""

from __future__ import annotations

from collections.abc import Container

from kprobevm.x86.insn import ENDBR64, boundaries

__all__ = ["ENDBR_POISON", "IBT_SYMBOL", "adjust_kprobe_addr", "can_probe", "has_ibt", "is_endbr"]

ENDBR_POISON = bytes.fromhex("660f1f00")
"""``nopw 0(%rax)``: what an IBT kernel writes over the ``endbr64`` of a function whose
address is never taken (sealing, from ``.ibt_endbr_seal``); the kernel's ``is_endbr()``
still takes it for one (seen on 6.12: ``vfs_read`` starts with it and is probed at +4)."""

IBT_SYMBOL = "__ibt_endbr_seal"
"""In kallsyms only when the kernel is built with X86_KERNEL_IBT."""


def has_ibt(symbols: Container[str]) -> bool:
    """Whether the kernel is built with X86_KERNEL_IBT (kallsyms names ``__ibt_endbr_seal``);
    without it the kernel's ``is_endbr()`` is always false."""
    return IBT_SYMBOL in symbols


def is_endbr(first: bytes) -> bool:
    """The kernel's ``is_endbr()`` on a function's first four bytes: ``endbr64``,
    ``endbr32``, or the sealed form."""
    if len(first) < 4:
        return False
    return first[:4] == ENDBR_POISON or (first[:3] == ENDBR64[:3] and first[3] in (0xFA, 0xFB))


def adjust_kprobe_addr(first: bytes, offset: int) -> tuple[int, bool]:
    """The kernel's ``arch_adjust_kprobe_addr()`` on an IBT kernel: (the probe's offset in
    its function, whether it is the function's entry). ``first`` is the function's first
    four bytes. Behind an ``endbr64`` the entry is +4, and a probe at +0 goes there: the
    ENDBR must stay, and the ftrace call site follows it."""
    if is_endbr(first):
        on_entry = offset in (0, 4)
        return (4 if on_entry else offset), on_entry
    return offset, offset == 0


def can_probe(code: bytes, start: int, addr: int) -> bool:
    """Whether ``addr`` is an instruction boundary of the function whose text (our
    int3s read as the bytes they replaced) is ``code`` at ``start``.

    Decoded from the function's start, as the kernel's ``can_probe()`` does. The int3
    padding after a ``ret`` (straight-line-speculation hardening) decodes as one-byte
    instructions, as the kernel reads it.
    """
    return addr in boundaries(code, start)
