"""Return probes on a real guest: return values, entry data, maxactive, in-flight safety,
several return probes on one function (one and two vCPUs)."""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

import pytest

from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.vm import VM
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.x86.ptregs import PtRegs

pytestmark = pytest.mark.vm

ENOENT = -2


def wait_returned(*rps: Kretprobe, timeout: float = 10) -> None:
    """Wait until the calls in flight when ``rps`` were unregistered have returned: as in
    the kernel, unregistering stops new entries but a call already inside (another vCPU's,
    a daemon's) still returns through the trampoline, later."""
    deadline = time.monotonic() + timeout
    while any(rp.active for rp in rps):
        assert time.monotonic() < deadline, [rp.active for rp in rps]
        time.sleep(0.05)


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def test_return_value_of_a_failing_open_is_enoent(vm: VM) -> None:
    values: list[int] = []
    rp = Kretprobe(symbol_name="do_sys_openat2",
                   handler=lambda ri, regs: values.append(signed(regs.ax)))  # fmt: skip
    vm.register_kretprobe(rp)
    try:
        r = vm.run("cat /no/such/file; cat /proc/version >/dev/null; true")
    finally:
        vm.unregister_kretprobe(rp)
    wait_returned(rp)
    assert "No such file" in r.stderr
    assert ENOENT in values
    assert any(v >= 0 for v in values), "a successful open returns a file descriptor"
    assert rp.nhit == len(values)


def test_entry_handler_data_reaches_the_return_handler(vm: VM) -> None:
    seen: list[tuple[bytes, int]] = []

    def entry(ri: KretprobeInstance, regs: PtRegs) -> bool:
        ri.data[:8] = struct.pack("<Q", regs.si)  # the filename pointer at entry
        return False

    def ret(ri: KretprobeInstance, regs: PtRegs) -> None:
        (filename,) = struct.unpack("<Q", bytes(ri.data[:8]))
        assert regs.memory is not None
        seen.append((regs.memory.cstring(filename, 64), signed(regs.ax)))

    rp = Kretprobe(symbol_name="do_sys_openat2", entry_handler=entry, handler=ret, data_size=8)
    vm.register_kretprobe(rp)
    try:
        vm.run("cat /no/such/kretprobe-file 2>/dev/null; true")
    finally:
        vm.unregister_kretprobe(rp)
    assert (b"/no/such/kretprobe-file", ENOENT) in seen


def test_maxactive_exhaustion_counts_nmissed_and_inflight_unregister_is_safe(vm: VM) -> None:
    # An open of a FIFO blocks inside do_sys_openat2 until a writer comes: one instance
    # stays in flight, so with maxactive=1 every other open is missed.
    vm.run("rm -f /tmp/kfifo; mkfifo /tmp/kfifo", check=True)
    values: list[int] = []
    rp = Kretprobe(symbol_name="do_sys_openat2", maxactive=1,
                   handler=lambda ri, regs: values.append(signed(regs.ax)))  # fmt: skip
    vm.register_kretprobe(rp)
    unregistered = False
    try:
        vm.run("(cat /tmp/kfifo >/tmp/kfifo.out) >/dev/null 2>&1 &", check=True)
        deadline = time.monotonic() + 30
        while rp.active < 1:
            assert time.monotonic() < deadline, "the FIFO reader never entered the open"
            time.sleep(0.1)
        vm.run("for i in 1 2 3 4 5; do cat /proc/version >/dev/null; done")
        assert rp.nmissed >= 5
        # Unregister with the reader's open still in flight, then let it return.
        vm.unregister_kretprobe(rp)
        unregistered = True
        vm.run("echo released >/tmp/kfifo", check=True)
        deadline = time.monotonic() + 30
        while vm.run("cat /tmp/kfifo.out").stdout.strip() != "released":
            assert time.monotonic() < deadline, "the in-flight open never returned"
            time.sleep(0.2)
    finally:
        if not unregistered:
            vm.unregister_kretprobe(rp)
    assert vm.run("cat /proc/version").returncode == 0


def test_do_exit_never_returns_and_does_not_leak(vm: VM) -> None:
    rp = Kretprobe(symbol_name="do_exit", maxactive=2, handler=lambda ri, regs: None)
    vm.register_kretprobe(rp)
    reclaimed_before = vm.kretprobes.reclaimed
    try:
        vm.run("for i in $(seq 12); do /bin/true; done", check=True)
        time.sleep(0.5)
        vm.run("/bin/true", check=True)
    finally:
        vm.unregister_kretprobe(rp)
    assert rp.nhit == 0  # do_exit does not return
    assert rp.active <= rp.maxactive
    # every exit after the first two found its instance reclaimed, none was missed
    assert vm.kretprobes.reclaimed - reclaimed_before >= 10
    assert rp.nmissed == 0
    # instances of exited tasks may remain (their stacks unmapped): closing copes
    vm.kprobes.close()



@dataclass
class _Returns:
    """A return probe and what its handler saw: (cpu, caller, return value, chained)."""

    rp: Kretprobe = field(init=False)
    seen: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rp = Kretprobe(symbol_name="do_sys_openat2", handler=self.handler)

    def handler(self, ri: KretprobeInstance, regs: PtRegs) -> None:
        self.seen.append((regs.cpu, ri.ret_addr, signed(regs.ax), ri.chained))
        assert regs.ip == ri.ret_addr


def _two_on_one_function(vm: VM, workload: str, *, timeout: float = 60) -> list[_Returns]:
    """Two return probes on do_sys_openat2 around ``workload``, registered in order;
    checks that do_sys_openat2's text is the guest's own again after."""
    sym = vm.symbols.symbol("do_sys_openat2")
    before = vm.read(sym.address, sym.size)
    probes = [_Returns(), _Returns()]
    try:
        for p in probes:
            vm.register_kretprobe(p.rp)
        vm.run(workload, timeout=timeout)
    finally:
        for p in probes:
            if p.rp.registered:
                vm.unregister_kretprobe(p.rp)
    wait_returned(*(p.rp for p in probes))
    assert vm.read(sym.address, sym.size) == before
    for p in probes:
        assert p.rp.nerrors == 0 and p.rp.nmissed == 0, p.rp.errors
        assert p.rp.nhit == len(p.seen) > 0
    return probes


def _callers(vm: VM, seen: list[tuple[int, int, int, bool]]) -> set[str]:
    """The functions the returns went back to."""
    names = set()
    for _, ret_addr, _, _ in seen:
        sym = vm.symbols.lookup(ret_addr)
        assert sym is not None, f"{ret_addr:#x} is in no function"
        names.add(sym.name)
    return names


OPEN_CALLERS = {"do_sys_open", "__x64_sys_open", "__x64_sys_openat", "__x64_sys_openat2"}


def test_two_return_probes_on_one_function_both_see_every_return(vm: VM) -> None:
    first, second = _two_on_one_function(
        vm, "cat /no/such/file; cat /proc/version >/dev/null; true"
    )
    a, b = first.seen, second.seen
    # the same returns, values and callers; the one hooked second is chained
    assert [x[:3] for x in a] == [x[:3] for x in b]
    assert ENOENT in [x[2] for x in a]
    assert not any(x[3] for x in a) and all(x[3] for x in b)
    assert _callers(vm, a) <= OPEN_CALLERS, _callers(vm, a)


def test_two_return_probes_on_one_function_on_two_vcpus() -> None:
    """The same under SMP: opens on both vCPUs at once, every return seen by both probes
    on the vCPU it ran on, nothing missed, a clean console."""
    from kprobevm.guest.launcher import boot

    n = 40
    loop = f"for i in $(seq {n}); do read x < /tmp/kret-smp; done"
    with boot(smp=2, name="kret-smp") as vm:
        vm.run("echo x > /tmp/kret-smp", check=True)
        first, second = _two_on_one_function(
            vm, f"for c in 0 1; do taskset -c $c sh -c '{loop}' & done; wait", timeout=120
        )
        trouble = kernel_trouble(vm.serial_log())
    assert not trouble, trouble[:10]
    a, b = first.seen, second.seen
    assert sorted(x[:3] for x in a) == sorted(x[:3] for x in b)
    for cpu in (0, 1):  # each loop's opens returned on its vCPU, the file opened
        assert sum(1 for x in a if x[0] == cpu and x[2] >= 0) >= n
    assert not any(x[3] for x in a) and all(x[3] for x in b)
