"""KASLR slide detection against a fake guest memory built from an ELF (no QEMU)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.errors import GuestFaultError, KaslrError
from kprobevm.kernel.kaslr import (
    CPU_ENTRY_AREA_RO_IDT,
    boot_patched_ranges,
    find_kaslr_slide,
    idt_gate_handler,
    same_text,
    slide_from_idt,
    stable_windows,
)
from kprobevm.kernel.vmlinux import Vmlinux

TINY = Path(__file__).parent / "data" / "tiny_vmlinux.elf"
TEXT = 0xFFFFFFFF81000000


class FakeGuest:
    """Guest virtual memory holding the ELF's .text at ``text + slide``; all else faults.

    ``patch`` overwrites bytes (link-time addresses) the way boot rewrites or relocates them.
    """

    def __init__(
        self,
        vm: Vmlinux,
        slide: int,
        patch: dict[int, bytes] | None = None,
        extra: dict[int, bytes] | None = None,
    ) -> None:
        start, end = vm.text_range
        image = bytearray(vm.read(start, end - start))
        for addr, data in (patch or {}).items():
            image[addr - start : addr - start + len(data)] = data
        self.base = start + slide
        self.image = bytes(image)
        self.reads = 0
        self.extra = extra or {}

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        if addr in self.extra:
            return self.extra[addr][:n]
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
    assert len(windows) >= 6
    for w in windows:
        data = elf.read(w, 16)
        assert not set(data) & {0x81, 0x82, 0x83}, "may hold a relocated address"
        assert len(set(data)) >= 8, "too uniform to be found nowhere else"
        for r in boot_patched_ranges(elf):
            assert w + 16 <= r.start or w >= r.end, f"window {w:#x} overlaps {r}"


@pytest.mark.parametrize("slide", [0, 0x200000, 0x1E400000, 0x3E000000 - 0x1000000])
def test_slide_is_found(elf: Vmlinux, slide: int) -> None:
    guest = FakeGuest(elf, slide)
    assert find_kaslr_slide(guest.read, elf) == slide


def test_nokaslr_costs_one_candidate(elf: Vmlinux) -> None:
    guest = FakeGuest(elf, 0)
    assert find_kaslr_slide(guest.read, elf) == 0
    assert guest.reads == len(stable_windows(elf))


def test_boot_patches_and_a_few_relocations_do_not_hide_the_kernel(elf: Vmlinux) -> None:
    # Every patch-table site rewritten, plus two windows spoilt as relocations would.
    windows = stable_windows(elf)
    patch = {r.start: b"\xcc" * (r.end - r.start) for r in boot_patched_ranges(elf)}
    patch[windows[3] + 4] = b"\x00\x00\x00\x00"
    patch[windows[7] + 9] = b"\xff\xff"
    guest = FakeGuest(elf, 0x2400000, patch)
    assert find_kaslr_slide(guest.read, elf) == 0x2400000


def test_relocated_absolute_addresses_do_not_hide_the_kernel(elf: Vmlinux) -> None:
    # With KASLR the decompressor adds the slide to every 32-bit absolute address into the
    # image: the top byte of such an immediate (0x81..0x83 here) changes. Do that to every
    # byte that looks like one, as a worst case, with a 16 MiB slide.
    start, end = elf.text_range
    text = elf.read(start, end - start)
    patch = {start + i: bytes([b + 1]) for i, b in enumerate(text) if b in (0x81, 0x82, 0x83)}
    assert patch  # the fixture's random bytes hold some
    guest = FakeGuest(elf, 0x1000000, patch)
    assert find_kaslr_slide(guest.read, elf) == 0x1000000


def test_a_different_kernel_is_not_matched(elf: Vmlinux) -> None:
    windows = stable_windows(elf)
    patch = {w + 1: b"\x5a" for w in windows[1:]}  # only the first window still matches
    guest = FakeGuest(elf, 0x600000, patch)
    with pytest.raises(KaslrError, match=r"best scores 0x600000: 1/\d+"):
        find_kaslr_slide(guest.read, elf)


def test_nothing_mapped(elf: Vmlinux) -> None:
    def unmapped(addr: int, n: int) -> bytes:
        raise GuestFaultError(addr)

    with pytest.raises(KaslrError, match="0 of 512 candidate bases mapped"):
        find_kaslr_slide(unmapped, elf)


def test_slid_elf_is_refused(elf: Vmlinux) -> None:
    with elf.with_slide(0x200000) as slid, pytest.raises(KaslrError, match="unslid"):
        find_kaslr_slide(FakeGuest(elf, 0).read, slid)


def _gate(handler: int) -> bytes:
    return struct.pack(
        "<HHBBHII", handler & 0xFFFF, 0x10, 0, 0x8E, (handler >> 16) & 0xFFFF, handler >> 32, 0
    )


def test_the_idt_gate_narrows_the_search(elf: Vmlinux) -> None:
    slide = 0x1C000000
    full = FakeGuest(elf, slide)
    assert find_kaslr_slide(full.read, elf) == slide
    gate = {CPU_ENTRY_AREA_RO_IDT + 48: _gate(TEXT + slide + 0x900)}
    hinted = FakeGuest(elf, slide, extra=gate)
    assert find_kaslr_slide(hinted.read, elf) == slide
    assert hinted.reads < 60 < full.reads


def test_ftrace_nops_match_the_elfs_fentry_calls() -> None:
    elf = bytes.fromhex("4889e5e8ebaeceff4155e8000000")
    assert same_text(bytes.fromhex("4889e50f1f4400004155e8000000"), elf)
    assert not same_text(bytes.fromhex("4889e50f1f4400004156e8000000"), elf)
    assert not same_text(bytes.fromhex("0f1f440000e8ebaeceff4155e8"), elf)


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


@pytest.mark.vm
def test_kaslr_guest_slide_matches_kallsyms() -> None:
    """A guest booted with KASLR: the slide found from guest memory alone equals kallsyms'
    ``_text`` minus the link address, and the IDT's #BP gate agrees."""
    from kprobevm.guest.image import default_image
    from kprobevm.guest.launcher import boot

    image = default_image()
    with boot(kaslr=True, name="kaslr") as guest, Vmlinux(image.vmlinux) as link:
        slide = find_kaslr_slide(guest.read, link)
        syms = guest.symbols
        assert slide == syms["_text"] - link.text_base
        assert slide % 0x200000 == 0
        assert slide_from_idt(guest.read, syms["asm_exc_int3"] - slide) == slide
        # The slid ELF and the slid kallsyms name the same bytes (the banner holds no
        # address, so relocation left it alone).
        with link.with_slide(slide) as elf:
            addr = syms["linux_banner"]
            assert guest.read(addr, 64) == elf.read(addr, 64)
            assert elf.read(addr, 14) == b"Linux version "
        # the first read came before kallsyms was loaded: the kernel's page table for
        # shared-RAM reads was still found (looked up before the VM was held stopped)
        reader = guest.ram_reader
        assert reader is not None and reader.root() is not None
