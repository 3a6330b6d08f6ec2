"""The x86 answers the generic probe table asks for (the kernel's ``arch_*`` hooks)."""

from __future__ import annotations

from kprobevm.x86.insn import boundaries

__all__ = ["can_probe"]


def can_probe(code: bytes, start: int, addr: int) -> bool:
    """Whether ``addr`` is an instruction boundary of the function whose text (our
    int3s read as the bytes they replaced) is ``code`` at ``start``.

    Decoded from the function's start, as the kernel's ``can_probe()`` does. The int3
    padding after a ``ret`` (straight-line-speculation hardening) decodes as one-byte
    instructions, as the kernel reads it.
    """
    return addr in boundaries(code, start)
