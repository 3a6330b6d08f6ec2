"""``vm.drgn()``: a drgn Program over the live guest, its memory and kallsyms served by
kprobevm, used from the test and from a probe's handler at a hit; the errors that say
what is missing."""

from __future__ import annotations

import sys

import pytest

from kprobevm.errors import DrgnError
from kprobevm.guest.image import default_image
from kprobevm.guest.vm import VM
from kprobevm.kernel.drgn_program import drgn_program, guest_vmcoreinfo
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kprobes.core import Kprobe
from kprobevm.x86.ptregs import PtRegs


def _no_read(address: int, size: int) -> bytes:
    raise AssertionError(f"read {size} bytes at {address:#x}")


def test_without_drgn_the_error_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "drgn", None)  # import drgn raises ImportError
    with pytest.raises(DrgnError, match=r"drgn is not installed") as info:
        drgn_program(_no_read, _no_read, KernelSymbols.from_text(""))
    assert "kprobevm[drgn]" in info.value.hint


def test_a_kernel_without_vmcoreinfo_is_named() -> None:
    with pytest.raises(DrgnError, match="VMCORE_INFO"):
        guest_vmcoreinfo(_no_read, KernelSymbols.from_text("ffffffff81000000 T _text\n"))


@pytest.fixture(scope="module")
def prog(vm: VM) -> object:
    pytest.importorskip("drgn")
    return vm.drgn()


@pytest.mark.vm
def test_memory_and_symbols_are_the_guests(vm: VM, prog: object) -> None:
    """drgn reads what kprobevm reads, virtual and physical; its symbols are kprobevm's
    kallsyms; its VMCOREINFO is the running kernel's."""
    import drgn

    assert isinstance(prog, drgn.Program)
    banner = vm.symbols["linux_banner"]
    assert prog.symbol("linux_banner").address == banner
    assert prog.symbol(vm.symbols["vfs_read"] + 3).name == "vfs_read"
    assert prog.read(banner, 64) == vm.read(banner, 64)
    assert prog.read(banner, 14) == b"Linux version "
    phys = vm.translate(banner)
    assert prog.read(phys, 64, True) == vm.read_phys(phys, 64)
    task = vm.symbols["init_task"]
    assert prog.read_u64(task + 64) == int.from_bytes(vm.read(task + 64, 8), "little")
    release = vm.run("uname -r", check=True).stdout.strip()
    assert f"OSRELEASE={release}\n".encode() in guest_vmcoreinfo(vm.read, vm.symbols)
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL and prog.flags & drgn.ProgramFlags.IS_LIVE


@pytest.mark.vm
def test_a_handler_reads_the_guest_through_drgn(vm: VM, prog: object) -> None:
    """At each stopping hit on do_sys_openat2 the handler finds ``current``, its comm
    and the file name (user memory) with drgn, and they are what kprobevm's reads say."""
    import drgn

    assert isinstance(prog, drgn.Program)
    layout = vm.task_layout
    assert layout is not None
    seen: list[tuple[bytes, bytes]] = []
    names: list[bytes] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        task = prog.read_u64(regs.gs_base + layout.current)
        ours = regs.memory.u64(regs.gs_base + layout.current)
        assert task == ours
        seen.append((prog.read(task + layout.comm, 16), regs.memory.read(task + layout.comm, 16)))
        assert prog.read_c_string(task + layout.comm, max_size=16) == seen[-1][1].split(b"\0")[0]
        names.append(prog.read_c_string(regs.si, max_size=64))  # user memory: the file name
        assert names[-1] == regs.memory.cstring(regs.si, 64)

    kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=pre)
    vm.register_kprobe(kp)
    try:
        vm.run("cat /proc/version >/dev/null", check=True)
    finally:
        vm.unregister_kprobe(kp)
    assert kp.nerrors == 0, kp.errors
    assert seen and all(theirs == ours for theirs, ours in seen)
    assert any(comm.startswith(b"cat\0") for comm, _ in seen)
    assert b"/proc/version" in names


@pytest.mark.vm
def test_a_vmlinux_without_dwarf_is_refused_with_what_to_give(vm: VM, prog: object) -> None:
    """Debian's vmlinux (cut from the bzImage) has no DWARF: the error says what to give."""
    with pytest.raises(DrgnError) as info:
        vm.drgn(vmlinux=default_image().vmlinux)
    assert "DWARF" in info.value.hint
