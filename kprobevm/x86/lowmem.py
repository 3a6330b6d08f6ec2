"""Slot memory for a guest booted without ``memmap=``: pages of the first MiB of RAM that
the guest kernel keeps reserved and never uses.

Since Linux 5.13 x86 reserves the whole first MiB of RAM at boot (``reserve_real_mode``
calls ``memblock_reserve(0, SZ_1M)``: BIOSes are known to scribble there) and never
hands it to the page allocator, so no allocation, reclaim or memory pressure of the
guest's can reach it. What the kernel still runs there is the real-mode trampoline (AP
boot, resume, reboot), which memblock placed top-down below 1 MiB; firmware keeps the
BIOS data area at its bottom and the EBDA at its top. Each page taken is proven unused
from the guest itself:

- the kernel is 5.13 or later (``linux_banner``): older ones gave most of it away;
- it lies in a RAM range of the kernel's own ``e820_table`` (not firmware's or ROM);
- it is at or above 64 KiB (the BIOS data area, the old ``reservelow`` default, and the
  pages ``memory_corruption_check`` watches) and below the trampoline
  (``real_mode_header``): between the trampoline and 640 KiB there is only what memblock
  could not use, the trampoline itself and the EBDA;
- its ``struct page`` (through ``vmemmap``) has ``PG_reserved``, with ``PG_reserved``'s
  number and ``struct page``'s size from the kernel's BTF: the page allocator does not
  own it. Without BTF this check is skipped, and said.

Why not the guest's own allocator (``__get_free_pages``, ``module_alloc``/
``execmem_alloc``) called from a stopped vCPU: only a vCPU stopped where it holds no
lock the allocator may take, with interrupts on and in process context, can make that
call; without the guest's help such a point is reached only through a probe hit, which
needs slot memory (or the breakpoint channel, a TCG flush per stop) first. Executable
allocations may sleep and so need the vCPU to schedule with our frame on its stack, and
the memory must be freed by a second call: a killed host leaks it, where the first MiB
needs nothing given back. The pages taken here are left zeroed at the end (our code
wiped) and named in the journal.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError, NoSlotMemory
from kprobevm.kernel.btf import BtfError
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.slotmap import Reserve

if TYPE_CHECKING:
    from kprobevm.kernel.btf import Btf
    from kprobevm.kernel.kallsyms import KernelSymbols

__all__ = [
    "FIRST_RESERVED_VERSION",
    "LOW_FLOOR",
    "ONE_MIB",
    "LowMemory",
    "check_reserve_e820",
    "e820_ram",
    "find_low_memory",
]

FIRST_RESERVED_VERSION = (5, 13, 0)
"""The first kernel that keeps the whole first MiB of RAM from its page allocator."""
LOW_FLOOR = 0x10000
"""Pages below 64 KiB are never taken (BIOS data area, ``memory_corruption_check``)."""
ONE_MIB = 0x100000
E820_TYPE_RAM = 1
# struct e820_table { u32 nr_entries; struct e820_entry entries[]; }, each entry packed
# { u64 addr; u64 size; u32 type; }: used when the kernel has no BTF to say so.
_E820_ENTRIES = 4
_E820_ENTRY = struct.Struct("<QQI")
_E820_MAX = 3 * 1024
# The direct map and vmemmap bases without KASLR's memory layout (4- and 5-level paging).
_PAGE_OFFSET = {False: 0xFFFF888000000000, True: 0xFF11000000000000}
_VMEMMAP = {False: 0xFFFFEA0000000000, True: 0xFFD4000000000000}

Read = Callable[[int, int], bytes]
"""Reads guest kernel virtual memory (VM stopped, or shared RAM)."""


@dataclass(frozen=True)
class LowMemory:
    """The first-MiB pages found for slots: the largest unused run, and how it was proven."""

    reserve: Reserve
    trampoline: int
    """Physical address of the real-mode trampoline (the run ends at or below it)."""
    version: tuple[int, int, int]
    checked_page_flags: bool
    """Whether each page's ``PG_reserved`` was read (False: no BTF to find it by)."""

    def describe(self) -> str:
        end = self.reserve.base + self.reserve.size
        flags = (
            "PG_reserved checked" if self.checked_page_flags else "PG_reserved not checked: no BTF"
        )
        return (
            f"{self.reserve.size // 1024} KiB at {self.reserve.base:#x}-{end - 1:#x} of the"
            f" first MiB, which Linux {'.'.join(map(str, self.version))} keeps reserved"
            f" (below the real-mode trampoline at {self.trampoline:#x}; {flags})"
        )


def _u64(read: Read, address: int) -> int:
    return int.from_bytes(read(address, 8), "little")


def _base(read: Read, symbols: KernelSymbols, name: str, default: int) -> int:
    """A KASLR-randomised region base (``page_offset_base``, ``vmemmap_base``), else the
    fixed one of a kernel built without the randomised layout."""
    where = symbols.get(name)
    return _u64(read, where) if where is not None else default


def e820_ram(
    read: Read, symbols: KernelSymbols, btf: Btf | None, table_name: str = "e820_table"
) -> list[tuple[int, int]]:
    """The RAM ranges ``(start, end)`` of the kernel's own ``e820_table`` (the table it
    allocates from, after its own and the command line's changes), or of another of its
    tables (``e820_table_firmware``: the firmware's, as it came)."""
    offset, entry_size = _E820_ENTRIES, _E820_ENTRY.size
    if btf is not None:
        try:
            offset = btf.struct_member_offset("e820_table", "entries")
            entry_size = btf.type_size("e820_entry")
        except BtfError:
            pass
    table = _u64(read, symbols[table_name])
    count = int.from_bytes(read(table, 4), "little")
    if not 0 < count <= _E820_MAX:
        raise NoSlotMemory(
            f"the kernel's e820_table at {table:#x} holds {count} entries: not a table"
        )
    raw = read(table + offset, count * entry_size)
    ram = []
    for i in range(count):
        addr, size, kind = _E820_ENTRY.unpack_from(raw, i * entry_size)
        if kind == E820_TYPE_RAM:
            ram.append((addr, addr + size))
    return ram


def check_reserve_e820(
    ram: list[tuple[int, int]], firmware_ram: list[tuple[int, int]], reserve: Reserve
) -> None:
    """Raise NoSlotMemory unless a ``memmap=`` reserve lies in the firmware's RAM (there
    is memory behind it) and outside the kernel's (the kernel honoured it): what
    ``/proc/iomem`` would show, read from the kernel's e820 tables when no SSH reaches it
    (the kernel image never lies outside the kernel's e820 RAM)."""
    end = reserve.base + reserve.size
    if not any(s <= reserve.base and end <= e for s, e in firmware_ram):
        raise NoSlotMemory(
            f"the memmap= reserve {reserve.base:#x}-{end - 1:#x} is not in one RAM range of"
            " the firmware's e820 table: no guest memory behind it"
        )
    for start, stop in ram:
        if start < end and reserve.base < stop:
            raise NoSlotMemory(
                f"the memmap= reserve {reserve.base:#x}-{end - 1:#x} overlaps RAM"
                f" {start:#x}-{stop - 1:#x} in the kernel's e820_table: not honoured"
            )


def _reserved_flags(
    read: Read, symbols: KernelSymbols, btf: Btf, la57: bool, pfns: range
) -> list[bool]:
    """Whether each page frame's ``struct page`` has ``PG_reserved``."""
    bit = btf.enum_value("pageflags", "PG_reserved")
    size = btf.type_size("page")
    vmemmap = _base(read, symbols, "vmemmap_base", _VMEMMAP[la57])
    raw = read(vmemmap + pfns.start * size, len(pfns) * size)
    return [
        bool(int.from_bytes(raw[i * size : i * size + 8], "little") >> bit & 1)
        for i in range(len(pfns))
    ]


def find_low_memory(
    read: Read,
    symbols: KernelSymbols,
    btf: Btf | None,
    *,
    version: tuple[int, int, int],
    la57: bool,
    min_pages: int,
) -> LowMemory:
    """The largest run of first-MiB pages the guest kernel keeps reserved and unused, of
    at least ``min_pages``; raises :class:`NoSlotMemory` with the reason otherwise."""
    if version < FIRST_RESERVED_VERSION:
        raise NoSlotMemory(
            f"Linux {'.'.join(map(str, version))} gives the first MiB of RAM to its page"
            f" allocator (only {'.'.join(map(str, FIRST_RESERVED_VERSION[:2]))} and later keep"
            " it reserved)"
        )
    try:
        header = symbols.get("real_mode_header")
        if header is None:
            raise NoSlotMemory(
                "kallsyms has no real_mode_header: the real-mode trampoline"
                " cannot be placed, so no page below 1 MiB is known free"
            )
        header_va = _u64(read, header)
        page_offset = _base(read, symbols, "page_offset_base", _PAGE_OFFSET[la57])
        trampoline = (header_va - page_offset) & ~(PAGE_SIZE - 1)
        if header_va == 0 or not 0 < trampoline < ONE_MIB:
            raise NoSlotMemory(
                f"real_mode_header is {header_va:#x}: the trampoline is not"
                " below 1 MiB, so it cannot be kept clear of"
            )
        ram = e820_ram(read, symbols, btf)
        pfns = range(LOW_FLOOR // PAGE_SIZE, trampoline // PAGE_SIZE)
        usable = [
            any(s <= p * PAGE_SIZE and (p + 1) * PAGE_SIZE <= e for s, e in ram) for p in pfns
        ]
        checked = btf is not None
        if btf is not None and len(pfns):
            reserved = _reserved_flags(read, symbols, btf, la57, pfns)
            usable = [u and r for u, r in zip(usable, reserved, strict=True)]
    except NoSlotMemory:
        raise
    except (KprobeVMError, KeyError) as exc:
        raise NoSlotMemory(f"the first MiB could not be examined: {exc}") from exc
    best_start, best_len, run_start = 0, 0, None
    for i, ok in enumerate([*usable, False]):
        if ok and run_start is None:
            run_start = i
        elif not ok and run_start is not None:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = None
    if best_len < min_pages:
        raise NoSlotMemory(
            f"the first MiB has {best_len} unused reserved pages in one run between"
            f" {LOW_FLOOR:#x} and the trampoline at {trampoline:#x}; the fast channel needs"
            f" {min_pages}"
        )
    base = (pfns.start + best_start) * PAGE_SIZE
    return LowMemory(Reserve(base, best_len * PAGE_SIZE), trampoline, version, checked)
