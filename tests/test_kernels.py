"""The kernel matrix: Debian's 6.12 cloud kernel (IBT, CALL_PADDING, its own blacklist)
under two vCPUs (funclatency among what it runs), and the PREEMPT_RT kernels of 6.1 and
6.12 booted once each.

Each kernel's image is built from its Debian package on first use (downloaded once into
the cache, next to the default image). The guest kernel is the oracle: its debugfs
blacklist and kprobes list, and where it puts a probe on ``func+0``. The trace lines
against its tracefs are the differential harness's (tests/test_differential.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kprobes.aggregations import Bucket
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.arch import is_endbr
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.record import Capture

pytestmark = pytest.mark.vm

KERNEL_612 = "linux-image-6.12-cloud-amd64"
OPENS_PER_CPU = 60
TARGET = "/tmp/kpt-kernels"
HOT = ("do_sys_openat2", "vfs_read")
"""Hot functions: do_sys_openat2 starts with its ftrace NOP (static, no ENDBR); vfs_read
with a sealed ENDBR, then the NOP at +4."""


def _trouble(vm: VM) -> list[str]:
    return kernel_trouble(vm.serial_log())


@pytest.fixture(scope="module")
def vm612() -> Iterator[VM]:
    """The 6.12 cloud guest with two vCPUs; at the end its probed text is as it was and
    its console shows no trouble."""
    with boot(kernel_package=KERNEL_612, smp=2, name="k612") as vm:
        before = {name: vm.read(vm.symbols[name], 64) for name in HOT}
        yield vm
        vm.kprobes.unregister_all()
        assert {name: vm.read(vm.symbols[name], 64) for name in HOT} == before
        assert _trouble(vm) == []


def test_a_probe_on_func_0_goes_where_the_guest_puts_it(vm612: VM) -> None:
    """func+0 of an ENDBR function is func+4 in the guest's kprobes/list; ours too."""
    syms = vm612.symbols
    assert is_endbr(vm612.read(syms["vfs_read"], 4))
    guest = vm612.run(
        "cd /sys/kernel/tracing && echo 'p:kpt_a vfs_read' > kprobe_events"
        " && echo 'p:kpt_b do_sys_openat2' >> kprobe_events"
        " && echo 1 > events/kprobes/enable && cat /sys/kernel/debug/kprobes/list;"
        " echo 0 > events/kprobes/enable; echo > kprobe_events", check=True,
    ).stdout  # fmt: skip
    kps = [Kprobe(symbol_name=name) for name in ("vfs_read", "do_sys_openat2")]
    vm612.register_kprobes(kps)
    try:
        ours = vm612.list_kprobes()
        placed = [kp.addr for kp in kps]
    finally:
        vm612.unregister_kprobes(kps)
    assert placed == [syms["vfs_read"] + 4, syms["do_sys_openat2"]]
    assert sorted(ours.splitlines()) == sorted(guest.splitlines())
    assert "vfs_read+0x4" in ours and "do_sys_openat2+0x0" in ours


def test_stopping_and_recorded_probes_on_two_vcpus(vm612: VM) -> None:
    """Stopping probes with handlers on both hot functions, and a recorded probe that
    reads the file name, while each vCPU runs an open loop: every vCPU hits, each handler
    is told the vCPU the guest itself says, and each recorded name is the file's."""
    layout = vm612.task_layout
    assert layout is not None
    cpus: Counter[int] = Counter()
    wrong: list[tuple[int, int]] = []
    reads: Counter[int] = Counter()
    names: Counter[bytes] = Counter()

    def on_open(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        guest_cpu = regs.memory.u32(regs.gs_base + layout.cpu_number)
        if guest_cpu != regs.cpu:
            wrong.append((regs.cpu, guest_cpu))
        assert regs.ip == kp.addr
        cpus[regs.cpu] += 1

    def on_read(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.ip == kp.addr
        reads[regs.cpu] += 1

    def on_record(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        names[regs.memory.cstring(regs.si, 64)] += 1

    opens = Kprobe(symbol_name="do_sys_openat2", pre_handler=on_open)
    vfs_read = Kprobe(symbol_name="vfs_read", pre_handler=on_read)
    recorded = Kprobe(symbol_name="do_sys_openat2", pre_handler=on_record, record=RecordSpec(
        captures=(Capture(offset=0, size=64, reg="si", string=True, user=True),)))
    vm612.run(f"echo kpt > {TARGET}", check=True)
    for kp in (opens, vfs_read):
        vm612.register_kprobe(kp)
    try:
        loop = f"for i in $(seq {OPENS_PER_CPU}); do read x < {TARGET}; done; echo $x"
        out = vm612.run(f"for c in 0 1; do taskset -c $c sh -c '{loop}' & done; wait",
                        check=True, timeout=180).stdout
    finally:
        vm612.unregister_kprobes([opens, vfs_read])
    assert out == "kpt\n" * 2
    assert wrong == []
    assert cpus[0] >= OPENS_PER_CPU and cpus[1] >= OPENS_PER_CPU, cpus
    assert sum(reads.values()) >= 2 * OPENS_PER_CPU, reads

    vm612.register_kprobe(recorded)
    try:
        vm612.run(f"for c in 0 1; do taskset -c $c sh -c '{loop}' & done; wait",
                  check=True, timeout=180)
        vm612.flush_records()
    finally:
        vm612.unregister_kprobe(recorded)
    assert names[TARGET.encode()] >= 2 * OPENS_PER_CPU, names.most_common(5)


def test_return_probes_see_the_return_value(vm612: VM) -> None:
    """On do_sys_openat2 (entry at +0) and vfs_read (ENDBR: entry at +4, where the
    guest's own return probe goes)."""
    values: dict[str, list[int]] = {"do_sys_openat2": [], "vfs_read": []}

    def handler(name: str) -> Callable[[KretprobeInstance, PtRegs], None]:
        def ret(ri: KretprobeInstance, regs: PtRegs) -> None:
            values[name].append(regs.ax - (1 << 64) if regs.ax >> 63 else regs.ax)
        return ret

    rps = [Kretprobe(symbol_name=name, handler=handler(name)) for name in values]
    for rp in rps:
        vm612.register_kretprobe(rp)
    try:
        placed = [rp.kp.addr for rp in rps if rp.kp is not None]
        vm612.run("cat /nonexistent-kpt 2>/dev/null; cat /proc/version >/dev/null; true")
    finally:
        for rp in rps:
            vm612.unregister_kretprobe(rp)
    syms = vm612.symbols
    assert placed == [syms["do_sys_openat2"], syms["vfs_read"] + 4]
    assert -2 in values["do_sys_openat2"], values
    assert any(v > 0 for v in values["vfs_read"]), values


def test_funclatency_on_two_vcpus(vm612: VM) -> None:
    """funclatency on 6.12 (a sealed ENDBR at vfs_read, IBT): 10 ms sleeps in [8M, 16M)
    ns, every one of dd's reads of vfs_read timed, none missed, the text as it was."""
    before = vm612.read(vm612.symbols["hrtimer_nanosleep"], 64)
    with vm612.funclatency("hrtimer_nanosleep") as slept, vm612.funclatency("vfs_read") as rd:
        sleeps = "for i in 1 2 3 4; do sleep 0.01; done"
        vm612.run(f"{sleeps}; dd if=/dev/zero of=/dev/null bs=1 count=500 2>/dev/null", check=True)
    assert [b for b in slept.read().buckets if b.count] == [Bucket(8 << 20, 16 << 20, 4)]
    assert rd.read().total >= 500 and rd.missed() == slept.missed() == 0
    assert vm612.read(vm612.symbols["hrtimer_nanosleep"], 64) == before


def test_blacklist_is_the_guests(vm612: VM) -> None:
    """The kernel's part of ours is the guest's debugfs file, line for line and in order
    (6.12: some 670-720 entries; kprobevm adds the IDT and 6.12's __do_softirq area)."""
    guest = vm612.read_file("/sys/kernel/debug/kprobes/blacklist")
    lines = int(vm612.run("wc -l < /sys/kernel/debug/kprobes/blacklist").stdout)
    bl = vm612.kprobe_blacklist
    assert bl.missing == []
    assert len(guest.splitlines()) == lines > 600
    assert bl.format_debugfs(kernel_only=True) == guest


@pytest.mark.parametrize("package", ["linux-image-rt-amd64", "linux-image-6.12-rt-amd64"])
def test_preempt_rt_kernels_boot_and_take_a_probe(package: str) -> None:
    """PREEMPT_RT: boots, a stopping probe and a recorded one see hits, text restored."""
    hits: list[int] = []
    with boot(kernel_package=package, name="rt") as vm:
        assert "PREEMPT_RT" in vm.run("uname -v", check=True).stdout
        func = vm.symbols["do_sys_openat2"]
        before = vm.read(func, 32)
        stop = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, r: hits.append(r.cpu))
        vm.register_kprobe(stop)
        vm.run("cat /proc/version >/dev/null", check=True)
        vm.unregister_kprobe(stop)
        counted = Kprobe(symbol_name="vfs_read")
        vm.register_kprobe(counted)
        vm.run("cat /proc/version >/dev/null", check=True)
        vm.unregister_kprobe(counted)
        assert vm.read(func, 32) == before
        assert _trouble(vm) == []
    assert hits
    assert counted.nhit > 0
