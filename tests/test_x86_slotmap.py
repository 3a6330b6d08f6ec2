"""The slot area's page mapping on a stand-in for guest-physical memory: an unmapped page
is out of every vCPU's TLB before its address or its page is handed out again."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kprobevm.errors import GuestFaultError, KprobeError
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.pagetable import PRESENT, walk
from kprobevm.x86.slotmap import PMD_SPAN, Reserve, SlotArea, check_reserve, find_slot_pmd
from tests.test_pagetable import Image


@dataclass
class _Physical:
    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.writes.append((paddr, data))


def test_unmap_flushes_every_tlb_before_the_page_can_be_mapped_again() -> None:
    events: list[str] = []
    memory = _Physical()
    area = SlotArea(memory, None, Reserve(0x1F000000, 16 << 20), 0, la57=False,  # type: ignore[arg-type]
                    flush_tlbs=lambda: events.append("flush"))  # fmt: skip
    first = area.map_page()
    second = area.map_page()
    area.unmap_page(first)
    assert events == ["flush"]
    pte = area.pte_table + 8 * ((first - area.base) // PAGE_SIZE)
    assert memory.writes[-1] == (pte, bytes(8))  # the PTE was cleared before the flush
    again = area.map_page()
    assert again == first and area.phys(second) != area.phys(again)


@pytest.mark.parametrize("levels", [4, 5])
def test_the_slot_pmd_is_found_under_the_top_pud_in_either_paging_mode(levels: int) -> None:
    """The walk to the module area's PMD table has one level more with LA57; the slot area
    takes the topmost empty entry below the fixmap. (Read as 4-level, a 5-level tree hands
    back an entry of the PUD table itself: the mode must come from the guest's CR4.)"""
    img = Image()
    root = img.table()
    module = 0xFFFFFFFFC0000000
    img.map(root, module, 0x5000, levels=levels)  # a module's page: PMD[0] taken
    img.map(root, 0xFFFFFFFFFF5FF000, 0x6000, levels=levels)  # fixmap: PMD[506]
    la57 = levels == 5
    base, entry = find_slot_pmd(img.read_phys, root, la57=la57)
    assert base == module + 503 * PMD_SPAN
    pud = walk(img.read_phys, root, module, la57=la57)[levels - 3]
    assert pud.table == "PDPT" and entry == pud.next_paddr + 8 * 503
    img.set(pud.next_paddr, 503, 0x1000 | PRESENT)
    assert find_slot_pmd(img.read_phys, root, la57=la57)[0] == module + 502 * PMD_SPAN
    top = walk(img.read_phys, root, module, la57=la57)[levels - 4]
    img.set(top.paddr - top.index * 8, top.index, 0)
    with pytest.raises(GuestFaultError, match=rf"PML4\[511\] not present .* {levels}-level"):
        find_slot_pmd(img.read_phys, root, la57=la57)


IOMEM = """\
00000000-00000fff : Reserved
00100000-1effffff : System RAM
  0ec00000-0fa01ef1 : Kernel code
  0fc00000-10426fff : Kernel rodata
1f000000-1fffffff : Reserved
20000000-21fdffff : System RAM
"""


def test_the_reserve_is_checked_against_the_guests_iomem() -> None:
    """The guest is the oracle for where its kernel landed and what it reserved."""
    check_reserve(IOMEM, Reserve(0x1F000000, 16 << 20))
    with pytest.raises(KprobeError, match=r"Kernel code .* lies in the slot reserve"):
        check_reserve(IOMEM, Reserve(0x0F000000, 16 << 20))
    with pytest.raises(KprobeError, match="no reserved range over the slot reserve"):
        check_reserve(IOMEM, Reserve(0x20000000, 16 << 20))
