"""Unit tests of the slot allocator (no guest: the page provider is a counter)."""

from __future__ import annotations

import pytest

from kprobevm.errors import SlotExhausted
from kprobevm.kprobes.slots import SlotCache, SlotState
from kprobevm.x86.constants import PAGE_SIZE


class Pages:
    def __init__(self) -> None:
        self.next = 0xFFFFFFFFFE000000
        self.mapped: list[int] = []
        self.unmapped: list[int] = []

    def map_page(self) -> int:
        address = self.next
        self.next += PAGE_SIZE
        self.mapped.append(address)
        return address

    def unmap_page(self, address: int) -> None:
        self.unmapped.append(address)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**kw: object) -> tuple[SlotCache, Pages, Clock]:
    pages, clock = Pages(), Clock()
    cache = SlotCache(pages, clock=clock, **kw)  # type: ignore[arg-type]
    return cache, pages, clock


def test_slots_are_distinct_and_fill_a_page_before_the_next() -> None:
    cache, pages, _ = make()
    slots = [cache.get_insn_slot() for _ in range(65)]
    assert len({s.address for s in slots}) == 65
    assert len(pages.mapped) == 2
    assert all(s.page == pages.mapped[0] for s in slots[:64])
    assert slots[64].address == pages.mapped[1]


def test_dirty_slot_is_not_reused_before_its_grace_period() -> None:
    cache, _, clock = make(grace_seconds=1.0)
    first = cache.get_insn_slot()
    cache.free_insn_slot(first)
    assert cache.pages[first.page].states[first.index] is SlotState.DIRTY
    assert cache.collect_garbage() == 0
    clock.now += 2
    assert cache.collect_garbage() == 1
    assert cache.get_insn_slot().address == first.address


def test_slot_that_a_vcpu_runs_is_not_collected() -> None:
    cache, _, _ = make(grace_seconds=0.0)
    slot = cache.get_insn_slot()
    cache.free_insn_slot(slot)
    busy = {slot.address}
    cache.in_use = lambda start, end: any(start <= a < end for a in busy)
    assert cache.collect_garbage() == 0
    busy.clear()
    assert cache.collect_garbage() == 1


def test_allocation_failure_triggers_gc_and_empty_pages_are_freed_but_one() -> None:
    cache, pages, clock = make(max_pages=2, grace_seconds=0.0)
    slots = [cache.get_insn_slot() for _ in range(128)]
    with pytest.raises(SlotExhausted):
        cache.max_pages = 2
        # both pages full and nothing dirty: exhaustion is reported
        for s in slots:
            assert cache.pages[s.page].states[s.index] is SlotState.USED
        cache.get_insn_slot()
    for s in slots:
        cache.free_insn_slot(s)
    clock.now += 1
    slot = cache.get_insn_slot()  # collects: all clean, second page unmapped
    assert pages.unmapped == [pages.mapped[1]]
    assert slot.page == pages.mapped[0]
    assert cache.stats() == {"pages": 1, "used": 1, "dirty": 0}


def test_double_free_is_an_error() -> None:
    cache, _, _ = make()
    slot = cache.get_insn_slot()
    cache.free_insn_slot(slot, dirty=False)
    with pytest.raises(ValueError):
        cache.free_insn_slot(slot)


def test_no_reuse_before_every_vcpu_was_quiescent() -> None:
    cache, _, clock = make(grace_seconds=0.0)
    slot = cache.get_insn_slot()
    cache.free_insn_slot(slot)
    quiescent_at = {"cpu0": 0.0}
    cache.grace_over = lambda freed: all(t > freed for t in quiescent_at.values())
    clock.now += 1
    assert cache.collect_garbage() == 0
    quiescent_at["cpu0"] = clock.now
    assert cache.collect_garbage() == 1
