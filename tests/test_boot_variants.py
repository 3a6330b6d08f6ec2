"""The default image's kernel booted with KASLR on, with 5-level paging, and with both,
and other Debian kernels (6.1 PREEMPT_RT, 6.12 cloud and PREEMPT_RT): a conformance
subset on one guest (2 vCPUs) per variant of :data:`BOOT_VARIANTS` and
:data:`KERNEL_VARIANTS`.

Each variant checks what moves with it against the guest itself: the slide (kallsyms and
the IDT), the paging mode (CR4 and ``/proc/cpuinfo``), page walks through the guest's own
direct-map and vmalloc bases, reads of shared guest RAM through the kernel's page table,
the slot reserve against ``/proc/iomem`` (the kernel's
physical base moves too), the blacklist against debugfs, patch sites against the guest's
text and ``available_filter_functions``; then stopping and recorded probes on hot
functions on both vCPUs, a return probe, stacks counted in the guest against its own
hist trigger, trace lines against the guest's own tracefs, and a SIGKILLed host whose
guest ``recover`` restores. At the end the probed functions' text is what it was at boot
and the console shows no trouble.

The SIGKILL test runs first: QEMU takes one gdbstub client, and the child it kills must
have it before the module's VM connects its own.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kprobevm.gdbstub.client import GdbClient
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.image import default_image
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kernel.blacklist import Blacklist
from kprobevm.kernel.kaslr import slide_from_idt
from kprobevm.kernel.patchsites import FTRACE_NOP
from kprobevm.kernel.vmlinux import Vmlinux
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recover import recover
from kprobevm.tracing import differential as diff
from kprobevm.x86.pagetable import la57_enabled
from tests._boot_variants import BOOT_VARIANTS, KERNEL_VARIANTS
from tests.test_differential import (
    COMM,
    REJECTED,
    RUNS,
    TRACED,
    WORKLOAD,
    check_record_refused,
    check_refused_alike,
    record_refusal,
    taken_by,
)
from tests.test_kprobes_smp import MIN_SEEN, TARGET, record_on_every_cpu, run_on_every_cpu
from tests.test_kretprobes import wait_returned
from tests.test_pagetable import check_walks
from tests.test_recover import _probe_facts, _read_text, sigkill_mid_hits
from tests.test_stack_count import DD, check_against_the_guests_hist

pytestmark = pytest.mark.vm

NCPUS = 2
FUNCS = ("do_sys_openat2", "getname", "do_filp_open", "getname_flags", "ksys_write",
         "close_fd", "do_exit", "vfs_read")
"""Every function a probe of this module goes into (the differential corpus included)."""
PINNED = f"taskset -c 0 sh -c '{WORKLOAD}'"
"""The differential workload on vCPU 0: the CPU column is compared, and there are two."""
ENOENT = -2


@dataclass
class Variant:
    """One booted guest of a variant and what was true of it at boot."""

    name: str
    options: dict[str, object]
    vm: VM
    text: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Function -> (address, sha256 of its text) before any probe."""


def _text_digests(vm: VM) -> dict[str, tuple[int, str]]:
    """The probed functions' text, read through a gdbstub client of our own that leaves
    the stub free again (the module's VM has not connected yet)."""
    gdb = vm.endpoints.gdb
    assert isinstance(gdb, str)
    syms = vm.symbols
    client = GdbClient.connect(gdb)
    try:
        return {name: (syms[name], hashlib.sha256(
            client.read_memory(syms[name], syms.size(name))).hexdigest()) for name in FUNCS}
    finally:
        client.detach()


MATRIX = BOOT_VARIANTS | KERNEL_VARIANTS


@pytest.fixture(scope="module", params=sorted(MATRIX))
def variant(request: pytest.FixtureRequest) -> Iterator[Variant]:
    options = MATRIX[request.param]
    with boot(smp=NCPUS, name=f"var-{request.param}", **options) as vm:  # type: ignore[arg-type]
        yield Variant(request.param, options, vm, _text_digests(vm))


def test_sigkill_with_armed_probe_then_recover(variant: Variant, tmp_path: Path) -> None:
    """A host SIGKILLed with a stopping probe armed on both vCPUs' hot path: the guest
    runs its workload on, and ``recover`` puts back the text, the IDT gate and the PMD."""
    vm = variant.vm
    gdb, kallsyms, func, size, gate = _probe_facts(vm, tmp_path)
    text_before, gate_before = _read_text(gdb, func, size, gate)
    journal = tmp_path / "session.journal"
    sigkill_mid_hits(
        vm, gdb, kallsyms, vm.vmlinux_path or default_image().vmlinux, journal, hits=30,
        workload="(for c in 0 1; do taskset -c $c sh -c 'for i in $(seq 300); do"
                 " cat /proc/version; done >/tmp/out-'$c'; echo done >/tmp/fin-'$c &"
                 " done) >/dev/null 2>&1 &",
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while vm.run("cat /tmp/fin-0 /tmp/fin-1 2>/dev/null").stdout.split() != ["done", "done"]:
        assert time.monotonic() < deadline, "guest workload stalled after the host died"
        time.sleep(0.5)
    assert vm.run("cat /tmp/out-0 /tmp/out-1 | wc -l").stdout.strip() == "600"
    orphan, _ = _read_text(gdb, func + 5, 1, gate)  # past the ftrace NOP
    assert orphan in (b"\xcc", b"\xe9"), "the killed host's probe should still be in the text"
    report = recover(journal)
    assert report.ok, report.summary()
    whats = " ".join(e.what for e in report.restored)
    assert "int3" in whats and "IDT" in whats and "PMD" in whats
    assert _read_text(gdb, func, size, gate) == (text_before, gate_before)
    assert not kernel_trouble(vm.serial_log())


def test_layout_is_the_guests(variant: Variant) -> None:
    """The slide from guest memory equals kallsyms' and the IDT's; the paging mode read
    from CR4 is the one the guest reports; walks agree with the gdbstub; the slot reserve
    is reserved in the guest's /proc/iomem, clear of where KASLR put the kernel."""
    vm = variant.vm
    kaslr, la57 = bool(variant.options.get("kaslr")), "la57" in str(variant.options.get("cpu"))
    cmdline = vm.read_file("/proc/cmdline").split()
    assert ("nokaslr" in cmdline) is not kaslr
    cpuinfo = vm.read_file("/proc/cpuinfo").split()
    with vm.target.stopped() as c:
        cr4 = c.read_registers()["cr4"]
    assert la57_enabled(cr4) is la57 is ("la57" in cpuinfo)
    syms = vm.symbols
    with Vmlinux(default_image().vmlinux) as link:
        slide = vm.kaslr_slide
        assert slide == syms["_text"] - link.text_base
    assert slide_from_idt(vm.read, syms["asm_exc_int3"] - slide) == slide
    assert vm.vmlinux is not None and vm.vmlinux.slide == slide
    check_walks(vm)
    # shared guest RAM: kernel reads through the kernel's own page table, walked on the
    # host in the guest's paging mode, read what the gdbstub reads
    reader = vm.ram_reader
    assert reader is not None
    root = reader.root()
    assert root is not None and root.la57 is la57
    for addr in (syms["linux_banner"], syms["init_task"], syms["_text"] + 0x1000):
        assert reader.read_virt(addr, 64) == vm.read(addr, 64), hex(addr)
    assert vm.slot_reserve is not None  # and check_reserve passed on the guest's iomem
    iomem = vm.read_file("/proc/iomem")
    code = next(ln for ln in iomem.splitlines() if ln.strip().endswith(": Kernel code"))
    print(f"\n{variant.name}: slide {slide:#x}, kernel code at {code.split()[0]},"
          f" {'5' if la57 else '4'}-level paging")


def test_blacklist_is_the_guests_debugfs(variant: Variant) -> None:
    vm = variant.vm
    theirs = vm.read_file("/sys/kernel/debug/kprobes/blacklist")
    assert len(Blacklist.parse_debugfs(theirs)) > 300
    assert vm.kprobe_blacklist.missing == []
    assert vm.kprobe_blacklist.format_debugfs(kernel_only=True) == theirs


def test_patch_sites_are_where_the_guest_has_them(variant: Variant) -> None:
    """Slid ftrace sites hold ftrace's NOP, slid jump labels a jump or a NOP, and every
    function with an ftrace site of ours is one the guest's ftrace lists."""
    vm = variant.vm
    syms, sites = vm.symbols, vm.patch_sites
    stext, etext = syms["_stext"], syms["_etext"]
    ftrace = sorted(a for a in sites.ftrace if stext <= a < etext)
    labels = [s.start for s in sites.sites if s.reason == "jump label" and stext <= s.start < etext]
    assert len(ftrace) > 30000 and len(labels) > 3000
    with vm.target.stopped() as c:
        not_nop = [a for a in ftrace[:: len(ftrace) // 400] if c.read_memory(a, 5) != FTRACE_NOP]
        label_bytes = [c.read_memory(a, 5) for a in labels[:: len(labels) // 300]]
    assert not not_nop, [hex(a) for a in not_nop[:5]]
    odd = [b.hex() for b in label_bytes
           if b != FTRACE_NOP and b[0] not in (0xE9, 0xEB) and b[:2] != b"\x66\x90"]
    assert not odd, odd[:5]
    listed = {ln.strip() for ln in vm.read_file(
        "/sys/kernel/tracing/available_filter_functions").splitlines() if "[" not in ln}
    # a function's ftrace site is its entry, or past its endbr64 on an IBT kernel
    ours = {s.name for a in ftrace
            if (s := syms.lookup(a)) is not None and a - s.address in (0, 4)}  # fmt: skip
    assert ours <= listed, sorted(ours - listed)[:5]
    assert len(ours) > 0.99 * len({n for n in listed if not n.startswith("__ftrace_invalid")})


def test_stopping_probes_on_every_vcpu(variant: Variant) -> None:
    """A pre handler on do_sys_openat2 and a pre+post pair inside getname, both vCPUs."""
    run = run_on_every_cpu(variant.vm, NCPUS)
    assert run.opens is not None and run.pushes is not None
    assert not run.wrong_cpu, run.wrong_cpu[:5]
    for cpu in range(NCPUS):
        assert run.names[cpu][TARGET] >= MIN_SEEN, (cpu, run.names[cpu].most_common(3))
        assert run.pairs[cpu] >= MIN_SEEN, (cpu, run.pairs)
    assert run.lost == 0 and not run.mismatches, (run.lost, run.mismatches[:5])
    assert run.opens.nerrors == 0 and run.pushes.nerrors == 0


def test_recorded_probes_on_every_vcpu(variant: Variant) -> None:
    record_on_every_cpu(variant.vm, NCPUS, 300)


def test_kretprobe_sees_enoent(variant: Variant) -> None:
    vm = variant.vm
    values: list[int] = []
    rp = Kretprobe(symbol_name="do_sys_openat2",
                   handler=lambda ri, regs: values.append(regs.ax - (regs.ax >> 63 << 64)))
    vm.register_kretprobe(rp)
    try:
        r = vm.run("cat /no/such/file; cat /proc/version >/dev/null; true")
    finally:
        vm.unregister_kretprobe(rp)
    wait_returned(rp)
    assert "No such file" in r.stderr
    assert ENOENT in values and any(v >= 0 for v in values)
    assert rp.nhit == len(values)


def test_funclatency_on_every_vcpu(variant: Variant) -> None:
    """Latencies counted in the guest: 10 ms sleeps in [8M, 16M) ns or above (a loaded
    host can wake the guest late, never early), every one of dd's reads timed, none
    missed (on 6.12, vfs_read has a sealed ENDBR), the text as it was."""
    vm = variant.vm
    before = vm.read(vm.symbols["hrtimer_nanosleep"], 64)
    with vm.funclatency("hrtimer_nanosleep") as slept, vm.funclatency("vfs_read") as rd:
        sleeps = "for i in 1 2 3 4; do sleep 0.01; done"
        vm.run(f"{sleeps}; dd if=/dev/zero of=/dev/null bs=1 count=500 2>/dev/null", check=True)
    slept_buckets = [b for b in slept.read().buckets if b.count]
    assert sum(b.count for b in slept_buckets) == 4, slept_buckets
    assert all(b.lo is not None and b.lo >= 8 << 20 and b.hi is not None and b.hi <= 1 << 30
               for b in slept_buckets), slept_buckets  # fmt: skip
    assert rd.read().total >= 500 and rd.missed() == slept.missed() == 0
    assert vm.read(vm.symbols["hrtimer_nanosleep"], 64) == before


def test_stack_counts_are_the_guests_hist(variant: Variant) -> None:
    """count --by stack on vfs_read under dd and on hrtimer_interrupt over a second,
    against the guest's own hist trigger keyed by its stack (each kernel's key name,
    frames, ORC layout and IRQ stack pointer), the text as it was."""
    vm = variant.vm
    addr, size = variant.text["vfs_read"][0], vm.symbols.size("vfs_read")
    before = vm.read(addr, size)
    with vm.count_by("vfs_read", "stack") as m:
        both = check_against_the_guests_hist(vm, m, "vfs_read", DD, 2000)
    assert max(both.values())[0] >= 2000
    assert vm.read(addr, size) == before
    timer = vm.symbols["hrtimer_interrupt"]
    before = vm.read(timer, 64)
    with vm.count_by("hrtimer_interrupt", "stack") as m:
        both = check_against_the_guests_hist(vm, m, "hrtimer_interrupt", "sleep 1", 5)
    assert any("asm_sysvec_apic_timer_interrupt" in f for c in both for f in c), both
    assert vm.read(timer, 64) == before


@dataclass
class _Tracefs:
    runs: dict[tuple[str, int], diff.SideRun] = field(default_factory=dict)


_TRACEFS = _Tracefs()


@pytest.mark.parametrize(("index", "mode"), RUNS)
def test_trace_lines_as_the_guests_tracefs(variant: Variant, index: int, mode: str) -> None:
    """The differential harness's corpus on this variant (workload pinned to vCPU 0)."""
    vm = variant.vm
    definitions = [diff.expand(d, vm) for d in TRACED[index]]
    if not taken_by(vm, index):
        check_refused_alike(vm, definitions)
        return
    key = (variant.name, index)
    if key not in _TRACEFS.runs:
        _TRACEFS.runs[key] = diff.run_tracefs(vm, definitions, PINNED)
    guest = _TRACEFS.runs[key]
    assert guest.of(COMM), "the workload made no line on the guest's side"
    if mode == "record" and (why := record_refusal(vm, index)) is not None:
        check_record_refused(vm, definitions, PINNED, why)
        return
    ours = diff.run_kprobevm(vm, definitions, PINNED, mode=mode)
    result = diff.compare_lines(guest.of(COMM), ours.of(COMM))
    assert result.identical, result.describe()
    assert ours.kprobes_list == guest.kprobes_list


def test_error_log_as_the_guest_writes_it(variant: Variant) -> None:
    """Each rejected case on its own, compared case by case (a case one kernel takes
    compares as the kprobe_events lines it leaves)."""
    vm = variant.vm
    differ: dict[str, tuple[list[str], list[str]]] = {}
    for case in [[diff.expand(d, vm) for d in case] for case in REJECTED]:
        sides: tuple[list[str], list[str]] = ([], [])
        for side, run in zip(sides, (diff.tracefs_errors, diff.kprobevm_errors), strict=True):
            result = run(vm, case)
            side += [e.text() for e in result.errors] + list(result.accepted)
        if sides[0] != sides[1]:
            differ[case[-1]] = sides
    assert not differ, differ


def test_text_as_at_boot_and_no_trouble(variant: Variant) -> None:
    """Last: no probe left, every probed function's text as it was at boot, a quiet
    console and a dmesg without warnings."""
    vm = variant.vm
    assert vm.list_kprobes() == ""
    now = {name: (addr, hashlib.sha256(vm.read(addr, vm.symbols.size(name))).hexdigest())
           for name, (addr, _) in variant.text.items()}
    assert now == variant.text
    assert not kernel_trouble(vm.serial_log())
    dmesg = vm.run("dmesg", check=True).stdout
    assert "WARNING:" not in dmesg and "------------[ cut" not in dmesg, dmesg[-3000:]
