"""Kernel stack traces at a probe hit, unwound on the host (``stack_trace_save_regs``).

:class:`StackTracer` holds what a walk needs that does not change between hits: the
vmlinux's ORC table (slid), each loaded module's ORC table (read from its ``struct
module`` in guest memory), and the symbols that say which addresses are kernel text.
At a stopping hit it reads the stack from the guest (the stack from ``sp`` to its top in
one read, anything else word by word); at a recorded hit from the slices of stack the
record program copied (:class:`~kprobevm.x86.record.RecordLayout`), so a walk that
leaves them ends there, with the reason in :attr:`KernelStack.error`.

Module tables are read when the tracer is made and, for a module loaded since, at the
first stopping hit that meets it. A recorded hit cannot read the guest (it may be
running): a module first met there has no table yet, and the walk goes on with the
kernel's frame-pointer guess, as the kernel does for code without ORC; ``error`` says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from kprobevm.errors import LOST_ERRORS, KprobeError, KprobeVMError
from kprobevm.kernel.orc import (
    ModuleOrcLayout,
    OrcEntry,
    OrcFormat,
    OrcTable,
    banner_version,
    orc_format,
)
from kprobevm.x86.constants import MASK64
from kprobevm.x86.unwind_orc import MAX_STACK_ENTRIES, KernelStack, StackReader, unwind

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.btf import Btf
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["DEFAULT_STACK_SIZE", "THREAD_SIZE", "StackTracer", "memory_reader"]

THREAD_SIZE = 16384
"""x86-64's kernel stack (and IRQ stack) size and alignment without KASAN."""
DEFAULT_STACK_SIZE = 4096
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


Reader = Callable[[int, int], bytes]


class StackTracer:
    """Walks the guest kernel's stacks with its own ORC tables; symbols say what is text."""

    def __init__(
        self, table: OrcTable, symbols: KernelSymbols, modules: ModuleOrcLayout | None = None
    ) -> None:
        self.table = table
        self.symbols = symbols
        self.modules = modules
        """Where a ``struct module`` keeps its tables (None: no BTF, no module tables)."""
        self._module_tables: dict[tuple[str, int], OrcTable | None] = {}

    def load_modules(self, read: Reader) -> None:
        """Read the ORC table of every module kallsyms names (with the VM stopped, or
        through memory that reads a running guest)."""
        for name in sorted(self.symbols.modules()):
            self.module_table(name, read)

    def module_table(self, name: str, read: Reader | None) -> OrcTable | None:
        """Module ``name``'s table: known already, else read through ``read`` (None: not
        now). A module that cannot be read is remembered as having none."""
        module = self._this_module(name)
        if module is None or self.modules is None:
            return None
        key = (name, module)
        if key in self._module_tables:
            return self._module_tables[key]
        if read is None:
            return None
        try:
            table = self.modules.table(read, module, self.table.format)
        except LOST_ERRORS:
            raise
        except KprobeVMError:
            table = None
        self._module_tables[key] = table
        return table

    def _this_module(self, name: str) -> int | None:
        """The address of module ``name``'s ``struct module`` (its ``__this_module``)."""
        for sym in self.symbols.all("__this_module"):
            if sym.module == name:
                return sym.address
        return None

    def lookup(self, read: Reader | None) -> _Lookup:
        """The ORC entries of the kernel and its modules, reading new modules' tables
        through ``read`` when given."""
        return _Lookup(self, read)

    @classmethod
    def for_guest(
        cls,
        vmlinux: Vmlinux | None,
        symbols: KernelSymbols,
        read: Reader,
        btf: Btf | None,
    ) -> StackTracer:
        """The tracer of a guest: its vmlinux (slid), the entry layout of its kernel's
        version (from ``linux_banner`` in its memory), and its modules' tables, found
        through ``struct module`` as its BTF lays it out (none without BTF)."""
        if vmlinux is None:
            raise KprobeError(
                "kernel stack traces need the guest's vmlinux (its ORC tables): "
                "boot with one, or attach with --vmlinux"
            )
        modules = None
        if btf is not None:
            try:
                modules = ModuleOrcLayout.from_btf(btf)
            except KprobeVMError as exc:
                log.warning("no ORC tables of modules: %s", exc)
        address = symbols["linux_banner"]
        banner = read(address, 256).split(b"\0", 1)[0].decode("ascii", "replace")
        table = OrcTable.from_vmlinux(vmlinux, orc_format(banner_version(banner)))
        tracer = cls(table, symbols, modules)
        tracer.load_modules(read)
        return tracer

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
        live: Reader | None = None,
    ) -> KernelStack:
        """The stack at a hit with these registers (pt_regs names), memory from ``read``;
        ``live`` reads the guest for a module table not read yet."""
        return unwind(regs, self.lookup(live), read, self.is_text, ip=ip, limit=limit)

    def at_hit(
        self,
        regs: Mapping[str, int],
        memory: GuestMemory,
        *,
        ip: int | None = None,
        live: bool = True,
    ) -> KernelStack:
        """The stack at a hit, reading the guest (or a recorded hit's memory) through
        ``memory``; ``live``: ``memory`` reads the stopped guest itself, so a module
        table not read yet can be. ``ip`` as in :func:`~kprobevm.x86.unwind_orc.unwind`."""
        reader = memory_reader(memory, regs["sp"])
        return self.walk(regs, reader, ip=ip, live=memory.read if live else None)

    def lines(self, stack: KernelStack) -> list[str]:
        """``stack`` as tracefs prints it under ``<stack trace>`` (with sym-offset)."""
        return stack.lines(self.symbols.describe)


class _Lookup:
    """``orc_find`` over the vmlinux's table, then the module that holds the address."""

    def __init__(self, tracer: StackTracer, read: Reader | None) -> None:
        self._tracer = tracer
        self._read = read

    @property
    def format(self) -> OrcFormat:
        return self._tracer.table.format

    def find(self, ip: int) -> OrcEntry | None:
        entry = self._tracer.table.find(ip)
        if entry is not None:
            return entry
        sym = self._tracer.symbols.lookup(ip)
        if sym is None or sym.module is None:
            return None
        table = self._tracer.module_table(sym.module, self._read)
        return None if table is None else table.find(ip)
