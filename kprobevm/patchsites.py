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
    from kprobevm.kallsyms import KernelSymbols
    from kprobevm.vmlinux import Vmlinux

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
    ) -> None:
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
    ) -> PatchSites:
        """Collect the sites from the (slid) vmlinux; without one, only ftrace checks."""
        sites: list[Site] = []
        ftrace: set[int] = set()
        if vmlinux is not None:
            sites += _relative_table(vmlinux, "__jump_table", 16, "jump label", length=5)
            sites += _relative_table(vmlinux, ".static_call_sites", 8, "static call", length=5)
            sites += _alternatives(vmlinux)
            sites += _relative_table(vmlinux, ".smp_locks", 4, "SMP lock prefix", length=1)
            sites += _relative_table(vmlinux, "__ex_table", 12, "exception table", length=1)
            if vmlinux.has_section(".static_call.text"):
                sec = vmlinux.section(".static_call.text")
                sites.append(Site(sec.vaddr, sec.end, "static call trampoline"))
            if vmlinux.has_section("__mcount_loc"):
                data = vmlinux.read_section("__mcount_loc")
                # absolute addresses, relocated by the kernel at boot: slide them too
                ftrace = {v + vmlinux.slide for (v,) in struct.iter_unpack("<Q", data) if v}
        return cls(sites, ftrace, read)

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


def _relative_table(
    vmlinux: Vmlinux, section: str, entry_size: int, reason: str, *, length: int
) -> list[Site]:
    """Entries whose first field is an s32 offset from the entry to the patched code."""
    if not vmlinux.has_section(section):
        return []
    sec = vmlinux.section(section)
    data = vmlinux.read_section(section)
    out = []
    for pos in range(0, len(data) - entry_size + 1, entry_size):
        (rel,) = struct.unpack_from("<i", data, pos)
        code = sec.vaddr + pos + rel
        out.append(Site(code, code + length, reason))
    return out


def _alternatives(vmlinux: Vmlinux) -> list[Site]:
    """``struct alt_instr`` (6.1: s32 instr, s32 repl, u16 cpuid, u8 instrlen, u8 replen)."""
    if not vmlinux.has_section(".altinstructions"):
        return []
    sec = vmlinux.section(".altinstructions")
    data = vmlinux.read_section(".altinstructions")
    out = []
    for pos in range(0, len(data) - 11, 12):
        rel, _repl, _cpuid, instrlen, _replen = struct.unpack_from("<iiHBB", data, pos)
        code = sec.vaddr + pos + rel
        out.append(Site(code, code + max(instrlen, 1), "alternative"))
    return out
