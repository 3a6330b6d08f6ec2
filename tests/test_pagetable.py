"""The page-table walker over a synthetic page-table image, and over a booted guest (vm)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kprobevm.errors import GuestFaultError
from kprobevm.guest.vm import VM
from kprobevm.x86.constants import MASK64
from kprobevm.x86.pagetable import (
    GLOBAL,
    NX,
    PAGE_SIZE_1G,
    PAGE_SIZE_2M,
    PAGE_SIZE_4K,
    PRESENT,
    PS,
    RW,
    USER,
    X86_CR4_LA57,
    la57_enabled,
    pte_index,
    translate,
    walk,
)


class Image:
    """Sparse guest-physical memory of 8-byte entries, with a table allocator."""

    def __init__(self) -> None:
        self.words: dict[int, int] = {}
        self.next_table = 0x100000

    def table(self) -> int:
        t = self.next_table
        self.next_table += 0x1000
        return t

    def set(self, table: int, index: int, value: int) -> None:
        self.words[table + 8 * index] = value

    def read_phys(self, paddr: int, n: int) -> bytes:
        assert n == 8 and paddr % 8 == 0
        return self.words.get(paddr, 0).to_bytes(8, "little")

    def map(self, root: int, vaddr: int, paddr: int, *, levels: int = 4, size: int = PAGE_SIZE_4K,
            flags: int = RW) -> None:
        """Map one page, creating the intermediate tables."""
        stop = {PAGE_SIZE_4K: 1, PAGE_SIZE_2M: 2, PAGE_SIZE_1G: 3}[size]
        table = root
        for level in range(levels, stop, -1):
            idx = pte_index(vaddr, level)
            entry = self.words.get(table + 8 * idx, 0)
            if not entry & PRESENT:
                entry = self.table() | PRESENT | RW | USER
                self.set(table, idx, entry)
            table = entry & ~0xFFF & ((1 << 52) - 1)
        leaf = paddr | PRESENT | flags | (PS if stop > 1 else 0)
        self.set(table, pte_index(vaddr, stop), leaf)


KTEXT = 0xFFFFFFFF81000000


def test_4level_4k_page_with_pcid_and_flags() -> None:
    img = Image()
    root = img.table()
    img.map(root, KTEXT + 0x3000, 0x1234000, flags=GLOBAL)
    cr3 = root | 0x5 | (1 << 63)  # PCID and the no-flush bit are not address bits
    t = translate(img.read_phys, cr3, KTEXT + 0x3123)
    assert t.paddr == 0x1234123 and t.page_size == PAGE_SIZE_4K and t.level == 1
    assert not t.writable and not t.user and t.global_ and not t.nx
    assert t.page_base == 0x1234000
    entries = walk(img.read_phys, cr3, KTEXT + 0x3123)
    assert [e.table for e in entries] == ["PML4", "PDPT", "PD", "PT"]
    assert entries[0].index == 511 and entries[0].paddr == root + 8 * 511
    assert entries[-1].paddr == (entries[-2].value & ~0xFFF & ((1 << 52) - 1)) + 8 * 3


def test_2m_and_1g_pages() -> None:
    img = Image()
    root = img.table()
    img.map(root, KTEXT, 0x1000000, size=PAGE_SIZE_2M, flags=RW)
    img.map(root, 0xFFFF888000000000, 0, size=PAGE_SIZE_1G, flags=RW | NX)
    t = translate(img.read_phys, root, KTEXT + 0x1ABCDE)
    assert t.paddr == 0x11ABCDE and t.page_size == PAGE_SIZE_2M and t.level == 2
    assert t.writable
    d = translate(img.read_phys, root, 0xFFFF888000000000 + 0x3FFF_FFFF)
    assert d.paddr == 0x3FFF_FFFF and d.page_size == PAGE_SIZE_1G and d.level == 3 and d.nx


def test_5level_paging() -> None:
    img = Image()
    root = img.table()
    va = 0xFF11_0000_0000_1000  # needs LA57: bits 48..56 used
    img.map(root, va, 0x777000, levels=5)
    t = translate(img.read_phys, root, va + 5, la57=True)
    assert t.paddr == 0x777005
    assert [e.table for e in walk(img.read_phys, root, va, la57=True)] == [
        "PML5", "PML4", "PDPT", "PD", "PT"]
    with pytest.raises(GuestFaultError, match="non-canonical"):
        translate(img.read_phys, root, va)  # not canonical with 4 levels
    assert X86_CR4_LA57 == 1 << 12


@pytest.mark.parametrize(("clear_level", "name"), [(4, "PML4"), (3, "PDPT"), (2, "PD"),
                                                     (1, "PT")])
def test_not_present_at_each_level(clear_level: int, name: str) -> None:
    img = Image()
    root = img.table()
    va = KTEXT + 0x5000
    img.map(root, va, 0x2000)
    entry = walk(img.read_phys, root, va)[4 - clear_level]
    img.words[entry.paddr] = entry.value & ~PRESENT
    with pytest.raises(GuestFaultError) as exc:
        translate(img.read_phys, root, va)
    assert exc.value.reason == f"not present at {name}" and exc.value.level == clear_level
    assert exc.value.address == va


def test_user_and_writable_combine_over_levels() -> None:
    img = Image()
    root = img.table()
    img.map(root, 0x400000, 0x9000, flags=RW | USER)
    t = translate(img.read_phys, root, 0x400010)
    assert t.user and t.writable
    pd = walk(img.read_phys, root, 0x400000)[2]
    img.words[pd.paddr] = pd.value & ~RW
    assert not translate(img.read_phys, root, 0x400010).writable


# -- a booted guest ----------------------------------------------------------------------


def first_mapped_4k(rp: Callable[[int, int], bytes], cr3: int, start: int,
                    end: int, *, la57: bool = False) -> int | None:
    """The lowest address in [start, end) mapped by a 4K page (4- or 5-level paging)."""
    top = 5 if la57 else 4

    def scan(table: int, level: int, base: int) -> int | None:
        data = rp(table, 4096)
        shift = 12 + 9 * (level - 1)
        for i in range(512):
            va = base | (i << shift)
            if level == top and i >= 256:  # sign-extend the top-level half
                va |= MASK64 & ~((1 << (shift + 9)) - 1)
            if va + (1 << shift) <= start or va >= end:
                continue
            entry = int.from_bytes(data[8 * i:8 * i + 8], "little")
            if not entry & PRESENT or (level in (2, 3) and entry & PS):
                continue
            if level == 1:
                return va
            found = scan(entry & ~0xFFF & ((1 << 52) - 1), level - 1, va)
            if found is not None:
                return found
        return None

    return scan(cr3 & ~0xFFF & ((1 << 52) - 1), top, 0)


def check_walks(vm: VM) -> None:
    """Kernel text, the direct map and a vmalloc address: virtual read == physical read.
    The direct map and vmalloc bases are the guest's own (``page_offset_base``,
    ``vmalloc_base``): KASLR and 5-level paging move them."""
    syms = vm.symbols
    ktext = syms["_text"]
    # QEMU takes one gdbstub client: use the facade's, with the guest held stopped
    with vm.target.stopped() as c:
        regs = c.read_registers()
        cr3, la57 = regs["cr3"], la57_enabled(regs["cr4"])
        rp: Callable[[int, int], bytes] = c.read_phys
        direct_base = int.from_bytes(c.read_memory(syms["page_offset_base"], 8), "little")
        vmalloc = int.from_bytes(c.read_memory(syms["vmalloc_base"], 8), "little")
        text = translate(rp, cr3, ktext, la57=la57)
        assert c.read_phys(text.paddr, 64) == c.read_memory(ktext, 64)
        direct = translate(rp, cr3, direct_base + 0x100000, la57=la57)
        assert direct.paddr == 0x100000
        assert c.read_phys(direct.paddr, 64) == c.read_memory(direct_base + 0x100000, 64)
        # the kernel's text through the direct map: the same bytes at two addresses
        assert c.read_memory(direct_base + text.paddr, 64) == c.read_memory(ktext, 64)
        # vmalloc: the first 4K page mapped in the vmalloc area, found by scanning tables.
        va = first_mapped_4k(rp, cr3, vmalloc, vmalloc + (32 << 40), la57=la57)
        assert va is not None, f"nothing mapped in the vmalloc area from {vmalloc:#x}"
        vmap = translate(rp, cr3, va + 0x10, la57=la57)
        assert vmap.page_size == PAGE_SIZE_4K
        assert c.read_phys(vmap.paddr, 32) == c.read_memory(va + 0x10, 32)
    # and the facade's own translate() gives the same answer
    assert vm.translate(ktext) == text.paddr


@pytest.mark.vm
def test_walk_agrees_with_the_gdbstub(vm: VM) -> None:
    """Kernel text, the direct map and a vmalloc address (see check_walks)."""
    check_walks(vm)
