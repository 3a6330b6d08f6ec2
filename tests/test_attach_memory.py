"""Attaching with nothing but a gdbstub: the kernel's kallsyms, module symbols, BTF and
kprobe blacklist decoded from guest memory, checked against the guest's own
/proc/kallsyms and debugfs; and a QEMU started here with only ``-gdb``, whose init is a
busy loop, probed by ``count`` and ``trace`` with no other input."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.cli import main
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.image import default_image
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM, attach
from kprobevm.kernel.blacklist import Blacklist
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kernel.kprobe_blacklist_list import kprobe_blacklist_ranges
from kprobevm.kernel.patchsites import PatchSites
from kprobevm.kernel.patchsites_memory import LiveTables
from kprobevm.kernel.tasks import TaskLayout
from kprobevm.kernel.trace_events_list import trace_event_names

pytestmark = pytest.mark.vm

LOOP = "mount -t proc proc /proc; echo LOOPING; while :; do cat /proc/version >/dev/null; done"
"""The bare guest's init: opens in a loop, so do_sys_openat2 keeps being hit."""
BOOT_DEADLINE = 60.0


def _lines(syms: KernelSymbols) -> list[str]:
    """Symbols as /proc/kallsyms lines."""
    return sorted(
        f"{s.address:016x} {s.type} {s.name}" + (f"\t[{s.module}]" if s.module else "")
        for s in syms
    )


def check_memory_tables(vm: VM) -> None:
    """Kallsyms (core and modules), BTF and the kprobe blacklist decoded from ``vm``'s
    memory equal what the guest itself says over SSH."""
    kernel = vm.kernel_in_memory
    assert kernel.image.text == vm.symbols["_text"]
    with vm.target.stopped():
        syms = kernel.symbols(vm.memory.read)
    theirs = sorted(vm.read_file("/proc/kallsyms").splitlines())
    assert any("[" in line for line in theirs), "the guest should have modules loaded"
    assert _lines(syms) == theirs
    # the kernel's own blacklist list, as debugfs prints it
    vm.run("mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")
    debugfs = vm.read_file("/sys/kernel/debug/kprobes/blacklist")
    assert kernel.btf is not None
    with vm.target.stopped():
        ranges = kprobe_blacklist_ranges(vm.memory.read, syms["kprobe_blacklist"], kernel.btf)
    assert len(ranges) > 300
    ours = Blacklist.from_kernel_list(syms, ranges)
    assert ours.format_debugfs(kernel_only=True) == debugfs
    # BTF from memory gives the layout the vmlinux BTF gives
    if vm.task_layout is not None:
        assert TaskLayout.from_btf(syms, kernel.btf) == vm.task_layout


def test_memory_tables_are_the_guests(vm: VM) -> None:
    """The default guest (nokaslr): what memory says is what the guest says."""
    check_memory_tables(vm)


def test_patch_sites_from_memory(vm: VM) -> None:
    """Run-time patched text from the kernel's own tables in memory is what the vmlinux
    tables say, less what the kernel freed after boot, plus modules' ftrace sites."""
    assert vm.vmlinux is not None
    ref = PatchSites.build(vm.symbols, vm.vmlinux)
    live = LiveTables(vm.symbols, vm.memory.read, vm.kernel_in_memory.btf)
    with vm.target.stopped():
        mine = PatchSites.build(vm.symbols, None, live=live)

    def of(sites: PatchSites, reason: str) -> set[tuple[int, int]]:
        return {(s.start, s.end) for s in sites.sites if s.reason == reason}

    for reason in ("jump label", "static call", "exception table", "static call trampoline"):
        assert of(mine, reason) == of(ref, reason), reason
        assert of(mine, reason), reason
    assert mine.missing == [".altinstructions: in the init memory the kernel freed after boot"]
    if vm.read_file("/sys/devices/system/cpu/possible").strip() == "0":
        # one possible CPU: the kernel freed its lock-prefix table, never to switch again
        assert not of(mine, "SMP lock prefix")
    # ftrace's own records: every core site outside init text (freed), and modules'
    init = vm.symbols["_sinittext"], vm.symbols["_einittext"]
    assert {a for a in ref.ftrace if not init[0] <= a < init[1]} <= mine.ftrace
    extra = [vm.symbols.lookup(a) for a in mine.ftrace - ref.ftrace]
    assert extra and all(s is not None and s.module for s in extra)


def test_trace_events_from_memory(vm: VM) -> None:
    """The kernel's event list read from memory names what tracefs ``events/`` lists."""
    listing = vm.run(
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing;"
        " cd /sys/kernel/tracing/events && for d in */*/; do echo ${d%/}; done",
        check=True,
    ).stdout.split()
    btf, head = vm.kernel_in_memory.btf, vm.symbols["ftrace_events"]  # SSH: not stopped
    assert btf is not None
    with vm.target.stopped():
        ours = trace_event_names(vm.memory.read, head, btf)
    assert len(listing) > 1000
    assert {f"{g}/{e}" for g, e in ours} == set(listing)


@pytest.mark.parametrize("kernel", [None, "linux-image-6.12-cloud-amd64"], ids=["6.1", "6.12"])
def test_memory_tables_with_kaslr(kernel: str | None) -> None:
    """KASLR guests: the image found from the page tables wherever KASLR put it; on 6.1
    (offsets before the names, name order between markers and tokens) and on 6.12
    (offsets after the token index)."""
    with boot(kaslr=True, kernel_package=kernel, name="memsyms-kaslr") as vm:
        assert vm.symbols["_text"] != 0xFFFFFFFF81000000
        check_memory_tables(vm)
        assert not kernel_trouble(vm.serial_log())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def bare_qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A QEMU started as a developer would, with only ``-gdb tcp:...``: the default
    image's kernel (KASLR on: nothing on its command line turns it off) and initramfs,
    a busy loop as init, no SSH, no QMP. Yields the gdbstub address and serial log."""
    image = default_image()
    log = tmp_path_factory.mktemp("bare") / "serial.log"
    port = _free_port()
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-no-reboot",
         "-machine", "pc", "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-m", "544M",
         "-kernel", str(image.kernel), "-initrd", str(image.initrd),
         "-append", f'console=ttyS0 quiet panic=-1 oops=panic rdinit=/bin/sh -- -c "{LOOP}"',
         "-serial", f"file:{log}", "-gdb", f"tcp:127.0.0.1:{port},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + BOOT_DEADLINE
        while "LOOPING" not in (log.read_text(errors="replace") if log.exists() else ""):
            assert qemu.poll() is None, f"QEMU exited with {qemu.returncode}"
            assert time.monotonic() < deadline, "the bare guest's init loop never started"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", log
    finally:
        qemu.kill()
        qemu.wait(timeout=10)


def _kernel_text(address: str) -> tuple[KernelSymbols, bytes]:
    """The kernel's symbols and its whole ``.text`` (``_stext``..``_etext``), read through
    an attach of our own with symbols from memory."""
    host, port = address.rsplit(":", 1)
    with attach((host, int(port)), name="text") as vm:
        syms = vm.symbols
        # the Python API has it all without vmlinux or SSH: symbols, BTF, the blacklist
        assert vm.symbols_source == "memory"
        assert vm.task_layout is not None
        assert vm.kprobe_blacklist.missing == [] and len(vm.kprobe_blacklist) > 300
        start, end = syms["_stext"], syms["_etext"]
        with vm.target.stopped() as client:
            return syms, client.read_memory(start, end - start)


def _changed(before: bytes, after: bytes) -> list[int]:
    """Offsets of the bytes that differ (compared a page at a time first)."""
    out = []
    for page in range(0, len(before), 4096):
        if before[page : page + 4096] != after[page : page + 4096]:
            out += [i for i in range(page, min(page + 4096, len(before)))
                    if before[i] != after[i]]  # fmt: skip
    return out


def test_count_and_trace_with_only_a_gdbstub(
    bare_qemu: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """``count`` and ``trace --duration`` with ``--attach`` and nothing else: hits seen
    (the loop's cat processes by name, from BTF), the slow channel said on stderr, the
    loop still running after, no oops, kernel text as before."""
    address, log = bare_qemu
    syms, before = _kernel_text(address)
    assert len(syms) > 80_000
    code = main(["count", "--attach", address, "--duration", "2", "do_sys_openat2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "read from guest memory" in err
    # until slot memory comes without memmap=, the breakpoint channel, said so
    assert "trap channel: breakpoint, slow" in err
    hits = re.fullmatch(r"@\[do_sys_openat2\]: (\d+)\n", out)
    assert hits is not None and int(hits[1]) > 0, out
    code = main(["trace", "--attach", address, "--duration", "2",
                 "p:o do_sys_openat2 f=+0(%si):string"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r'cat-\d+ .* o: \(do_sys_openat2\+0x0/0x[0-9a-f]+\) f="/proc/version"', out)
    code = main(["blacklist", "--attach", address, "asm_exc_int3"])
    out, err = capsys.readouterr()
    assert code == 0 and out.endswith("\tasm_exc_int3\n"), (out, err)
    code = main(["list", "--attach", address])
    out, err = capsys.readouterr()
    assert code == 0 and out == "", (out, err)
    _, after = _kernel_text(address)
    # The kernel patches its own text for a while after boot (SMP alternatives for one
    # CPU, sched_clock's static keys): the probed function is as before, and no int3 is
    # left anywhere.
    func = syms.symbol("do_sys_openat2")
    at = func.address - syms["_stext"]
    assert after[at : at + func.size] == before[at : at + func.size]
    left = [syms.describe(syms["_stext"] + i) for i in _changed(before, after) if after[i] == 0xCC]
    assert not left, f"int3 left in kernel text at {left[:5]}"
    # the loop runs on: count again
    code = main(["count", "--attach", address, "--duration", "1", "do_sys_openat2"])
    out, _ = capsys.readouterr()
    assert code == 0 and int(out.split(": ")[1]) > 0, out
    assert not kernel_trouble(log.read_text(errors="replace"))


def test_command_needs_ssh(capsys: pytest.CaptureFixture[str]) -> None:
    """``-- CMD`` on an attached guest without --ssh: refused before anything is done."""
    code = main(["trace", "--attach", "127.0.0.1:1", "p:o vfs_read", "--", "ls"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "-- CMD runs in the guest over SSH" in err and "--ssh" in err
