"""Kernel stack traces at a probe hit, unwound on the host (``stack_trace_save_regs``).

:class:`StackTracer` holds what a walk needs that does not change between hits: the
vmlinux's ORC table (slid), and the symbols that say which addresses are kernel text.
At a stopping hit it reads the stack from the guest (the stack from ``sp`` to its top in
one read, anything else word by word); at a recorded hit from the slice of the stack the
record program copied (:data:`STACK_CAPTURE_REG`), so a walk that leaves that slice ends
there, with the reason in :attr:`KernelStack.error`.

Modules' own ORC tables are not read: a frame in a module is walked with the kernel's
frame-pointer guess, which a kernel built without frame pointers makes wrong; the trace
then ends early or holds a stray address, and ``error`` says the ORC entry was missing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from kprobevm.errors import LOST_ERRORS, KprobeError, KprobeVMError
from kprobevm.kernel.orc import OrcTable, banner_version, orc_format
from kprobevm.x86.constants import MASK64
from kprobevm.x86.unwind_orc import MAX_STACK_ENTRIES, KernelStack, StackReader, unwind

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["DEFAULT_STACK_SIZE", "THREAD_SIZE", "StackTracer", "memory_reader"]

THREAD_SIZE = 16384
"""x86-64's kernel stack (and IRQ stack) size and alignment without KASAN."""
DEFAULT_STACK_SIZE = 2048
"""Bytes of stack a recorded hit copies unless told otherwise (the stack above ``sp``,
clamped to the stack's top)."""


def memory_reader(memory: GuestMemory, sp: int, window: int = THREAD_SIZE) -> StackReader:
    """A reader of guest memory that fetches ``sp`` up to the stack's top (at most
    ``window`` bytes) in one read and every other word alone; None for a failed read."""
    top = (sp | (THREAD_SIZE - 1)) + 1
    n = max(0, min(top - sp, window))
    cached = b""
    if n:
        try:
            cached = memory.read(sp, n)
        except LOST_ERRORS:
            raise
        except KprobeVMError:
            cached = b""  # read word by word below

    def read(addr: int) -> int | None:
        off = addr - sp
        if 0 <= off <= len(cached) - 8:
            return int.from_bytes(cached[off : off + 8], "little")
        try:
            return memory.u64(addr & MASK64)
        except LOST_ERRORS:
            raise
        except KprobeVMError:
            return None

    return read


class StackTracer:
    """Walks the guest kernel's stacks with its own ORC table; symbols say what is text."""

    def __init__(self, table: OrcTable, symbols: KernelSymbols) -> None:
        self.table = table
        self.symbols = symbols

    @classmethod
    def for_guest(
        cls,
        vmlinux: Vmlinux | None,
        symbols: KernelSymbols,
        read: Callable[[int, int], bytes],
    ) -> StackTracer:
        """The tracer of a running guest: its vmlinux (slid) and the entry layout of its
        kernel's version, read from ``linux_banner`` in its memory."""
        if vmlinux is None:
            raise KprobeError(
                "kernel stack traces need the guest's vmlinux (its ORC tables): "
                "boot with one, or attach with --vmlinux"
            )
        address = symbols["linux_banner"]
        banner = read(address, 256).split(b"\0", 1)[0].decode("ascii", "replace")
        return cls(OrcTable.from_vmlinux(vmlinux, orc_format(banner_version(banner))), symbols)

    def is_text(self, addr: int) -> bool:
        """``__kernel_text_address``: in a text symbol of the kernel or of a module."""
        sym = self.symbols.lookup(addr)
        return sym is not None and sym.is_text

    def walk(
        self,
        regs: Mapping[str, int],
        read: StackReader,
        *,
        ip: int | None = None,
        limit: int = MAX_STACK_ENTRIES,
    ) -> KernelStack:
        """The stack at a hit with these registers (pt_regs names), memory from ``read``."""
        return unwind(regs, self.table, read, self.is_text, ip=ip, limit=limit)

    def at_hit(
        self, regs: Mapping[str, int], memory: GuestMemory, *, ip: int | None = None
    ) -> KernelStack:
        """The stack at a hit, reading the guest (or a recorded hit's memory) through
        ``memory``. ``ip`` as in :func:`~kprobevm.x86.unwind_orc.unwind`."""
        return self.walk(regs, memory_reader(memory, regs["sp"]), ip=ip)

    def lines(self, stack: KernelStack) -> list[str]:
        """``stack`` as tracefs prints it under ``<stack trace>`` (with sym-offset)."""
        return stack.lines(self.symbols.describe)
