"""Instruction slots: the kernel's kprobe_insn_cache, kept on the host for guest pages.

Slots are fixed-size cells in executable slot pages. A slot is CLEAN (free), USED
(holds a probe's out-of-line code) or DIRTY (freed, but a vCPU, or a task preempted
inside, may still be executing it). Dirty slots become clean only in garbage collection,
and only once the engine says nothing can be inside them (the kernel waits for an
RCU-tasks grace period; the trap channel checks every vCPU's RIP and waits for each
vCPU's quiescent state, or on a preemptible kernel for every task to be seen out, see
:mod:`kprobevm.trap.grace`). Collection also frees empty pages but keeps one.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kprobevm.errors import SlotExhausted
from kprobevm.x86.constants import PAGE_SIZE

__all__ = ["Slot", "SlotCache", "SlotPage", "SlotPageProvider", "SlotState"]



class SlotState(enum.Enum):
    """The kernel's SLOT_CLEAN / SLOT_USED / SLOT_DIRTY."""

    CLEAN = 0
    USED = 1
    DIRTY = 2


@dataclass(frozen=True)
class Slot:
    """One instruction slot: its guest virtual address and where it lives."""

    address: int
    page: int
    """Guest virtual address of the slot page."""
    index: int


@dataclass
class SlotPage:
    """A mapped, executable guest page cut into slots."""

    address: int
    states: list[SlotState]
    freed_at: list[float] = field(default_factory=list)
    nused: int = 0

    def ndirty(self) -> int:
        return sum(1 for s in self.states if s is SlotState.DIRTY)


class SlotPageProvider(Protocol):
    """Maps and unmaps executable guest pages for slots (the kernel's alloc/free_insn_page)."""

    def map_page(self) -> int:
        """Map a new executable page; return its guest virtual address."""
        ...

    def unmap_page(self, address: int) -> None:
        """Unmap a page that no longer holds any slot."""
        ...


InUse = Callable[[int, int], bool]
"""in_use(start, end): may some vCPU still be executing in [start, end)?"""


class SlotCache:
    """Allocates slots of ``slot_size`` bytes in pages from ``provider``."""

    def __init__(
        self,
        provider: SlotPageProvider,
        *,
        slot_size: int = 64,
        grace_seconds: float = 1.0,
        max_pages: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if PAGE_SIZE % slot_size:
            raise ValueError(f"slot size {slot_size} does not divide the page size")
        self.provider = provider
        self.slot_size = slot_size
        self.slots_per_page = PAGE_SIZE // slot_size
        self.grace_seconds = grace_seconds
        self.max_pages = max_pages
        self.clock = clock
        self.pages: dict[int, SlotPage] = {}
        self.in_use: InUse = lambda start, end: False
        self.grace_over: Callable[[float], bool] = lambda freed_at: True
        """grace_over(freed_at): has everything that may have been inside at ``freed_at``
        (a vCPU, a preempted task) been seen out since?"""
        self.before_collect: Callable[[], None] = lambda: None

    # -- allocation ------------------------------------------------------------------

    def get_insn_slot(self) -> Slot:
        """A clean slot, marked USED; collects garbage or maps a page when none is free."""
        slot = self._find_clean()
        if slot is None and self._dirty_count():
            self.collect_garbage()
            slot = self._find_clean()
        if slot is None:
            if len(self.pages) >= self.max_pages:
                raise SlotExhausted(
                    f"all {len(self.pages)} slot pages are full "
                    f"({self._dirty_count()} dirty slots still in their grace period)"
                )
            address = self.provider.map_page()
            self.pages[address] = SlotPage(
                address=address,
                states=[SlotState.CLEAN] * self.slots_per_page,
                freed_at=[0.0] * self.slots_per_page,
            )
            slot = self._take(self.pages[address], 0)
        return slot

    def free_insn_slot(self, slot: Slot, *, dirty: bool = True) -> None:
        """Give a slot back; DIRTY until garbage collection proves nobody runs it."""
        page = self.pages[slot.page]
        if page.states[slot.index] is not SlotState.USED:
            raise ValueError(f"slot {slot.address:#x} is not in use")
        if dirty:
            page.states[slot.index] = SlotState.DIRTY
            page.freed_at[slot.index] = self.clock()
        else:
            page.states[slot.index] = SlotState.CLEAN
            page.nused -= 1

    # -- garbage collection ----------------------------------------------------------

    def collect_garbage(self) -> int:
        """Clean every dirty slot past its grace period and not in use; free empty pages.

        Returns how many slots were collected. One page is always kept, as the kernel does.
        """
        self.before_collect()
        now = self.clock()
        collected = 0
        for page in self.pages.values():
            for i, state in enumerate(page.states):
                if state is not SlotState.DIRTY:
                    continue
                if now - page.freed_at[i] < self.grace_seconds:
                    continue
                if not self.grace_over(page.freed_at[i]):
                    continue
                start = page.address + i * self.slot_size
                if self.in_use(start, start + self.slot_size):
                    continue
                page.states[i] = SlotState.CLEAN
                page.nused -= 1
                collected += 1
        self._free_empty_pages()
        return collected

    def _free_empty_pages(self) -> None:
        # The first page stays mapped even when empty, as the kernel keeps one page.
        for address in list(self.pages)[1:]:
            if self.pages[address].nused == 0:
                del self.pages[address]
                self.provider.unmap_page(address)

    # -- queries -----------------------------------------------------------------------

    def _find_clean(self) -> Slot | None:
        for page in self.pages.values():
            if page.nused < self.slots_per_page:
                for i, state in enumerate(page.states):
                    if state is SlotState.CLEAN:
                        return self._take(page, i)
        return None

    def _take(self, page: SlotPage, i: int) -> Slot:
        page.states[i] = SlotState.USED
        page.nused += 1
        return Slot(address=page.address + i * self.slot_size, page=page.address, index=i)

    def _dirty_count(self) -> int:
        return sum(page.ndirty() for page in self.pages.values())

    def contains(self, address: int) -> bool:
        """Is ``address`` inside one of our slot pages?"""
        return (address & ~(PAGE_SIZE - 1)) in self.pages

    def stats(self) -> dict[str, int]:
        """Counts for benchmarks and `vm.list_kprobes()`: pages, used, dirty."""
        used = sum(s is SlotState.USED for p in self.pages.values() for s in p.states)
        return {"pages": len(self.pages), "used": used, "dirty": self._dirty_count()}
