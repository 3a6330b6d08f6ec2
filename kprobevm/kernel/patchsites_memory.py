"""The kernel's run-time patch tables read from its memory, for a guest with no vmlinux.

Jump labels (``__jump_table``), static calls (``.static_call_sites``), the exception
table and the SMP lock prefixes stay in the running kernel (read-only after init, or
read-only data) between the start and stop symbols kallsyms names; the kernel sorted them
at boot, fixing their self-relative offsets, so they read as the ELF's do; the lock
prefixes only while the kernel keeps them on its ``smp_alt_modules`` list (it frees them
when it will never switch between one CPU and several). Tables inside
the init memory (``__init_begin``..``__init_end``: ``.altinstructions``,
``__mcount_loc``) were freed after boot and are not read; the ftrace call sites come
instead from ftrace's own records (``ftrace_pages_start``: ``struct ftrace_page`` with an
array of ``struct dyn_ftrace``, laid out by BTF).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError
from kprobevm.kernel.module_kallsyms import list_for_each

if TYPE_CHECKING:
    from kprobevm.kernel.btf import Btf
    from kprobevm.kernel.kallsyms import KernelSymbols

__all__ = ["LiveTables"]

ReadFn = Callable[[int, int], bytes]
_MAX_PAGES = 1 << 16


class LiveTables:
    """Patch tables read through ``read`` (guest virtual memory, the guest stopped);
    what cannot be read is in :attr:`missing`, with why."""

    def __init__(self, symbols: KernelSymbols, read: ReadFn, btf: Btf | None) -> None:
        self.symbols, self.read, self.btf = symbols, read, btf
        self.missing: list[str] = []

    def table(self, section: str, first: str, last: str) -> tuple[int, bytes] | None:
        """``(address, bytes)`` of the table between kallsyms' ``first`` and ``last``."""
        syms = self.symbols
        start, stop = syms.get(first), syms.get(last)
        if start is None or stop is None or stop < start:
            self.missing.append(f"{section}: {first}/{last} not in kallsyms")
            return None
        if section == ".smp_locks" and not self._smp_locks_kept(start):
            return None
        init = syms.get("__init_begin"), syms.get("__init_end")
        if init[0] is not None and init[1] is not None and init[0] <= start < init[1]:
            self.missing.append(f"{section}: in the init memory the kernel freed after boot")
            return None
        try:
            return start, self.read(start, stop - start)
        except KprobeVMError as exc:
            self.missing.append(f"{section}: {exc}")
            return None

    def _smp_locks_kept(self, locks: int) -> bool:
        """Whether the core kernel's lock prefixes are still on the kernel's
        ``smp_alt_modules`` list (``struct smp_alt_module``), which its
        ``alternatives_text_reserved`` checks. Off the list, the kernel has freed the
        table (one possible CPU, or not patched for one) and never rewrites them again;
        unknown (no list or BTF) counts as missing."""
        head = self.symbols.get("smp_alt_modules")
        if head is None or self.btf is None:
            self.missing.append(".smp_locks: no smp_alt_modules list, or no BTF to read it")
            return False
        try:
            node_at = self.btf.struct_member_offset("smp_alt_module", "next")
            locks_at = self.btf.struct_member_offset("smp_alt_module", "locks")
            for node in list_for_each(self.read, head, "smp_alt_modules"):
                entry = node - node_at
                if int.from_bytes(self.read(entry + locks_at, 8), "little") == locks:
                    return True
        except KprobeVMError as exc:
            self.missing.append(f".smp_locks: {exc}")
        return False

    def ftrace_sites(self) -> set[int]:
        """Every ftrace call site the kernel has a record of (core and modules)."""
        head = self.symbols.get("ftrace_pages_start")
        if head is None or self.btf is None:
            why = "no ftrace_pages_start in kallsyms" if head is None else "no BTF"
            self.missing.append(f"ftrace call sites: {why}")
            return set()
        btf = self.btf
        try:
            next_at = btf.struct_member_offset("ftrace_page", "next")
            records_at = btf.struct_member_offset("ftrace_page", "records")
            index_at = btf.struct_member_offset("ftrace_page", "index")
            ip_at = btf.struct_member_offset("dyn_ftrace", "ip")
            size = btf.type_size("dyn_ftrace")
            sites: set[int] = set()
            page = int.from_bytes(self.read(head, 8), "little")
            for _ in range(_MAX_PAGES):
                if not page:
                    return sites
                records = int.from_bytes(self.read(page + records_at, 8), "little")
                count = int.from_bytes(self.read(page + index_at, 4), "little", signed=True)
                if count > 0:
                    data = self.read(records, count * size)
                    sites.update(
                        int.from_bytes(data[k + ip_at : k + ip_at + 8], "little")
                        for k in range(0, count * size, size)
                    )
                page = int.from_bytes(self.read(page + next_at, 8), "little")
        except KprobeVMError as exc:
            self.missing.append(f"ftrace call sites: {exc}")
            return set()
        self.missing.append(f"ftrace call sites: the page list runs past {_MAX_PAGES} pages")
        return set()
