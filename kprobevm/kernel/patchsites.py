"""Text the guest kernel rewrites at run time, where an int3 of ours must not go.

The kernel refuses kprobes on jump labels (``jump_label_text_reserved``), static calls
(``static_call_text_reserved``), alternatives and SMP lock prefixes
(``alternatives_text_reserved``). A host-side kprobe must also keep off instructions
with an exception-table entry (a fault in the slot copy would find no fixup: the kernel
repairs that in ``kprobe_fault_handler``, we cannot) and off ftrace call sites while
the guest's ftrace has them patched (ftrace would find our int3 and report a bug).
The tables come from the vmlinux ELF; they are position independent (s32 offsets
relative to the entry), so the slid ELF view gives live addresses.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.patchsites_memory import LiveTables
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["FTRACE_NOP", "PatchSites", "Site"]

FTRACE_NOP = bytes.fromhex("0f1f440000")
"""The 5-byte NOP an unused ftrace call site holds."""


@dataclass(frozen=True)
class Site:
    """A rewritten range ``[start, end)`` and what rewrites it."""

    start: int
    end: int
    reason: str


class PatchSites:
    """Sorted ranges of run-time patched text, and the ftrace call sites."""

    def __init__(
        self,
        sites: list[Site],
        ftrace: set[int],
        read: Callable[[int, int], bytes] | None = None,
        missing: list[str] | None = None,
    ) -> None:
        self.missing = missing or []
        """Tables that could not be read (and why): probes there are not refused."""
        self.sites = sorted(sites, key=lambda s: s.start)
        self._starts = [s.start for s in self.sites]
        # a range can be long (a static call trampoline section): keep the running max end
        self._max_end: list[int] = []
        end = 0
        for s in self.sites:
            end = max(end, s.end)
            self._max_end.append(end)
        self.ftrace = ftrace
        self.read = read

    @classmethod
    def build(
        cls,
        symbols: KernelSymbols,
        vmlinux: Vmlinux | None,
        read: Callable[[int, int], bytes] | None = None,
        *,
        live: LiveTables | None = None,
    ) -> PatchSites:
        """Collect the sites from the (slid) vmlinux, else from the kernel's memory
        (``live``); with neither, only static call trampolines."""
        sites: list[Site] = []
        ftrace: set[int] = set()
        table: Callable[[str, str, str], tuple[int, bytes] | None] | None = None
        if vmlinux is not None:

            def table(section: str, first: str, last: str) -> tuple[int, bytes] | None:
                return _table(vmlinux, symbols, section, first, last)

        elif live is not None:
            table = live.table
        if table is not None:
            sites += _relative(
                table("__jump_table", "__start___jump_table", "__stop___jump_table"),
                16,
                "jump label",
                5,
            )
            sites += _relative(
                table(
                    ".static_call_sites", "__start_static_call_sites", "__stop_static_call_sites"
                ),
                8,
                "static call",
                5,
            )
            sites += _alternatives(
                table(".altinstructions", "__alt_instructions", "__alt_instructions_end")
            )
            sites += _relative(
                table(".smp_locks", "__smp_locks", "__smp_locks_end"), 4, "SMP lock prefix", 1
            )
            sites += _relative(
                table("__ex_table", "__start___ex_table", "__stop___ex_table"),
                12,
                "exception table",
                1,
            )
        if vmlinux is not None:
            mcount = _table(vmlinux, symbols, "__mcount_loc", "__start_mcount_loc",
                            "__stop_mcount_loc")  # fmt: skip
            if mcount is not None:
                # absolute addresses, relocated by the kernel at boot: slide them too
                ftrace = {v + vmlinux.slide for (v,) in struct.iter_unpack("<Q", mcount[1]) if v}
        elif live is not None:
            ftrace = live.ftrace_sites()  # __mcount_loc was init memory: ftrace's records
        # static call trampolines are rewritten whenever their target changes
        sites += [
            Site(sym.address, sym.address + max(sym.size, 8), "static call trampoline")
            for sym in symbols.functions()
            if sym.name.startswith("__SCT__")
        ]  # fmt: skip
        return cls(sites, ftrace, read, live.missing if live is not None else None)

    def find(self, addr: int) -> Site | None:
        """The patched range containing ``addr``, if any."""
        i = bisect.bisect_right(self._starts, addr) - 1
        while i >= 0 and self._max_end[i] > addr:
            site = self.sites[i]
            if site.start <= addr < site.end:
                return site
            i -= 1
        return None

    def reserved(self, addr: int) -> str | None:
        """Why a probe at ``addr`` must be refused, or None."""
        site = self.find(addr)
        if site is not None:
            return f"{site.reason} at {site.start:#x}"
        if addr in self.ftrace and self.read is not None:
            current = self.read(addr, len(FTRACE_NOP))
            if current != FTRACE_NOP:
                return f"ftrace call site in use ({current.hex()})"
        return None


def _table(
    vmlinux: Vmlinux, symbols: KernelSymbols, section: str, first: str, last: str
) -> tuple[int, bytes] | None:
    """A table's address and bytes: its own section, else kallsyms' start/stop symbols
    (the Debian vmlinux has no section headers for __jump_table, __mcount_loc, ...)."""
    if vmlinux.has_section(section):
        sec = vmlinux.section(section)
        return sec.vaddr, vmlinux.read_section(section)
    start, stop = symbols.get(first), symbols.get(last)
    if start is None or stop is None or stop <= start:
        return None
    return start, vmlinux.read(start, stop - start)


def _relative(
    table: tuple[int, bytes] | None, entry_size: int, reason: str, length: int
) -> list[Site]:
    """Entries whose first field is an s32 offset from the entry to the patched code."""
    if table is None:
        return []
    base, data = table
    out = []
    for pos in range(0, len(data) - entry_size + 1, entry_size):
        (rel,) = struct.unpack_from("<i", data, pos)
        code = base + pos + rel
        out.append(Site(code, code + length, reason))
    return out


def _alternatives(table: tuple[int, bytes] | None) -> list[Site]:
    """``struct alt_instr``: s32 instr, s32 repl, u16 cpuid, u8 instrlen, u8 replen (12
    bytes on 6.1; 6.3 made cpuid u32, 14 bytes)."""
    if table is None:
        return []
    base, data = table
    size = 12 if len(data) % 12 == 0 else 14
    fmt = "<iiHBB" if size == 12 else "<iiIBB"
    out = []
    for pos in range(0, len(data) - size + 1, size):
        rel, _repl, _cpuid, instrlen, _replen = struct.unpack_from(fmt, data, pos)
        code = base + pos + rel
        out.append(Site(code, code + max(instrlen, 1), "alternative"))
    return out
