"""``vm.drgn()``: a drgn Program over the live guest, its memory and kallsyms served by
kprobevm, used from the test and from a probe's handler at a hit; with the guest
kernel's DWARF vmlinux (its Debian -dbg package, fetched into the cache when absent),
its types at a hit; the errors that say what is missing or mismatched."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from kprobevm.errors import DebugInfoError, DrgnError, GuestFaultError, VmlinuxMismatch
from kprobevm.guest.debuginfo import DebugPackage, check_build_id, debug_vmlinux
from kprobevm.guest.image import default_image
from kprobevm.guest.vm import VM
from kprobevm.kernel.drgn_program import (
    check_vmlinux,
    current_task,
    drgn_program,
    guest_vmcoreinfo,
    running_build_id,
)
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kernel.vmlinux import Vmlinux, gnu_build_id
from kprobevm.kprobes.core import Kprobe
from kprobevm.pytest_plugin import ProbeSession
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


def _user_string(prog: object, regs: PtRegs) -> bytes | None:
    """The file name at %si through drgn, checked against kprobevm's read of it; None
    when its page is not resident at the hit (another process's string literal not yet
    touched: the kernel would fault it in, a stopped guest cannot), for both alike."""
    import drgn

    assert isinstance(prog, drgn.Program) and regs.memory is not None
    try:
        name: bytes = prog.read_c_string(regs.si, max_size=64)
    except drgn.FaultError:
        try:
            theirs = regs.memory.cstring(regs.si, 64)
        except GuestFaultError:
            return None
        raise AssertionError(f"drgn faulted at {regs.si:#x}, kprobevm read {theirs!r}") from None
    assert name == regs.memory.cstring(regs.si, 64)
    return name


@pytest.mark.vm
def test_a_handler_reads_the_guest_through_drgn(vm: VM, prog: object) -> None:
    """At each stopping hit on do_sys_openat2 the handler finds ``current``, its comm
    and the file name (user memory) with drgn, and they are what kprobevm's reads say."""
    import drgn

    assert isinstance(prog, drgn.Program)
    layout = vm.task_layout
    assert layout is not None
    seen: list[tuple[bytes, bytes]] = []
    names: list[bytes | None] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        task = prog.read_u64(regs.gs_base + layout.current)
        ours = regs.memory.u64(regs.gs_base + layout.current)
        assert task == ours
        seen.append((prog.read(task + layout.comm, 16), regs.memory.read(task + layout.comm, 16)))
        assert prog.read_c_string(task + layout.comm, max_size=16) == seen[-1][1].split(b"\0")[0]
        names.append(_user_string(prog, regs))  # user memory: the file name

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


# -- the DWARF vmlinux --------------------------------------------------------------------


def _note(name: bytes, kind: int, desc: bytes) -> bytes:
    header = len(name).to_bytes(4, "little") + len(desc).to_bytes(4, "little")
    padded = name + bytes(-len(name) % 4) + desc + bytes(-len(desc) % 4)
    return header + kind.to_bytes(4, "little") + padded


def test_the_gnu_build_id_is_found_among_other_notes() -> None:
    notes = _note(b"Xen\0", 8, b"\x01" * 8) + _note(b"GNU\0", 3, bytes(range(20)))
    assert gnu_build_id(notes) == bytes(range(20)).hex()
    assert gnu_build_id(_note(b"GNU\0", 1, b"\x02" * 16)) is None  # an ABI tag, not an id
    assert gnu_build_id(notes[:-4]) is None  # cut short


def test_the_running_build_id_comes_from_vmcoreinfo() -> None:
    assert running_build_id(b"OSRELEASE=6.1.0\nBUILD-ID=01d2ab\nPAGESIZE=4096\n") == "01d2ab"
    assert running_build_id(b"OSRELEASE=5.4.0\nPAGESIZE=4096\n") is None


def test_without_a_build_id_the_banner_decides(caplog: pytest.LogCaptureFixture) -> None:
    """A kernel whose VMCOREINFO says no build id: its linux_banner must be the
    vmlinux's (said on stderr, as the weaker check)."""
    vmlinux = default_image().vmlinux
    with Vmlinux(vmlinux) as elf:
        rodata = elf.read_section(".rodata")
    start = rodata.index(b"Linux version ")
    banner = rodata[start : rodata.index(b"\0", start) + 1]
    symbols = KernelSymbols.from_text("ffffffff82000000 D linux_banner\n")
    info = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
    check = check_vmlinux(vmlinux, info, lambda a, n: banner.ljust(n, b"\0"), symbols)
    assert check.evidence == "banner" and check.value.startswith("Linux version ")
    assert "checked by the kernel's linux_banner only" in caplog.text
    other = banner.replace(b"Linux version ", b"Linux version 9")
    with pytest.raises(VmlinuxMismatch, match="another linux_banner"):
        check_vmlinux(vmlinux, info, lambda a, n: other.ljust(n, b"\0"), symbols)


def test_the_debug_package_is_named_from_the_image() -> None:
    image = default_image()
    package = DebugPackage.of_image(image)
    assert package.name == f"{image.kernel_package}-dbg"
    assert package.version == image.kernel_version
    assert package.member == f"./usr/lib/debug/boot/vmlinux-{image.kernel_release}"
    with pytest.raises(DebugInfoError, match="not built from a Debian kernel package"):
        DebugPackage.of_image(replace(image, kernel_package="self-built"))


def _fetched(cache: Path) -> list[Path]:
    """What a fetch left in ``cache``: its temporary directories, a vmlinux."""
    return [*cache.rglob(".fetch-*"), *cache.rglob("vmlinux")]


def test_a_download_past_its_deadline_is_ended_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DebugInfoError, match="took longer than") as info:
        debug_vmlinux(default_image(), cache=tmp_path, download_timeout=0.05)
    assert info.value.step == "download"
    assert not _fetched(tmp_path)


@pytest.mark.network
def test_a_version_apt_does_not_have_is_named(tmp_path: Path) -> None:
    image = replace(default_image(), kernel_version="0.0-none")
    with pytest.raises(DebugInfoError, match="apt-get failed") as info:
        debug_vmlinux(image, cache=tmp_path)
    assert "-dbg=0.0-none" in info.value.command
    assert not _fetched(tmp_path)


@pytest.mark.network
def test_kprobevm_debuginfo_prints_the_vmlinux(capsys: pytest.CaptureFixture[str]) -> None:
    from kprobevm.cli import main

    assert main(["debuginfo"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path == debug_vmlinux(default_image()) and path.name == "vmlinux"
    with Vmlinux(path) as elf:
        assert elf.has_section(".debug_info")


@pytest.fixture(scope="module")
def other_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's vmlinux with one byte of its build id changed: another build."""
    copy = tmp_path_factory.mktemp("other") / "vmlinux"
    shutil.copyfile(default_image().vmlinux, copy)
    with Vmlinux(copy) as elf:
        notes = elf.section(".notes")
        build_id = elf.build_id
    assert build_id is not None
    data = bytearray(copy.read_bytes())
    at = data.index(bytes.fromhex(build_id), notes.offset)
    data[at] ^= 0xFF
    copy.write_bytes(data)
    return copy


def test_a_vmlinux_of_another_build_is_refused(other_build: Path) -> None:
    image = default_image()
    with Vmlinux(image.vmlinux) as elf:
        ours = elf.build_id
    assert ours is not None
    with pytest.raises(VmlinuxMismatch, match="another kernel build") as info:
        check_build_id(other_build, ours)
    assert info.value.ours == f"build id {ours}" and info.value.theirs != info.value.ours


@pytest.fixture(scope="module")
def dwarf_vmlinux(vm: VM) -> Path:
    """The guest kernel's DWARF vmlinux, fetched into the cache when absent (timed)."""
    started = time.monotonic()
    path = vm.debug_vmlinux()
    print(f"debug vmlinux {path} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return path


@pytest.fixture(scope="module")
def dwarf(vm: VM, dwarf_vmlinux: Path) -> object:
    """A drgn Program with the guest kernel's types (made once, timed)."""
    pytest.importorskip("drgn")
    started = time.monotonic()
    prog = vm.drgn(vmlinux=dwarf_vmlinux)
    print(f"drgn Program with DWARF in {time.monotonic() - started:.2f} s", file=sys.stderr)
    return prog


@pytest.mark.vm
@pytest.mark.network
def test_dwarf_types_describe_the_running_kernel(vm: VM, dwarf: object) -> None:
    """The types are the vmlinux's: init_task's comm, the banner as /proc/version says
    it, and struct offsets as kprobevm's BTF has them."""
    import drgn

    assert isinstance(dwarf, drgn.Program)
    assert dwarf.main_module().debug_file_path is not None
    init = dwarf["init_task"]
    assert init.type_.type_name() == "struct task_struct"
    assert init.comm.string_() == b"swapper/0"
    assert init.pid.value_() == 0
    assert dwarf["linux_banner"].string_().decode() == vm.read_file("/proc/version")
    layout = vm.task_layout
    assert layout is not None
    task = dwarf.type("struct task_struct")
    assert drgn.offsetof(task, "comm") == layout.comm
    assert drgn.offsetof(task, "pid") == layout.pid


def _proc_tasks(vm: VM) -> dict[int, str]:
    """Every thread in the guest's /proc, by pid, with its comm."""
    out = vm.run("cd /proc && for t in [0-9]*/task/[0-9]*; do echo ${t##*/} $(cat $t/comm);"
                 " done", check=True).stdout  # fmt: skip
    return {int(pid): comm for pid, _, comm in (line.partition(" ") for line in out.splitlines())}


def _same_comm(comm: str, procs: str) -> bool:
    """/proc shows a kworker's workqueue after its comm (kworker/0:1-events) and a
    kernel thread's whole name where comm keeps 15 characters."""
    if procs == comm:
        return True
    return procs.startswith(comm) and (len(comm) == 15 or procs[len(comm)] == "-")


@pytest.mark.vm
@pytest.mark.network
def test_for_each_task_lists_the_guests_tasks(vm: VM, dwarf: object) -> None:
    """drgn's task walk finds every task /proc shows before and after it, each with its
    comm; what only drgn saw is the listings' SSH sessions ending, or a new kworker."""
    from drgn.helpers.linux.pid import for_each_task

    before = _proc_tasks(vm)
    walked = {t.pid.value_(): t.comm.string_().decode() for t in for_each_task(dwarf)}
    after = _proc_tasks(vm)
    stable = before.keys() & after.keys()
    assert 1 in stable and len(stable) > 20
    missing = sorted(stable - walked.keys())
    assert not missing, f"tasks in /proc that drgn did not walk: {missing}"
    wrong = {p: (walked[p], before[p]) for p in stable if not _same_comm(walked[p], before[p])}
    assert not wrong, wrong
    transient = {p: walked[p] for p in walked.keys() - before.keys() - after.keys()}
    assert all(c in ("dropbear", "sh", "cat") or c.startswith("kworker/")
               for c in transient.values()), transient  # fmt: skip


@pytest.mark.vm
@pytest.mark.network
def test_a_handler_walks_current_with_dwarf_types(
    vm: VM, dwarf: object, kprobes: ProbeSession
) -> None:
    """At each stopping hit on do_sys_openat2 the handler reads current's comm and pid
    and the file name (``const char __user *filename`` in %si) through drgn's types, and
    at cat's hit walks every task: they are what the guest's shell ran."""
    import drgn
    from drgn.helpers.linux.pid import for_each_task

    assert isinstance(dwarf, drgn.Program)
    layout = vm.task_layout
    assert layout is not None
    hits: list[tuple[bytes, int, bytes | None]] = []
    costs: list[float] = []
    walks: list[dict[int, bytes]] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        started = time.perf_counter()
        task = current_task(dwarf, regs.gs_base)
        comm, pid = task.comm.string_(), task.pid.value_()
        try:
            filename = drgn.Object(dwarf, "const char *", regs.si).string_()
        except drgn.FaultError:  # not resident at the hit: kprobevm's read says so too
            filename = _user_string(dwarf, regs)
        costs.append(time.perf_counter() - started)
        assert regs.memory is not None  # the same through kprobevm's own reads
        assert task.value_() == regs.memory.u64(regs.gs_base + layout.current)
        assert comm == regs.memory.cstring(task.value_() + layout.comm, 16)
        assert pid == regs.memory.u32(task.value_() + layout.pid)
        assert filename is None or filename == regs.memory.cstring(regs.si, 4096)
        hits.append((comm, pid, filename))
        if comm == b"cat" and filename == b"/proc/version" and not walks:
            walks.append({t.pid.value_(): t.comm.string_() for t in for_each_task(dwarf)})

    kp = kprobes.register(Kprobe(symbol_name="do_sys_openat2", pre_handler=pre))
    ran = kprobes.run("sh -c 'echo $$; exec cat /proc/version' >/tmp/drgn.out;"
                      " head -1 /tmp/drgn.out", check=True)  # fmt: skip
    pid = int(ran.stdout.strip())
    assert kp.nerrors == 0, kp.errors
    assert (b"cat", pid, b"/proc/version") in hits, hits
    assert walks and walks[0].get(pid) == b"cat" and walks[0].get(1) is not None
    costs.sort()
    print(f"drgn in the handler: {len(costs)} hits, median {costs[len(costs) // 2] * 1e3:.2f}"
          f" ms, max {costs[-1] * 1e3:.2f} ms", file=sys.stderr)  # fmt: skip


@pytest.mark.vm
def test_drgn_refuses_a_vmlinux_of_another_build(vm: VM, other_build: Path) -> None:
    """The running kernel's build id (VMCOREINFO) is not the vmlinux's: refused before
    drgn loads it."""
    with pytest.raises(VmlinuxMismatch, match="not the running kernel's build") as info:
        vm.drgn(vmlinux=other_build)
    assert info.value.ours.startswith("build id ")
