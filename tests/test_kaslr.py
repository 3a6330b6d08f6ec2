"""KASLR slide detection against a fake guest memory built from an ELF (no QEMU)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.errors import GuestFaultError, KaslrError
from kprobevm.kaslr import (
    CPU_ENTRY_AREA_RO_IDT,
    boot_patched_ranges,
    find_kaslr_slide,
    idt_gate_handler,
    slide_from_idt,
    stable_windows,
)
from kprobevm.vmlinux import Vmlinux

TINY = Path(__file__).parent / "data" / "tiny_vmlinux.elf"
TEXT = 0xFFFFFFFF81000000


class FakeGuest:
    """Guest virtual memory holding the ELF's .text at ``text + slide``; all else faults.

    ``patch`` overwrites bytes (link-time addresses) the way boot rewrites or relocates them.
    """

    def __init__(self, vm: Vmlinux, slide: int, patch: dict[int, bytes] | None = None) -> None:
        start, end = vm.text_range
        image = bytearray(vm.read(start, end - start))
        for addr, data in (patch or {}).items():
            image[addr - start : addr - start + len(data)] = data
        self.base = start + slide
        self.image = bytes(image)
        self.reads = 0

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        off = addr - self.base
        if off >= 0 and off + n <= len(self.image):
            return self.image[off : off + n]
        raise GuestFaultError(addr, "not present", level=2)


@pytest.fixture
def elf() -> Iterator[Vmlinux]:
    with Vmlinux(TINY) as vm:
        yield vm


def test_patched_ranges_come_from_the_elfs_tables(elf: Vmlinux) -> None:
    ranges = {(r.table, r.start - TEXT, r.end - r.start) for r in boot_patched_ranges(elf)}
    assert ranges == {
        (".altinstructions", 0x80F, 5),
        (".return_sites", 0x814, 5),
        (".smp_locks", 0x819, 1),
        (".parainstructions", 0x81C, 7),
    }


def test_windows_avoid_patched_bytes(elf: Vmlinux) -> None:
    windows = stable_windows(elf, count=8)
    assert windows[0] == TEXT
    for w in windows:
        for r in boot_patched_ranges(elf):
            assert w + 32 <= r.start or w >= r.end, f"window {w:#x} overlaps {r}"


@pytest.mark.parametrize("slide", [0, 0x200000, 0x1E400000, 0x3E000000 - 0x1000000])
def test_slide_is_found(elf: Vmlinux, slide: int) -> None:
    guest = FakeGuest(elf, slide)
    assert find_kaslr_slide(guest.read, elf) == slide


def test_nokaslr_costs_one_candidate(elf: Vmlinux) -> None:
    guest = FakeGuest(elf, 0)
    assert find_kaslr_slide(guest.read, elf) == 0
    assert guest.reads <= 12


def test_boot_patches_and_a_few_relocations_do_not_hide_the_kernel(elf: Vmlinux) -> None:
    # Every patch-table site rewritten, plus two windows spoilt as relocations would.
    windows = stable_windows(elf)
    patch = {r.start: b"\xcc" * (r.end - r.start) for r in boot_patched_ranges(elf)}
    patch[windows[3] + 4] = b"\x00\x00\x00\x00"
    patch[windows[7] + 9] = b"\xff\xff"
    guest = FakeGuest(elf, 0x2400000, patch)
    assert find_kaslr_slide(guest.read, elf) == 0x2400000


def test_a_different_kernel_is_not_matched(elf: Vmlinux) -> None:
    windows = stable_windows(elf)
    patch = {w + 1: b"\x5a" for w in windows[1:]}  # only the first window still matches
    guest = FakeGuest(elf, 0x600000, patch)
    with pytest.raises(KaslrError, match=r"matched 1/\d+ windows"):
        find_kaslr_slide(guest.read, elf)


def test_nothing_mapped(elf: Vmlinux) -> None:
    def unmapped(addr: int, n: int) -> bytes:
        raise GuestFaultError(addr)

    with pytest.raises(KaslrError, match="0 mapped"):
        find_kaslr_slide(unmapped, elf)


def test_slid_elf_is_refused(elf: Vmlinux) -> None:
    with elf.with_slide(0x200000) as slid, pytest.raises(KaslrError, match="unslid"):
        find_kaslr_slide(FakeGuest(elf, 0).read, slid)


def _gate(handler: int) -> bytes:
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0
    )


def test_idt_gate_decoding_and_slide() -> None:
    link_int3 = 0xFFFFFFFF81C01780
    slide = 0x2A00000
    assert idt_gate_handler(_gate(link_int3 + slide)) == link_int3 + slide

    def read(addr: int, n: int) -> bytes:
        assert (addr, n) == (CPU_ENTRY_AREA_RO_IDT + 48, 16)
        return _gate(link_int3 + slide)

    assert slide_from_idt(read, link_int3) == slide
    with pytest.raises(KaslrError, match="not a multiple"):
        slide_from_idt(read, link_int3 + 0x10)
