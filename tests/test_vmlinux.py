"""Vmlinux: sections, bytes at virtual addresses, symbols, slides (tiny ELF fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kprobevm.errors import VmlinuxError
from kprobevm.vmlinux import Vmlinux

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny_vmlinux.elf"
TINY_NOSYMS = DATA / "tiny_vmlinux_nosyms.elf"
TEXT = 0xFFFFFFFF81000000
# lea 0x100(%rip),%rsp; nop; nop; push %rbp; mov %rsp,%rbp; pop %rbp; ret (tiny_vmlinux.S)
TEXT_BYTES = bytes.fromhex("488d25000100009090554889e55dc3")


def test_sections_and_lookup() -> None:
    with Vmlinux(TINY) as vm:
        names = [s.name for s in vm.sections()]
        assert names[:2] == [".text", ".rodata"]
        assert names[6:9] == [".data", ".bss", ".data..percpu"]
        text = vm.section(".text")
        assert (text.vaddr, text.is_exec, text.is_write) == (TEXT, True, False)
        assert vm.text_range == (TEXT, TEXT + 0x2023)
        assert vm.section_for(TEXT + 3) == text
        assert vm.section_for(TEXT + 0x2023) is None
        sec = vm.section_for(0xFFFFFFFF82A00010)
        assert sec is not None and sec.name == ".bss" and not sec.has_bytes
        # The per-CPU section is linked at 0: offsets, not kernel addresses.
        assert vm.section(".data..percpu").vaddr == 0
        assert vm.section_for(0) is None


def test_read_bytes_at_virtual_addresses() -> None:
    with Vmlinux(TINY) as vm:
        assert vm.read(TEXT, 15) == TEXT_BYTES
        assert vm.read(0xFFFFFFFF82000000, 19) == b"Linux version tiny\n"
        assert vm.read_u64(0xFFFFFFFF82A00000) == 0x1122334455667788


def test_reads_outside_file_bytes_are_errors() -> None:
    with Vmlinux(TINY) as vm:
        with pytest.raises(VmlinuxError, match="no section"):
            vm.read(TEXT - 1, 2)
        with pytest.raises(VmlinuxError, match="no section"):
            vm.read(TEXT + 0x2022, 2)  # runs past .text into a gap
        with pytest.raises(VmlinuxError, match="NOBITS"):
            vm.read(0xFFFFFFFF82A00008, 8)  # .bss
        with pytest.raises(VmlinuxError, match="NOBITS"):
            vm.read(0xFFFFFFFF82A00000, 16)  # .data runs into .bss


def test_symbols_from_symtab() -> None:
    with Vmlinux(TINY) as vm:
        syms = vm.symbols
        assert syms is not None
        assert syms["do_thing"] == TEXT + 9
        assert syms.describe(TEXT + 10) == "do_thing+0x1/0x6"
        assert syms.symbol("linux_banner").type == "R"
        assert syms.symbol("counter").type == "d"
        assert syms.symbol("zeroed").type == "B"
        assert syms["current_task"] == 0


def test_no_symtab_means_no_symbols() -> None:
    with Vmlinux(TINY_NOSYMS) as vm:
        assert vm.symbols is None
        assert vm.read(TEXT, 2) == bytes.fromhex("488d")


def test_with_slide_moves_kernel_addresses() -> None:
    with Vmlinux(TINY) as vm, vm.with_slide(0x3200000) as slid:
        assert slid.text_base == TEXT + 0x3200000
        assert slid.read(TEXT + 0x3200000, 15) == vm.read(TEXT, 15)
        assert slid.section(".data..percpu").vaddr == 0
        assert slid.symbols is not None
        assert slid.symbols["do_thing"] == TEXT + 0x3200000 + 9
        assert slid.symbols["current_task"] == 0


def test_not_an_elf(tmp_path: Path) -> None:
    bogus = tmp_path / "vmlinux"
    bogus.write_bytes(b"MZ" + bytes(100))
    with pytest.raises(VmlinuxError, match="not a readable ELF"):
        Vmlinux(bogus)
    with pytest.raises(VmlinuxError, match="cannot open"):
        Vmlinux(tmp_path / "missing")
