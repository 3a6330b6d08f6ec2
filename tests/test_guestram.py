"""Guest RAM shared with the host: the file, its layout, reads through a synthetic page
table, and on a real guest every read the mapping answers equal to the gdbstub's."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from kprobevm.errors import GuestFaultError
from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.guest.guestram import (
    FileRam,
    GuestRam,
    PagingRoot,
    RamFile,
    RamReader,
    create_ram_file,
    pa_symbol,
    parse_memory_size,
    sweep_stale_ram,
)
from kprobevm.guest.image import default_image
from kprobevm.guest.launcher import QemuMachine, boot
from kprobevm.guest.processram import ProcessRam
from kprobevm.guest.vm import VM, attach
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.pagetable import PRESENT, PS, RW

MiB = 1 << 20


def test_memory_sizes_as_qemu_reads_them() -> None:
    assert parse_memory_size("544M") == 544 * MiB
    assert parse_memory_size("2G") == 2 << 30
    assert parse_memory_size("1024") == 1024 * MiB  # a bare number is MiB
    assert parse_memory_size("65536k") == 64 * MiB
    with pytest.raises(ValueError, match="not a memory size"):
        parse_memory_size("lots")


def test_the_file_is_private_and_swept_when_its_owner_is_gone(tmp_path: Path) -> None:
    ram = create_ram_file("t", 4 * MiB, base=tmp_path)
    assert ram.path.stat().st_size == 4 * MiB
    assert stat.S_IMODE(ram.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ram.path.parent.stat().st_mode) == 0o700
    assert "share=on" in " ".join(ram.qemu_args())
    assert sweep_stale_ram(tmp_path) == []  # we are alive
    (ram.path.parent / "owner").write_text("999999999\n")  # no such process
    assert sweep_stale_ram(tmp_path) == [ram.path.parent]
    assert not ram.path.exists()


def test_a_base_too_small_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="MiB free"):
        create_ram_file("t", 1 << 60, base=tmp_path)


def _ram(tmp_path: Path, size: int) -> FileRam:
    path = tmp_path / "ram"
    with path.open("wb") as f:
        f.truncate(size)
    return FileRam(RamFile(path, size))


def test_physical_reads_and_the_pc_machines_split(tmp_path: Path) -> None:
    ram = _ram(tmp_path, 16 * MiB)
    ram.write_phys(0x1000, b"hello")
    assert ram.read_phys(0x1000, 5) == b"hello"
    assert ram.read_if_ram(16 * MiB - 2, 4) is None
    with pytest.raises(GuestFaultError):
        ram.read_phys(16 * MiB, 1)
    path = tmp_path / "big"  # a 4 GiB guest: the layout only (the file is sparse)
    with path.open("wb") as f:
        f.truncate(4 << 30)
    big = FileRam(RamFile(path, 4 << 30))
    assert big.ranges == [(0, 0xC000_0000, 0), (1 << 32, (1 << 32) + (1 << 30), 0xC000_0000)]
    big.write_phys(1 << 32, b"high")
    assert big.read_phys(1 << 32, 4) == b"high"
    assert not big.covers(0xC000_0000, 1)  # the PCI hole


KERNEL = 0xFFFF_FFFF_8100_0000


def _entry(ram: GuestRam, table: int, index: int, value: int) -> None:
    ram.write_phys(table + 8 * index, value.to_bytes(8, "little"))


def test_kernel_reads_walk_the_kernels_page_table(tmp_path: Path) -> None:
    ram = _ram(tmp_path, 16 * MiB)
    pgd, pud, pmd, pt = 0x10000, 0x11000, 0x12000, 0x13000
    idx = [(KERNEL >> s) & 0x1FF for s in (39, 30, 21, 12)]
    _entry(ram, pgd, idx[0], pud | PRESENT | RW)
    _entry(ram, pud, idx[1], pmd | PRESENT | RW)
    _entry(ram, pmd, idx[2], pt | PRESENT | RW)
    _entry(ram, pt, idx[3], 0x200000 | PRESENT)  # a 4 KiB page
    _entry(ram, pt, idx[3] + 1, 0x300000 | PRESENT)  # the next page, elsewhere
    _entry(ram, pmd, idx[2] + 1, 0x400000 | PRESENT | PS)  # a 2 MiB page
    ram.write_phys(0x200FFE, b"ab")
    ram.write_phys(0x300000, b"cd")
    ram.write_phys(0x400000 + 0x1234, b"huge")
    looked: list[int] = []

    def root() -> PagingRoot:
        looked.append(1)
        return PagingRoot(pgd, la57=False)

    reader = RamReader(ram, root)
    assert reader.read_virt(KERNEL + 0xFFE, 4) == b"abcd"  # across two pages
    assert reader.read_virt(KERNEL + (2 << 20) + 0x1234, 4) == b"huge"
    assert reader.read_virt(KERNEL + (4 << 20), 4) is None  # not present: the gdbstub says
    assert reader.read_virt(0x400000, 4) is None  # user memory: the vCPU's view
    assert reader.read_phys(0x300000, 2) == b"cd"
    assert reader.read_phys(64 * MiB, 2) is None
    assert looked == [1]  # the root is found once


def test_the_unrolled_page_read_agrees_with_the_walk(tmp_path: Path) -> None:
    """A one-page read (``FileRam.page_reader``, a handler's) answers as the general walk
    does: 4 KiB, 2 MiB and 1 GiB pages, NX set, an absent entry at each level, a table or
    page beyond RAM."""
    ram = _ram(tmp_path, 16 * MiB)
    pgd, pud, pmd, pt = 0x10000, 0x11000, 0x12000, 0x13000
    nx = 1 << 63
    base = 0xFFFF_C900_0000_0000  # vmalloc, where the stacks are
    i4, i3, i2 = (base >> 39) & 0x1FF, (base >> 30) & 0x1FF, (base >> 21) & 0x1FF
    _entry(ram, pgd, i4, pud | PRESENT | RW)
    _entry(ram, pud, i3, pmd | PRESENT | RW)
    _entry(ram, pud, i3 + 1, 0 | PRESENT | PS | nx)  # a 1 GiB page at 0: reads past RAM fail
    _entry(ram, pud, i3 + 2, (64 * MiB) | PRESENT | RW)  # a table beyond RAM
    _entry(ram, pmd, i2, pt | PRESENT | RW | nx)
    _entry(ram, pmd, i2 + 1, (2 * MiB) | PRESENT | PS | nx)  # a 2 MiB page
    _entry(ram, pt, 0, 0x200000 | PRESENT | nx)
    _entry(ram, pt, 1, (16 * MiB - 4096) | PRESENT)  # RAM's last page
    ram.write_phys(0x200010, b"four")
    ram.write_phys(2 * MiB + 0x5010, b"2mib")
    ram.write_phys(0x1234, b"1gib")
    reader = RamReader(ram, lambda: PagingRoot(pgd, la57=False))
    cases = {
        base + 0x10: b"four",
        base + (2 << 20) + 0x5010: b"2mib",
        base + (1 << 30) + 0x1234: b"1gib",
        base + (1 << 30) + 16 * MiB + 0x10: None,  # a page of the 1 GiB one past RAM
        base + 0x1FFE: None,  # into the next page, absent
        base + (2 << 30): None,  # its table is not RAM
        base + (3 << 30): None,  # absent PUD entry
        base + (4 << 20): None,  # absent PMD entry
        base + 0x2000: None,  # absent PTE
        base + (1 << 39): None,  # absent PGD entry
    }
    for addr, want in cases.items():
        assert reader.read_virt(addr, 4) == want, hex(addr)
    assert reader.read_virt(base + 0x1FFC, 4) == bytes(4)
    assert reader.reads == 4


def test_no_root_means_every_virtual_read_goes_to_the_gdbstub(tmp_path: Path) -> None:
    reader = RamReader(_ram(tmp_path, MiB), lambda: None)
    assert reader.read_virt(KERNEL, 8) is None
    assert reader.read_phys(0, 8) == bytes(8)


def test_five_level_paging(tmp_path: Path) -> None:
    ram = _ram(tmp_path, 16 * MiB)
    tables = [0x10000, 0x11000, 0x12000, 0x13000, 0x14000]
    addr = 0xFF11_0000_0000_0000 | 0x1000  # in the la57 direct map
    for level, shift in enumerate((48, 39, 30, 21, 12)):
        target = tables[level + 1] if level < 4 else 0x200000
        _entry(ram, tables[level], (addr >> shift) & 0x1FF, target | PRESENT | RW)
    ram.write_phys(0x200000, b"la57")
    assert RamReader(ram, lambda: PagingRoot(tables[0], la57=True)).read_virt(addr, 4) == b"la57"


@pytest.mark.vm
def test_the_mapping_reads_what_the_gdbstub_reads(vm: VM) -> None:
    reader = vm.ram_reader
    assert reader is not None and isinstance(vm.guest_ram, FileRam)
    assert vm.guest_ram.path.parent.parent == Path("/dev/shm")
    functions = list(vm.symbols.functions())
    addresses = [f.address for f in functions[:: max(1, len(functions) // 300)]]
    addresses += [vm.symbols[name] for name in ("linux_banner", "init_task", "jiffies_64")]
    with vm.target.stopped() as client:
        gdbstub = GuestMemory(client)
        # the init task's stack pointer: its stack, in vmalloc space or the direct map
        layout = vm.task_layout
        assert layout is not None
        addresses.append(gdbstub.u64(vm.symbols["init_task"] + layout.stack) & ~0xFFF)
        served = reader.reads
        for addr in addresses:
            assert vm.memory.read(addr, 48) == gdbstub.read(addr, 48), hex(addr)
        assert reader.reads - served == len(addresses)
        assert reader.read_virt(0x400000, 8) is None  # user memory stays the gdbstub's
        phys = vm.translate(vm.symbols["linux_banner"])
        assert reader.read_phys(phys, 16) == gdbstub.read_phys(phys, 16)


@pytest.mark.vm
def test_the_ram_file_goes_with_the_guest_and_can_be_declined() -> None:
    with boot(name="noram", shared_ram=False) as vm:
        assert vm.guest_ram is None and vm.ram_reader is None
        assert vm.read(vm.symbols["linux_banner"], 5) == b"Linux"
    with boot(name="ram") as vm:
        assert isinstance(vm.guest_ram, FileRam)
        path = vm.guest_ram.path
        assert path.exists()
    assert not path.exists() and not path.parent.exists()


@pytest.mark.vm
@pytest.mark.parametrize("gdb_tcp", [False, True], ids=["unix", "tcp"])
def test_an_attached_guest_is_read_from_the_qemu_process(tmp_path: Path, gdb_tcp: bool) -> None:
    """A QEMU kprobevm did not start: found behind its gdbstub, its RAM read through
    /proc/PID/mem, and recorded hits drained with the VM running."""
    with boot(name="attached-ram", shared_ram=False, gdb_tcp=gdb_tcp) as booted:
        kallsyms = tmp_path / "kallsyms"
        kallsyms.write_text(booted.read_file("/proc/kallsyms"))
        assert booted.endpoints.gdb is not None and isinstance(booted.machine, QemuMachine)
        vm = attach(booted.endpoints.gdb, kallsyms=kallsyms, vmlinux=default_image().vmlinux,
                    kernel_cmdline=booted.read_file("/proc/cmdline").strip())  # fmt: skip
        try:
            ram = vm.guest_ram
            assert isinstance(ram, ProcessRam) and ram.pid == booted.machine.proc.pid
            banner = vm.symbols["linux_banner"]
            reader = vm.ram_reader
            assert reader is not None
            served = reader.reads
            with vm.target.stopped() as client:
                assert vm.memory.read(banner, 64) == GuestMemory(client).read(banner, 64)
            assert reader.reads == served + 1
            seen: list[int] = []
            kp = Kprobe(symbol_name="do_sys_openat2", record=RecordSpec(),
                        pre_handler=lambda kp, regs: seen.append(regs.di))  # fmt: skip
            vm.register_kprobe(kp)
            try:
                assert vm.kprobes.channel.drains_running  # type: ignore[attr-defined]
                follower = vm.kprobes.channel.follower  # type: ignore[attr-defined]
                assert follower.fallback is None  # the child reads QEMU's memory too
                booted.run("for i in 1 2 3 4 5 6 7 8; do cat /etc/passwd; done >/dev/null",
                           check=True)  # fmt: skip
                vm.flush_records()
                assert len(seen) >= 8 and follower.feed.looks > 0
            finally:
                vm.unregister_kprobe(kp)
        finally:
            vm.close()


def test_pa_symbol_wraps_a_negative_phys_base() -> None:
    """With KASLR the image often moves further in virtual than in physical memory: the
    guest's phys_base is then a negative u64 (seen: 0xffffffffe3400000 for
    init_top_pgt 0xffffffffadc10000 at physical 0x11010000)."""
    assert pa_symbol(0xFFFFFFFFADC10000, 0xFFFFFFFFE3400000) == 0x11010000
    assert pa_symbol(0xFFFFFFFF82C10000, 0) == 0x2C10000  # nokaslr
