"""The slot area's page mapping on a stand-in for guest-physical memory: an unmapped page
is out of every vCPU's TLB before its address or its page is handed out again."""

from __future__ import annotations

from dataclasses import dataclass, field

from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.slotmap import Reserve, SlotArea


@dataclass
class _Physical:
    writes: list[tuple[int, bytes]] = field(default_factory=list)

    def write_phys(self, paddr: int, data: bytes) -> None:
        self.writes.append((paddr, data))


def test_unmap_flushes_every_tlb_before_the_page_can_be_mapped_again() -> None:
    events: list[str] = []
    memory = _Physical()
    area = SlotArea(memory, None, Reserve(0x1F000000, 16 << 20), 0,  # type: ignore[arg-type]
                    flush_tlbs=lambda: events.append("flush"))  # fmt: skip
    first = area.map_page()
    second = area.map_page()
    area.unmap_page(first)
    assert events == ["flush"]
    pte = area.pte_table + 8 * ((first - area.base) // PAGE_SIZE)
    assert memory.writes[-1] == (pte, bytes(8))  # the PTE was cleared before the flush
    again = area.map_page()
    assert again == first and area.phys(second) != area.phys(again)
