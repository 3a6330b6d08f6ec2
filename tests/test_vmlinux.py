"""Vmlinux: sections, bytes at virtual addresses, symbols, slides (tiny ELF fixture)."""

from __future__ import annotations

import bisect
import itertools
import random
import struct
from pathlib import Path

import pytest

from kprobevm.errors import VmlinuxError
from kprobevm.guest.vm import VM
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kernel.kaslr import boot_patched_ranges
from kprobevm.kernel.vmlinux import Vmlinux

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
        assert names[6:10] == [".data", ".bss", ".init.data", ".data..percpu"]
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


def _runtime_patched(syms: KernelSymbols, elf: Vmlinux) -> list[tuple[int, int, str]]:
    """Text ranges that boot or run time may rewrite, beyond the ELF's own tables
    (kaslr.boot_patched_ranges): tables that sit inside .data/.init.data, found through
    kallsyms' start/stop symbols, and static call trampolines."""
    out = [(r.start, r.end, r.table) for r in boot_patched_ranges(elf)]

    def table(name: str) -> tuple[int, bytes]:
        start, stop = syms[f"__start_{name}"], syms[f"__stop_{name}"]
        return start, elf.read(start, stop - start)

    # struct jump_entry {s32 code; s32 target; long key;}: a 2- or 5-byte jmp/nop (jump label).
    base, data = table("__jump_table")
    for off in range(0, len(data), 16):
        (rel,) = struct.unpack_from("<i", data, off)
        out.append((base + off + rel, base + off + rel + 5, "__jump_table"))
    # __mcount_loc: absolute addresses of the 5-byte `call __fentry__`/nop (ftrace sites).
    base, data = table("mcount_loc")
    for off in range(0, len(data), 8):
        (site,) = struct.unpack_from("<Q", data, off)
        out.append((site + elf.slide, site + elf.slide + 5, "__mcount_loc"))
    # struct static_call_site {s32 addr; s32 key;}: 5-byte call/jmp to a static call target.
    base, data = table("static_call_sites")
    for off in range(0, len(data), 8):
        (rel,) = struct.unpack_from("<i", data, off)
        out.append((base + off + rel, base + off + rel + 5, ".static_call_sites"))
    # Static call trampolines (__SCT__*) are rewritten whenever their target changes.
    for sym in syms.functions():
        if sym.name.startswith("__SCT__"):
            out.append((sym.address, sym.address + max(sym.size, 8), "__SCT__"))
    return sorted(out)


@pytest.mark.vm
def test_random_text_bytes_equal_the_elf(vm: VM) -> None:
    """256 random 16-byte windows of kernel .text read through the gdbstub equal the ELF.

    Skipped windows: any byte that a patch table names (alternatives, retpoline and return
    thunk sites, lock prefixes, paravirt calls, jump labels, ftrace mcount sites, static
    call sites and trampolines): boot rewrites those, so they may legitimately differ. The
    default guest runs with nokaslr, so no relocation changed absolute addresses in code.
    """
    elf = vm.vmlinux
    assert elf is not None
    syms = vm.symbols
    patched = _runtime_patched(syms, elf)
    starts = [p[0] for p in patched]
    reach = list(itertools.accumulate((p[1] for p in patched), max))
    start, end = elf.text_range
    rng = random.Random(0x6B70)
    compared = skipped = 0
    mismatches = []
    while compared < 256:
        addr = rng.randrange(start, end - 16)
        i = bisect.bisect_left(starts, addr + 16)
        if i and reach[i - 1] > addr:
            skipped += 1
            continue
        compared += 1
        want, got = elf.read(addr, 16), vm.read(addr, 16)
        if want != got:
            mismatches.append(f"{syms.describe(addr)}: elf {want.hex()} guest {got.hex()}")
    assert not mismatches, "\n".join(mismatches[:10])
    assert skipped < compared * 4  # patch sites are sparse: most windows are compared
