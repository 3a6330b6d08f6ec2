"""x86-64 page-table walker: guest virtual to physical on the host, 4- and 5-level paging.

Reads the tables with a ``read_phys(paddr, n)`` callable, so it works over the gdbstub
or over a synthetic image in a test. A failed walk says which level was not present.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kprobevm.errors import GuestFaultError
from kprobevm.x86.constants import MASK64

__all__ = [
    "ACCESSED",
    "ADDR_MASK",
    "DIRTY",
    "GLOBAL",
    "LEVEL_NAMES",
    "NX",
    "PAGE_SIZE_1G",
    "PAGE_SIZE_2M",
    "PAGE_SIZE_4K",
    "PCD",
    "PRESENT",
    "PS",
    "PWT",
    "RW",
    "USER",
    "X86_CR4_LA57",
    "PageTableEntry",
    "Translation",
    "la57_enabled",
    "pte_index",
    "translate",
    "walk",
]

# Entry bits (the kernel's _PAGE_*).
PRESENT = 1 << 0
RW = 1 << 1
USER = 1 << 2
PWT = 1 << 3
PCD = 1 << 4
ACCESSED = 1 << 5
DIRTY = 1 << 6
PS = 1 << 7
"""Page size: in a PDPT entry a 1 GiB page, in a PD entry a 2 MiB page."""
GLOBAL = 1 << 8
NX = 1 << 63

X86_CR4_LA57 = 1 << 12
"""CR4.LA57: 5-level paging."""


def la57_enabled(cr4: int) -> bool:
    """Whether the vCPU whose CR4 this is walks 5-level page tables: decided from the
    guest's own register, since a CPU offering ``la57`` does not make the kernel use it."""
    return bool(cr4 & X86_CR4_LA57)

PAGE_SIZE_4K = 1 << 12
PAGE_SIZE_2M = 1 << 21
PAGE_SIZE_1G = 1 << 30

ADDR_MASK = ((1 << 52) - 1) & ~0xFFF
"""Physical-address bits of an entry (bits 12..51)."""
_CR3_MASK = ADDR_MASK
"""CR3 without PCID (bits 0..11) and the no-flush bit 63."""

LEVEL_NAMES = {5: "PML5", 4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
"""Table names by level (the kernel calls them P4D/PGD, PUD, PMD, PTE tables)."""
_SHIFT = {5: 48, 4: 39, 3: 30, 2: 21, 1: 12}


@dataclass(frozen=True)
class PageTableEntry:
    """One entry met on a walk: where it lives (``paddr``) and what it holds."""

    level: int
    """5..1: PML5, PML4, PDPT, PD, PT."""
    index: int
    paddr: int
    """Guest-physical address of the entry itself (to rewrite it)."""
    value: int

    @property
    def table(self) -> str:
        """The name of the table holding the entry."""
        return LEVEL_NAMES[self.level]

    @property
    def present(self) -> bool:
        return bool(self.value & PRESENT)

    @property
    def huge(self) -> bool:
        """True for a 1 GiB (PDPT) or 2 MiB (PD) page mapped right here."""
        return self.level in (2, 3) and bool(self.value & PS)

    @property
    def next_paddr(self) -> int:
        """The physical address the entry points to (table or page frame)."""
        return self.value & ADDR_MASK


@dataclass(frozen=True)
class Translation:
    """A successful walk: the physical address and the mapping's attributes."""

    vaddr: int
    paddr: int
    page_size: int
    level: int
    """The level whose entry mapped the page: 1 (4K), 2 (2M) or 3 (1G)."""
    writable: bool
    user: bool
    nx: bool
    global_: bool
    dirty: bool
    accessed: bool

    @property
    def page_base(self) -> int:
        """The physical address of the start of the page."""
        return self.paddr & ~(self.page_size - 1)


def pte_index(vaddr: int, level: int) -> int:
    """The index ``vaddr`` uses in the table at ``level`` (9 bits each)."""
    return (vaddr >> _SHIFT[level]) & 0x1FF


def _canonical(vaddr: int, la57: bool) -> bool:
    bits = 57 if la57 else 48
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (64 - bits + 1)) - 1


def walk(
    read_phys: Callable[[int, int], bytes], cr3: int, vaddr: int, *, la57: bool = False
) -> list[PageTableEntry]:
    """The entries a hardware walk of ``vaddr`` reads, top level first.

    Stops after the first entry that is not present or maps a page (check the last one).
    """
    vaddr &= MASK64
    if not _canonical(vaddr, la57):
        raise GuestFaultError(vaddr, "non-canonical address")
    table = cr3 & _CR3_MASK
    entries: list[PageTableEntry] = []
    for level in range(5 if la57 else 4, 0, -1):
        index = pte_index(vaddr, level)
        paddr = table + 8 * index
        raw = read_phys(paddr, 8)
        if len(raw) != 8:
            raise GuestFaultError(vaddr, f"short read of the {LEVEL_NAMES[level]} entry",
                                  level=level)
        entry = PageTableEntry(level, index, paddr, int.from_bytes(raw, "little"))
        entries.append(entry)
        if not entry.present or entry.huge:
            break
        table = entry.next_paddr
    return entries


def translate(
    read_phys: Callable[[int, int], bytes], cr3: int, vaddr: int, *, la57: bool = False
) -> Translation:
    """Translate ``vaddr`` as the MMU would from ``cr3`` (pass ``la57`` from CR4 bit 12).

    Raises GuestFaultError(address, reason="not present at PD", level=2) and the like.
    Writable/user are the AND of every level's bit, NX the OR (as the MMU combines them).
    """
    entries = walk(read_phys, cr3, vaddr, la57=la57)
    last = entries[-1]
    if not last.present:
        raise GuestFaultError(vaddr, f"not present at {last.table}", level=last.level)
    if last.huge and last.level == 3:
        size = PAGE_SIZE_1G
        base = last.value & ADDR_MASK & ~(PAGE_SIZE_1G - 1)
    elif last.huge:
        size = PAGE_SIZE_2M
        base = last.value & ADDR_MASK & ~(PAGE_SIZE_2M - 1)
    else:
        size = PAGE_SIZE_4K
        base = last.value & ADDR_MASK
    writable = all(e.value & RW for e in entries)
    user = all(e.value & USER for e in entries)
    nx = any(e.value & NX for e in entries)
    return Translation(
        vaddr=vaddr & MASK64,
        paddr=base | (vaddr & (size - 1)),
        page_size=size,
        level=last.level,
        writable=writable,
        user=user,
        nx=nx,
        global_=bool(last.value & GLOBAL),
        dirty=bool(last.value & DIRTY),
        accessed=bool(last.value & ACCESSED),
    )
