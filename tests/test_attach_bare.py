"""A QEMU started by hand with only a gdbstub (or only QMP), no memmap= and no SSH, running
a busy open loop as init: probed by ``count`` and ``trace`` on the fast channel, with
slot memory from the first MiB the guest kernel keeps reserved; the loop runs on, the
kernel text and the slot pages are as before, the journal is settled. Nothing but the
gdbstub (or QMP) is given: symbols, BTF and the blacklist come from guest memory too."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm import cli
from kprobevm.bench.bareqemu import MARK_EVERY, BareQemu, LoopMark
from kprobevm.gdbstub.transport import format_gdb_address
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.monitor import gdbstub_of_chardev, qmp_execute
from kprobevm.guest.vm import VM, attach
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RING_PAGES, RecordedRegs, RecordSpec, ring_pages_fitting
from kprobevm.kprobes.recover import recover
from kprobevm.tracing.kernel_rules import parse_version
from kprobevm.trap.watchpoint import CHANNEL_PAGES
from kprobevm.x86.constants import PAGE_SIZE
from kprobevm.x86.lowmem import LOW_FLOOR, find_low_memory
from kprobevm.x86.pagetable import la57_enabled

FUNC = "do_sys_openat2"


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[BareQemu]:
    monkeypatch.setenv("KPROBEVM_JOURNAL_DIR", str(tmp_path / "journals"))
    with BareQemu(kaslr=True) as qemu:  # as a QEMU started by hand has it
        qemu.wait_loop()
        yield qemu
        assert not kernel_trouble(qemu.console())


def _text_and_slots(qemu: BareQemu, reserve: tuple[int, int]) -> tuple[bytes, bytes]:
    """The probed function's text and the first-MiB slot pages, read by a VM of their own."""
    with attach(qemu.gdb, name="look") as look:
        func = look.symbols.symbol(FUNC)
        return look.read(func.address, func.size), look.read_phys(*reserve)


def _journal_settled(directory: Path, *, slots: bool = True) -> None:
    journals = list(directory.glob("*.journal"))
    assert journals, "no journal was written"
    for path in [j for j in journals if j.parent == directory]:
        last = json.loads(path.read_text().splitlines()[-1])
        assert last["op"] == "close" and last["clean"], (path, last)
        noted = any('"slot_reserve"' in line for line in path.read_text().splitlines())
        assert noted == slots, path


def _late(mark: LoopMark, read: float, rate: float) -> int:
    """Loop rounds (at ``rate`` a second) that may lie between ``mark``'s print and a
    count read at ``read``."""
    assert mark.printed_after is not None
    return math.ceil((read - mark.printed_after) * rate)


def _count_sees_every_open(bare: BareQemu) -> None:
    """The loop's own count, read at the console between two of its marks, against the
    guest's count of a count-only probe read at the same two moments."""
    vm = attach(bare.gdb)
    with vm:
        kp = Kprobe(symbol_name=FUNC, record=RecordSpec(count_only=True))
        vm.register_kprobe(kp)
        assert vm.trap_channel == "watchpoint" and vm.trap_fallback is None
        assert vm.slot_memory is not None and "first MiB" in vm.slot_memory
        # a mark is printed after its round's open: the count read right after seeing
        # mark a has every open of rounds 1..a; the same holds at mark b
        a = bare.next_mark(bare.mark().rounds)
        n0, read_a = kp.nhit, time.monotonic()
        b = bare.next_mark(a.rounds + 4 * MARK_EVERY - 1)
        n1, read_b = kp.nhit, time.monotonic()
        vm.unregister_kprobe(kp)
    rounds = b.rounds - a.rounds
    # the console shows a mark a little after its round (the UART drains its buffer on
    # its own time) and the count is read a little after the mark is seen: each read
    # may be a round or two past its mark, either way, never a mark's worth; plus the
    # rounds the loop made while this process was not running between the mark's print
    # and the read (a loaded host)
    rate = rounds / (b.at - a.at)
    late_a, late_b = _late(a, read_a, rate), _late(b, read_b, rate)
    assert rounds - 2 - late_a <= n1 - n0 <= rounds + 8 + late_b, (rounds, n1 - n0, late_a, late_b)


# The host that gets killed: attaches with no memmap=, SSH or symbols, arms a probe.
CHILD = r"""
import sys, time
from pathlib import Path
import kprobevm
from kprobevm.gdbstub.transport import parse_gdb_address
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recover import recover
gdb, journal = sys.argv[1:3]
vm = kprobevm.attach(parse_gdb_address(gdb))
vm.journal_path = Path(journal)
kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
vm.register_kprobe(kp)
print("armed", vm.trap_channel, flush=True)
while True:
    time.sleep(0.2)
    print("hits", kp.nhit, flush=True)
"""


def _killed_session_is_recovered(bare: BareQemu, tmp_path: Path) -> None:
    """SIGKILL a host with a probe armed on first-MiB slots; recover unmaps and wipes."""
    assert bare.gdb is not None
    journal = tmp_path / "killed.journal"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, format_gdb_address(bare.gdb), str(journal)],
        stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().split() == ["armed", "watchpoint"]
        while not (line := child.stdout.readline()).startswith("hits") or line.split()[1] == "0":
            assert line, "the killed host's probe saw no hit"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    report = recover(journal)
    assert report.ok and report.restored, report.summary()
    assert report.wiped == 136, report.summary()  # 0x10000-0x97fff on the default guest


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.vm
def test_count_and_trace_on_a_bare_gdbstub_see_every_open_on_the_fast_channel(
    bare: BareQemu, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bare.gdb is not None
    before = bare.mark().rounds
    text, _ = _text_and_slots(bare, (LOW_FLOOR, PAGE_SIZE))
    common = ("--attach", format_gdb_address(bare.gdb))
    start = bare.mark().rounds
    code, out, err = _run(capsys, "count", *common, "--duration", "3", FUNC)
    end = bare.next_mark(bare.mark().rounds).rounds
    assert code == cli.EXIT_OK, err
    assert "trap channel: watchpoint; slot memory:" in err and "first MiB" in err, err
    assert "slow trap channel" not in err
    hits = int(re.fullmatch(rf"@\[{FUNC}\]: (\d+)\n", out)[1])  # type: ignore[index]
    # no more opens than the loop made around the session (a round is one open); that
    # none is missed is checked against marks in _count_sees_every_open
    assert hits > 0
    assert hits <= end - start + MARK_EVERY, (hits, start, end)
    code, out, err = _run(capsys, "trace", *common, "--duration", "2",
                          f"p:open {FUNC} filename=+0(%si):ustring")  # fmt: skip
    assert code == cli.EXIT_OK, err
    lines = out.splitlines()
    assert lines and all('filename="/proc/version"' in line for line in lines), lines[:5]
    assert all(line.lstrip().startswith("cat-") for line in lines), lines[:5]
    first_mib = (LOW_FLOOR, 136 * PAGE_SIZE)  # 0x10000-0x97fff on the default guest
    after_text, slots = _text_and_slots(bare, first_mib)
    assert after_text == text
    assert slots == bytes(len(slots)), "a clean close did not wipe the slot pages"
    _count_sees_every_open(bare)
    _killed_session_is_recovered(bare, tmp_path)
    after_text, slots = _text_and_slots(bare, first_mib)
    assert after_text == text
    assert slots == bytes(len(slots)), "recover did not wipe the slot pages"
    assert bare.next_mark(bare.mark().rounds).rounds > before  # the loop runs on
    _journal_settled(tmp_path / "journals")


@pytest.mark.vm
def test_count_says_on_stderr_why_and_at_what_cost_it_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A first MiB the e820 table calls ACPI data (not RAM), and a memmap= reserve with no
    memory behind it (past the guest's RAM, as the kernel's e820 tables show with no
    SSH to read /proc/iomem): no slot memory can be proven, so count runs on the
    breakpoint channel and says why."""
    monkeypatch.setenv("KPROBEVM_JOURNAL_DIR", str(tmp_path / "journals"))
    with BareQemu(append="memmap=16M$0x30000000 memmap=0x88000#0x10000") as qemu:
        qemu.wait_loop()
        assert qemu.gdb is not None
        where = format_gdb_address(qemu.gdb)
        code, out, err = _run(capsys, "count", "--attach", where, "--duration", "2", FUNC)
        assert code == cli.EXIT_OK, err
        assert re.fullmatch(rf"@\[{FUNC}\]: [1-9]\d*\n", out), out
        said = [line for line in err.splitlines() if "slow trap channel" in line]
        assert len(said) == 1, err
        assert "the memmap= reserve 0x30000000-0x30ffffff is not in one RAM range" in said[0]
        assert "unused reserved pages in one run" in said[0]
        assert "tens of hits per second instead of thousands" in said[0]
        qemu.next_mark(qemu.mark().rounds)  # the loop runs on
        assert not kernel_trouble(qemu.console())
        _journal_settled(tmp_path / "journals", slots=False)


@pytest.mark.vm
def test_attach_through_qmp_only_starts_the_gdbstub_and_stops_it_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KPROBEVM_JOURNAL_DIR", str(tmp_path / "journals"))
    with BareQemu(gdb=False, qmp=True) as qemu:
        qemu.wait_loop()
        assert qemu.qmp is not None
        vm = attach(qmp=qemu.qmp)
        assert vm.monitor_gdbstub is not None and vm.monitor_gdbstub.started
        seen: list[str] = []
        with vm:
            func = vm.symbols.symbol(FUNC)
            text = vm.read(func.address, func.size)
            kp = Kprobe(
                symbol_name=FUNC,
                record=RecordSpec(),
                pre_handler=lambda kp, regs: seen.append(
                    regs.record.comm if isinstance(regs, RecordedRegs) else ""
                ),
            )
            returns: list[int] = []
            rp = Kretprobe(symbol_name="do_filp_open",  # stopping: not on kp's address
                           handler=lambda ri, regs: returns.append(regs.ax))  # fmt: skip
            vm.register_kprobe(kp)
            vm.register_kretprobe(rp)
            assert vm.trap_channel == "watchpoint"
            qemu.next_mark(qemu.mark().rounds + MARK_EVERY)
            vm.flush_records()
            vm.unregister_kretprobe(rp)
            vm.unregister_kprobe(kp)
            assert vm.read(func.address, func.size) == text
        assert seen and set(seen) == {"cat"}
        # each open of /proc/version returns a struct file *, not an ERR_PTR
        assert returns and all(0xFFFF800000000000 <= f < (1 << 64) - 4095 for f in returns)
        devices = qmp_execute(qemu.qmp, "query-chardev")
        assert not [d for d in devices if d.get("label") == "gdb"], devices
        qemu.next_mark(qemu.mark().rounds)  # the loop runs on
        assert not kernel_trouble(qemu.console())
        _journal_settled(tmp_path / "journals")


@pytest.mark.vm
def test_first_mib_pages_are_the_ones_the_guest_calls_reserved(vm: VM) -> None:
    """The pages chosen, against the guest's own /proc/kpageflags (KPF_RESERVED) and
    /proc/iomem (System RAM)."""
    symbols = vm.symbols
    banner = vm.read(symbols["linux_banner"], 200).split(b"\0")[0].decode()
    with vm.target.stopped() as client:
        la57 = la57_enabled(client.read_registers()["cr4"])
        low = find_low_memory(vm.memory.read, symbols, vm.btf, version=parse_version(banner),
                              la57=la57, min_pages=24)  # fmt: skip
    assert low.checked_page_flags
    first, count = low.reserve.base // PAGE_SIZE, low.reserve.size // PAGE_SIZE
    out = vm.run(f"dd if=/proc/kpageflags bs=8 skip={first} count={count} 2>/dev/null"
                 " | od -An -tx8 -v -w8", check=True).stdout  # fmt: skip
    flags = [int(word, 16) for word in out.split()]
    kpf_reserved = 32
    assert len(flags) == count and all(f >> kpf_reserved & 1 for f in flags)
    ram = [tuple(int(x, 16) for x in line.split(" : ")[0].split("-"))
           for line in vm.read_file("/proc/iomem").splitlines()
           if line.endswith(" : System RAM") and not line.startswith(" ")]  # fmt: skip
    end = low.reserve.base + low.reserve.size - 1
    assert any(s <= low.reserve.base and end <= e for s, e in ram), ram
    assert low.reserve.base >= LOW_FLOOR and end < low.trampoline < 0x100000


def test_gdbstub_chardev_addresses() -> None:
    assert gdbstub_of_chardev("disconnected:tcp:127.0.0.1:1234,server=on") == ("127.0.0.1", 1234)
    assert gdbstub_of_chardev("disconnected:tcp:0.0.0.0:1234,server=on") == ("127.0.0.1", 1234)
    assert gdbstub_of_chardev("disconnected:unix:/tmp/g.sock,server=on") == "/tmp/g.sock"
    with pytest.raises(Exception, match="has a client already"):
        gdbstub_of_chardev("tcp:127.0.0.1:1234,server=on <-> 127.0.0.1:5555")
    with pytest.raises(Exception, match="not a socket"):
        gdbstub_of_chardev("stdio")


def test_ring_follows_the_slot_memory_found() -> None:
    assert ring_pages_fitting(4096, keep=8) == RING_PAGES  # a 16 MiB memmap= reserve
    # the first MiB on the default guest
    assert ring_pages_fitting(136 - CHANNEL_PAGES, keep=8) == 64
    assert ring_pages_fitting(40, keep=8) == 16
    with pytest.raises(Exception, match="too few"):
        ring_pages_fitting(16, keep=8)


def test_an_older_kernel_or_a_hole_in_ram_gives_no_first_mib_pages() -> None:
    """The decisions on their inputs: a kernel before 5.13 is refused before anything is
    read, and only e820 RAM counts (a fake guest: a page-offset map of bytes)."""

    def nothing(address: int, size: int) -> bytes:
        raise AssertionError("nothing is read for a kernel that gives the first MiB away")

    from kprobevm.errors import NoSlotMemory
    from kprobevm.kernel.kallsyms import KernelSymbols

    with pytest.raises(NoSlotMemory, match=r"Linux 5\.10\.0 gives the first MiB"):
        find_low_memory(nothing, KernelSymbols.from_text(""), None, version=(5, 10, 0),
                        la57=False, min_pages=22)  # fmt: skip
    page_offset, table, header = 0xFFFF888000000000, 0xFFFFFFFF82000000, 0xFFFFFFFF82001000
    e820 = (
        struct.pack("<I", 2)
        + struct.pack("<QQI", 0x1000, 0x40000, 1)
        + struct.pack("<QQI", 0x41000, 0x5EC00, 2)
    )  # RAM to 0x41000, then reserved
    memory = {
        table: struct.pack("<Q", table + 0x100),
        table + 0x100: e820,
        header: struct.pack("<Q", page_offset + 0x98000),
    }

    def read(address: int, size: int) -> bytes:
        for base, data in memory.items():
            if base <= address and address + size <= base + len(data):
                return data[address - base : address - base + size]
        raise AssertionError(f"read {address:#x}+{size}")

    symbols = KernelSymbols.from_text(f"{table:x} D e820_table\n{header:x} D real_mode_header\n")
    low = find_low_memory(read, symbols, None, version=(6, 1, 0), la57=False, min_pages=22)
    assert (low.reserve.base, low.reserve.size) == (LOW_FLOOR, 0x41000 - LOW_FLOOR)
    assert low.trampoline == 0x98000 and not low.checked_page_flags
    with pytest.raises(NoSlotMemory, match="the fast channel needs 64"):
        find_low_memory(read, symbols, None, version=(6, 1, 0), la57=False, min_pages=64)


def test_a_memmap_reserve_is_judged_by_the_kernels_e820_tables() -> None:
    from kprobevm.errors import NoSlotMemory
    from kprobevm.x86.lowmem import check_reserve_e820
    from kprobevm.x86.slotmap import Reserve

    firmware = [(0x1000, 0x9FC00), (0x100000, 0x21FE0000)]
    kernel = [(0x1000, 0x9FC00), (0x100000, 0x1F000000), (0x20000000, 0x21FE0000)]
    check_reserve_e820(kernel, firmware, Reserve(0x1F000000, 0x1000000))
    with pytest.raises(NoSlotMemory, match="overlaps RAM 0x100000-0x1effffff"):
        check_reserve_e820(kernel, firmware, Reserve(0x1E000000, 0x2000000))
    with pytest.raises(NoSlotMemory, match="no guest memory behind it"):
        check_reserve_e820(kernel, firmware, Reserve(0x30000000, 0x1000000))
