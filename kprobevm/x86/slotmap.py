"""Executable guest pages for slots: reserved physical memory mapped into the module area.

The guest kernel never hands out the physical range reserved on its command line
(``memmap=SIZE$BASE``). We take 4 KiB pages from it and map them through one page table
of our own, hung in an empty PMD entry of the top PUD (PGD[511] -> PUD[511] with 4-level
paging, PML5[511] -> P4D[511] -> PUD[511] with 5-level: the module and fixmap region,
shared by every address space), so the pages sit within +-2 GiB of kernel text (where
KASLR puts it, too) and rel32 jumps reach both ways. x86 caches no non-present entries, so a new
mapping needs no TLB flush; removing one does (CR3 rewritten on every vCPU).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm import faults
from kprobevm.errors import GuestFaultError, KprobeError
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.pagetable import (
    ACCESSED,
    DIRTY,
    LEVEL_NAMES,
    NX,
    PAGE_SIZE_2M,
    PRESENT,
    RW,
    walk,
)

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.transport import GdbTransport
    from kprobevm.kprobes.journal import Journal

__all__ = [
    "PMD_SPAN",
    "ExecutablePages",
    "Reserve",
    "SlotArea",
    "check_reserve",
    "find_slot_pmd",
    "flush_tlbs",
    "parse_memmap_reserve",
]

PMD_SPAN = PAGE_SIZE_2M
"""The slot area: what one page-middle-directory entry maps."""
TOP_PUD_REGION = 0xFFFFFFFFC0000000
"""The last GiB of the address space (modules, fixmap): what the top PUD entry maps, in
4- and 5-level paging alike."""
# The module area ends at 0xffffffffff000000 on x86-64; modules are loaded from its
# bottom, so we search for an empty PMD from its top down.
TOP_PMD_INDEXES = range(503, 479, -1)


@dataclass(frozen=True)
class Reserve:
    """A guest physical range the guest kernel does not use."""

    base: int
    size: int

    def __post_init__(self) -> None:
        if self.base % PAGE_SIZE or self.size % PAGE_SIZE or self.size < 8 * PAGE_SIZE:
            raise ValueError(f"reserve {self.base:#x}+{self.size:#x} is not usable")


_SIZE = r"(\d+|0x[0-9a-fA-F]+)([KMG]?)"


def _size(number: str, unit: str) -> int:
    value = int(number, 0)
    return value << {"": 0, "K": 10, "M": 20, "G": 30}[unit]


def parse_memmap_reserve(cmdline: str) -> Reserve | None:
    """The first ``memmap=SIZE$BASE`` (reserved) range of a kernel command line."""
    for m in re.finditer(rf"(?:^|\s)memmap={_SIZE}\${_SIZE}(?=\s|$)", cmdline):
        return Reserve(base=_size(m[3], m[4]), size=_size(m[1], m[2]))
    return None


_IOMEM_LINE = re.compile(r"^( *)([0-9a-f]+)-([0-9a-f]+) : (.*)$")
_KERNEL_IMAGE = ("Kernel code", "Kernel rodata", "Kernel data", "Kernel bss")


def check_reserve(iomem: str, reserve: Reserve) -> None:
    """Raise KprobeError unless the guest's own ``/proc/iomem`` (read as root) shows
    ``reserve`` inside one top-level ``Reserved`` range and no part of the kernel image in
    it: with KASLR the kernel picks its physical load address at boot, and a ``memmap=``
    the kernel did not honour would hand slot pages to the guest's allocator."""
    end = reserve.base + reserve.size
    covered = False
    for line in iomem.splitlines():
        m = _IOMEM_LINE.match(line)
        if m is None:
            continue
        start, last, name = int(m[2], 16), int(m[3], 16), m[4].strip()
        if name in _KERNEL_IMAGE and start < end and last >= reserve.base:
            raise KprobeError(
                f"the guest kernel's {name} ({start:#x}-{last:#x}) lies in the slot reserve"
                f" {reserve.base:#x}-{end - 1:#x}: choose another memmap= range"
            )
        if not m[1] and name == "Reserved" and start <= reserve.base and last >= end - 1:
            covered = True
    if not covered:
        raise KprobeError(
            f"the guest's /proc/iomem shows no reserved range over the slot reserve"
            f" {reserve.base:#x}-{end - 1:#x} (memmap= not honoured, or beyond guest RAM)"
        )


class SlotArea:
    """2 MiB of kernel virtual space backed by reserved pages, mapped by the host."""

    def __init__(
        self,
        memory: GuestMemory,
        journal: Journal,
        reserve: Reserve,
        cr3: int,
        *,
        la57: bool,
        flush_tlbs: Callable[[], None],
    ) -> None:
        """``la57`` is the guest's paging mode (CR4.LA57, :func:`la57_enabled`);
        ``flush_tlbs`` drops every vCPU's TLB (VM stopped): the host writes page tables
        behind the guest's back, so an unmapped page stays reachable through a vCPU's
        cached translation until then."""
        self.la57 = la57
        self.flush_tlbs = flush_tlbs
        self.memory = memory
        self.journal = journal
        self.reserve = reserve
        self.cr3 = cr3
        self.base = 0
        self.pmd_entry_phys = 0
        self.pmd_seq: int | None = None
        self.pte_table = reserve.base  # first reserved page holds our page table
        top = reserve.base + reserve.size - PAGE_SIZE
        self._free_phys = list(range(top, reserve.base, -PAGE_SIZE))
        self._mapped: dict[int, int] = {}  # vaddr -> paddr
        self._written: set[int] = set()  # every page we wrote, wiped at teardown
        self._next_index = 0

    def setup(self) -> int:
        """Find an empty PMD at the top of the module area and hang our page table there."""
        self.base, self.pmd_entry_phys = find_slot_pmd(self.memory.read_phys, self.cr3,
                                                       la57=self.la57)
        self.journal.note(slot_reserve=self.reserve.base, slot_reserve_size=self.reserve.size)
        self.memory.write_phys(self.pte_table, bytes(PAGE_SIZE))
        self._written.add(self.pte_table)
        entry = self.pte_table | PRESENT | RW | ACCESSED
        new = struct.pack("<Q", entry)
        self.pmd_seq = self.journal.record(
            "phys", self.pmd_entry_phys, bytes(8), new, f"PMD for slot area {self.base:#x}"
        )
        faults.kill_point("pmd_populate")
        self.memory.write_phys(self.pmd_entry_phys, new)
        return self.base

    def map_page(self, *, executable: bool = True, writable: bool = False) -> int:
        """Map one zeroed reserved page at the next free address; return its address."""
        return self.map_run(1, executable=executable, writable=writable)

    def map_run(self, pages: int, *, executable: bool = True, writable: bool = False) -> int:
        """Map ``pages`` zeroed reserved pages at consecutive addresses (the first free
        run long enough: pages unmapped earlier leave holes); return the first's."""
        used = {(v - self.base) // PAGE_SIZE for v in self._mapped}
        first = next((i for i in range(512 - pages + 1)
                      if not any(i + k in used for k in range(pages))), None)  # fmt: skip
        if first is None:
            raise KprobeError(f"slot area: no {pages} free consecutive pages left")
        for k in range(pages):
            self._map_at(first + k, executable=executable, writable=writable)
        return self.base + first * PAGE_SIZE

    def _map_at(self, index: int, *, executable: bool, writable: bool) -> None:
        if not self._free_phys:
            raise KprobeError(f"reserved memory {self.reserve.base:#x} is used up")
        vaddr = self.base + index * PAGE_SIZE
        paddr = self._free_phys.pop()
        self.memory.write_phys(paddr, bytes(PAGE_SIZE))
        self._written.add(paddr)
        pte = paddr | PRESENT | ACCESSED | DIRTY
        if writable:
            pte |= RW
        if not executable:
            pte |= NX
        faults.kill_point("set_pte")
        self.memory.write_phys(self.pte_table + 8 * index, struct.pack("<Q", pte))
        self._mapped[vaddr] = paddr

    def unmap_page(self, vaddr: int) -> None:
        """Unmap a page the caller knows no vCPU runs in (VM stopped).

        Every vCPU's TLB is flushed before the address or the page can be handed out
        again: a vCPU still holding the old translation would otherwise run whatever the
        physical page holds next, or reach a new page through an old address.
        """
        paddr = self._mapped.pop(vaddr)
        index = (vaddr - self.base) // PAGE_SIZE
        self.memory.write_phys(self.pte_table + 8 * index, bytes(8))
        self.flush_tlbs()
        self._free_phys.append(paddr)

    def phys(self, vaddr: int) -> int:
        """The physical address behind a mapped address of ours."""
        page = vaddr & ~(PAGE_SIZE - 1)
        return self._mapped[page] + (vaddr - page)

    @property
    def free_pages(self) -> int:
        """Reserved pages not mapped yet: what sizes (the record ring) must fit in."""
        return len(self._free_phys)

    def contains(self, vaddr: int) -> bool:
        return self.base <= vaddr < self.base + PMD_SPAN

    def teardown(self) -> None:
        """Remove the PMD entry (TLB flush is the caller's: it knows the vCPUs), then wipe
        every page we wrote: the reserve is left as unused as we found it, with none of
        our code in it (no vCPU runs there: the caller waited for them to leave)."""
        if self.pmd_seq is None:
            return
        current = self.memory.read_phys(self.pmd_entry_phys, 8)
        expected = struct.pack("<Q", self.pte_table | PRESENT | RW | ACCESSED)
        removed = current == expected
        if removed:
            self.memory.write_phys(self.pmd_entry_phys, bytes(8))
            self.journal.undone(self.pmd_seq)
        self.pmd_seq = None
        self._mapped.clear()
        if removed:  # else someone else's table may point at them: leave them be
            for paddr in sorted(self._written):
                self.memory.write_phys(paddr, bytes(PAGE_SIZE))
        self._written.clear()


def find_slot_pmd(
    read_phys: Callable[[int, int], bytes], cr3: int, *, la57: bool
) -> tuple[int, int]:
    """Where a slot area would go now: its base address and the physical address of its
    PMD entry (the first empty one from the top of the module area down). ``la57`` is the
    guest's paging mode: with 5-level paging the walk has one table more above the PUD."""
    entries = walk(read_phys, cr3, TOP_PUD_REGION, la57=la57)
    pud = next((e for e in entries if e.level == 3), None)
    if pud is None or not pud.present or pud.huge:
        last = entries[-1]
        state = "a 1 GiB page" if last.huge else "not present"
        raise GuestFaultError(
            TOP_PUD_REGION,
            f"{LEVEL_NAMES[last.level]}[{last.index}] {state} ({len(entries)} levels walked,"
            f" {'5' if la57 else '4'}-level paging): no page table for the module area",
            level=last.level,
        )
    pmd_table = pud.next_paddr
    for index in TOP_PMD_INDEXES:
        raw = read_phys(pmd_table + 8 * index, 8)
        if int.from_bytes(raw, "little") == 0:
            return TOP_PUD_REGION + index * PMD_SPAN, pmd_table + 8 * index
    raise KprobeError("no empty PMD entry at the top of the module area")


def flush_tlbs(client: GdbTransport) -> None:
    """Drop every vCPU's TLB (VM stopped): QEMU flushes a vCPU's TLB when its CR3 is
    written, and the slot area's pages are not global."""
    for thread in client.threads():
        client.select_thread("g", thread)
        client.write_register("cr3", client.read_register("cr3"))


class ExecutablePages:
    """A slot area as a SlotCache's page provider: executable pages, read-only to the guest
    (instruction slots, record programs)."""

    def __init__(self, area: SlotArea) -> None:
        self.area = area

    def map_page(self) -> int:
        return self.area.map_page(executable=True)

    def unmap_page(self, address: int) -> None:
        self.area.unmap_page(address)
