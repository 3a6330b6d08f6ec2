"""The kprobe blacklist: rebuilt like the kernel's, checked against the guest's own debugfs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.guest.vm import VM
from kprobevm.kernel.blacklist import Blacklist, BlacklistEntry
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kernel.vmlinux import Vmlinux

TINY = Path(__file__).parent / "data" / "tiny_vmlinux.elf"
T = 0xFFFFFFFF81000000

# kallsyms for the tiny ELF (its real symbols) plus area markers a kernel would have:
# .noinstr.text and .entry.text over the filler, an empty .kprobes.text, a suffixed clone.
# As in the real kallsyms, linker-script markers come after the function at their address.
KALLSYMS = f"""\
{T:016x} T _text
{T:016x} T startup_64
{T + 0x9:016x} t do_thing
{T + 0xF:016x} t filler
{T + 0x80F:016x} t alt_site
{T + 0x814:016x} t ret_site
{T + 0x814:016x} T __noinstr_text_start
{T + 0x819:016x} t lock_site
{T + 0x81C:016x} T __noinstr_text_end
{T + 0x81C:016x} t para_site
{T + 0x900:016x} T asm_exc_int3
{T + 0x900:016x} T __entry_text_start
{T + 0x940:016x} t do_thing.cold
{T + 0x940:016x} T __entry_text_end
{T + 0x940:016x} T __kprobes_text_start
{T + 0x940:016x} T __kprobes_text_end
{T + 0x960:016x} t other.cold
{T + 0x2023:016x} T _etext
ffffffff82a00000 d counter
ffffffff830b6000 D __start_kprobe_blacklist
ffffffff830b6010 D __stop_kprobe_blacklist
ffffffff832b4000 b idt_table
"""


@pytest.fixture
def elf() -> Iterator[Vmlinux]:
    with Vmlinux(TINY) as vm:
        yield vm


def test_entries_in_the_kernels_order(elf: Vmlinux) -> None:
    bl = Blacklist.build(KernelSymbols.from_text(KALLSYMS), elf)
    assert bl.missing == []
    kernel = [(e.start - T, e.end - T, e.symbol, e.reason) for e in bl if e.reason != "kprobevm"]
    assert kernel == [
        # NOKPROBE_SYMBOL(do_thing) from the ELF's array; the data address is skipped.
        (0x9, 0xF, "do_thing", "NOKPROBE_SYMBOL"),
        # .kprobes.text is empty here; .noinstr.text symbol by symbol, aliases named by %ps.
        (0x814, 0x819, "ret_site", ".noinstr.text"),
        (0x819, 0x81C, "lock_site", ".noinstr.text"),
        (0x900, 0x940, "asm_exc_int3", ".entry.text"),
    ]
    assert [e.symbol for e in bl if e.reason == "kprobevm"] == ["idt_table"]


def test_within_kprobe_blacklist(elf: Vmlinux) -> None:
    bl = Blacklist.build(KernelSymbols.from_text(KALLSYMS), elf)
    hit = bl.within_kprobe_blacklist(T + 0xA)
    assert hit is not None and hit.symbol == "do_thing"
    assert bl.within_kprobe_blacklist(T + 0x93F) == BlacklistEntry(
        T + 0x900, T + 0x940, "asm_exc_int3", ".entry.text"
    )
    assert bl.within_kprobe_blacklist(T + 0xF) is None  # filler: probe-able
    # A suffixed clone of a blacklisted function is refused, another .cold is not.
    clone = bl.within_kprobe_blacklist(T + 0x944)
    assert clone is not None and clone.symbol == "do_thing"
    assert bl.within_kprobe_blacklist(T + 0x961) is None
    assert T + 0x9 in bl and T + 0x20 not in bl


def test_added_ranges_and_overlaps(elf: Vmlinux) -> None:
    bl = Blacklist.build(KernelSymbols.from_text(KALLSYMS), elf)
    slot = bl.add(0xFFFFFFFFFE000000, 0xFFFFFFFFFE002000, "kprobevm_slots")
    assert bl.within_kprobe_blacklist(0xFFFFFFFFFE001FFF) == slot
    wide = bl.add(T, T + 0x2023, "everything")
    assert bl.within_kprobe_blacklist(T + 0x20) == wide
    hit = bl.within_kprobe_blacklist(T + 0x9)
    assert hit is not None and hit.symbol in ("do_thing", "everything")
    bl.remove(wide)
    assert bl.within_kprobe_blacklist(T + 0x20) is None


def test_without_vmlinux_the_nokprobe_part_is_missing() -> None:
    bl = Blacklist.build(KernelSymbols.from_text(KALLSYMS), None)
    assert any("NOKPROBE_SYMBOL" in m for m in bl.missing)
    assert bl.within_kprobe_blacklist(T + 0xA) is None
    assert bl.within_kprobe_blacklist(T + 0x900) is not None


def test_debugfs_format(elf: Vmlinux) -> None:
    bl = Blacklist.build(KernelSymbols.from_text(KALLSYMS), elf)
    text = bl.format_debugfs(kernel_only=True)
    assert text.splitlines()[0] == "0xffffffff81000009-0xffffffff8100000f\tdo_thing"
    assert len(text.splitlines()) == 4
    assert Blacklist.parse_debugfs(text)[3] == (T + 0x900, T + 0x940, "asm_exc_int3")
    assert "idt_table" in bl.format_debugfs()


@pytest.mark.vm
def test_guest_debugfs_blacklist_is_covered(vm: VM) -> None:
    vm.run("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")
    theirs_text = vm.read_file("/sys/kernel/debug/kprobes/blacklist")
    theirs = Blacklist.parse_debugfs(theirs_text)
    assert len(theirs) > 300, theirs_text[:500]
    bl = Blacklist.build(vm.symbols, vm.vmlinux)
    assert bl.missing == []
    uncovered = [
        (start, end, name)
        for start, end, name in theirs
        if any(bl.within_kprobe_blacklist(a) is None for a in (start, max(start, end - 1)))
    ]
    assert not uncovered, f"{len(uncovered)} guest entries not covered: {uncovered[:5]}"
    # Stronger: the kernel's part of ours is the guest's file, line for line.
    assert bl.format_debugfs(kernel_only=True) == theirs_text
