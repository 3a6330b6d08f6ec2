"""The x86 answers the generic probe table asks for (the kernel's ``arch_*`` hooks)."""

from __future__ import annotations

from collections.abc import Callable

from kprobevm.errors import GdbErrorReply, GuestFaultError
from kprobevm.x86.insn import boundaries

__all__ = ["can_probe", "quiescent"]

_HLT = b"\xf4"


def can_probe(code: bytes, start: int, addr: int) -> bool:
    """Whether ``addr`` is an instruction boundary of the function whose text (our
    int3s read as the bytes they replaced) is ``code`` at ``start``.

    Decoded from the function's start, as the kernel's ``can_probe()`` does. The int3
    padding after a ``ret`` (straight-line-speculation hardening) decodes as one-byte
    instructions, as the kernel reads it.
    """
    return addr in boundaries(code, start)


def quiescent(cs: int, rip: int, *, ours: Callable[[int], bool],
              read: Callable[[int, int], bytes]) -> bool:
    """A vCPU in user mode, or halted in the idle loop outside our code: no kernel
    context of its own is left interrupted inside our code. A byte before RIP that
    cannot be read means "not known": not quiescent this time."""
    if cs & 3:
        return True
    if ours(rip):
        return False
    try:
        return read(rip - 1, 1) == _HLT
    except (GuestFaultError, GdbErrorReply):
        return False
