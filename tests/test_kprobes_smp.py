"""The kprobes engine on guests with two and four vCPUs: hits from every vCPU, each
handler told the right vCPU, per-vCPU pre/post pairing, and a healthy guest.

These tests boot their own guests (one at a time), so they check the serial log for
kernel trouble themselves.
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pytest

from kprobevm.errors import GuestFaultError
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.ptregs import PtRegs

pytestmark = pytest.mark.vm

OPENS_PER_CPU = 60
TARGET = b"/tmp/kpt-smp"
MIN_SEEN = OPENS_PER_CPU
"""Hits each vCPU must show: all of them (QEMU's late and folded SMP stops are handled)."""


@dataclass
class SmpRun:
    """What the handlers saw while every vCPU ran the open loop."""

    ncpus: int
    names: dict[int, Counter[bytes]] = field(default_factory=lambda: defaultdict(Counter))
    wrong_cpu: list[tuple[int, int]] = field(default_factory=list)
    faults: int = 0
    pairs: Counter[int] = field(default_factory=Counter)
    """push probes whose post state matched the pre state of the same vCPU."""
    mismatches: list[str] = field(default_factory=list)
    lost: int = 0
    """pre stops without their post, or posts without their pre."""
    opens: Kprobe | None = None
    pushes: Kprobe | None = None


def run_on_every_cpu(vm: VM, ncpus: int) -> SmpRun:
    """do_sys_openat2 (pre) and getname's ``push %rbx`` (pre+post) probed, while each vCPU
    runs OPENS_PER_CPU opens pinned with taskset."""
    syms = vm.symbols
    # the CPU's number is per-CPU data (cpu_number, or pcpu_hot.cpu_number since 6.2): an
    # offset in the per-CPU area, which %gs points at in the kernel
    layout = vm.task_layout
    assert layout is not None
    cpu_number = layout.cpu_number
    run = SmpRun(ncpus)

    def on_open(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        guest_cpu = regs.memory.u32(regs.gs_base + cpu_number)
        if guest_cpu != regs.cpu:
            run.wrong_cpu.append((regs.cpu, guest_cpu))
        try:
            run.names[regs.cpu][regs.memory.cstring(regs.si, 256)] += 1
        except GuestFaultError:
            run.faults += 1

    getname = syms.symbol("getname")
    code = vm.read(getname.address, getname.size)
    push = next(
        i
        for a in x86insn.boundaries(code, getname.address)
        if (i := x86insn.decode(code[a - getname.address :], a)).mnemonic == "push"
    )
    assert push.op_str == "rbx"
    # a hit in flight is its task's, known by its stack pointer: on a preemptible kernel
    # the task can be switched out between the pre and post stops, even onto another vCPU
    in_flight: dict[int, tuple[int, int]] = {}

    def push_pre(kp: Kprobe, regs: PtRegs) -> None:
        if regs.sp in in_flight:
            run.lost += 1  # the post of this task's previous hit here never came
        in_flight[regs.sp] = (regs.sp, regs.bx)

    def push_post(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.memory is not None
        if regs.sp + 8 not in in_flight:
            run.lost += 1
            return
        sp, bx = in_flight.pop(regs.sp + 8)
        pushed = regs.memory.u64(regs.sp)
        if (regs.sp, pushed, regs.ip) != (sp - 8, bx, push.next_addr):
            run.mismatches.append(f"cpu {regs.cpu}: sp={regs.sp:#x} [sp]={pushed:#x}")
        else:
            run.pairs[regs.cpu] += 1

    run.opens = Kprobe(symbol_name="do_sys_openat2", pre_handler=on_open)
    run.pushes = Kprobe(addr=push.addr, pre_handler=push_pre, post_handler=push_post)
    vm.register_kprobe(run.opens)
    vm.register_kprobe(run.pushes)
    try:
        vm.run(f"echo kpt-smp > {TARGET.decode()}", check=True)
        loop = f"for i in $(seq {OPENS_PER_CPU}); do read x < {TARGET.decode()}; done; echo $x"
        cpus = " ".join(str(c) for c in range(ncpus))
        result = vm.run(
            f"for c in {cpus}; do taskset -c $c sh -c '{loop}' & done; wait",
            check=True, timeout=120,
        )  # fmt: skip
        assert result.stdout == "kpt-smp\n" * ncpus, result
    finally:
        vm.unregister_kprobe(run.opens)
        vm.unregister_kprobe(run.pushes)
    assert vm.run("nproc", check=True).stdout.strip() == str(ncpus)
    trouble = kernel_trouble(vm.serial_log())
    assert not trouble, trouble[:10]
    return run


@pytest.mark.parametrize("ncpus", [2, 4])
def test_hits_on_every_vcpu(ncpus: int) -> None:
    """Every hit arrives from every vCPU, regs.cpu is the guest's own cpu_number, the file name
    reads right through each vCPU's user mapping, and post states pair per vCPU."""
    with boot(smp=ncpus, name=f"smp{ncpus}") as vm:
        run = run_on_every_cpu(vm, ncpus)
    assert run.opens is not None and run.pushes is not None
    assert not run.wrong_cpu, f"regs.cpu is not the guest's cpu_number: {run.wrong_cpu[:5]}"
    assert set(run.names) == set(range(ncpus))
    for cpu in range(ncpus):
        assert run.names[cpu][TARGET] >= MIN_SEEN, (cpu, run.names[cpu].most_common(3))
        assert run.pairs[cpu] >= MIN_SEEN, (cpu, run.pairs)
    assert run.opens.nhit == sum(sum(c.values()) for c in run.names.values()) + run.faults
    # no hit lost: every pre has its post on the same vCPU, with the right state
    assert run.lost == 0 and not run.mismatches, (run.lost, run.mismatches[:5])
    assert run.opens.nerrors == 0 and run.pushes.nerrors == 0, run.opens.errors + run.pushes.errors


def record_on_every_cpu(vm: VM, ncpus: int, n: int) -> None:
    """Two or more vCPUs reserve records in one ring at once: every one of ``n`` opens per
    vCPU arrives once, tagged with the vCPU its (pinned) process ran on, and the console
    shows no trouble."""
    from kprobevm.tracing import ProbeEvent, parse_event
    from kprobevm.tracing.session import TraceSession, args_of, plan_events

    event = parse_event("p:o do_sys_openat2 name=+0(%si):ustring comm=$comm")
    assert isinstance(event, ProbeEvent)
    files = " ".join(f"{TARGET.decode()}-{c}" for c in range(ncpus))
    vm.run(f"for f in {files}; do echo x > $f; done", check=True)
    session = TraceSession(vm, plan_events(vm, [event]), mode="record")
    loop = f"i=0; while [ $i -lt {n} ]; do : < {TARGET.decode()}-$c; i=$((i+1)); done"
    cpus = " ".join(str(c) for c in range(ncpus))
    with session:
        vm.run(f"for c in {cpus}; do taskset -c $c sh -c 'c='$c'; {loop}' & done; wait",
               check=True, timeout=120)  # fmt: skip
    hits = list(session.drain())
    trouble = kernel_trouble(vm.serial_log())
    assert session.recorded and not session.handler_errors()
    assert not trouble, trouble[:10]
    assert session.missed() == 0
    for c in range(ncpus):
        mine = [h for h in hits if args_of(h)["name"] == b"%s-%d" % (TARGET, c)]
        assert len(mine) == n, (c, len(mine))
        assert {h.cpu for h in mine} == {c}


def test_recorded_hits_on_every_vcpu() -> None:
    """Recorded probes under SMP (see record_on_every_cpu)."""
    with boot(smp=2, name="smp-rec") as vm:
        record_on_every_cpu(vm, 2, 400)


def test_no_hit_lost_to_a_stop_of_our_own() -> None:
    """A stop the host asks for (a registration, the optimizer's looks) can come as a vCPU
    finishes its watched store: QEMU then reports only the interrupt, and the vCPU sits
    after the store unreported. Every such hit is still handled, exactly once: each of
    the opens of every vCPU arrives while another thread stops the guest every few ms."""
    ncpus, opens = 2, 300
    with boot(smp=ncpus, name="smp-pokes") as vm:
        layout = vm.task_layout
        assert layout is not None
        seen: Counter[tuple[int, bytes]] = Counter()

        def on_open(kp: Kprobe, regs: PtRegs) -> None:
            assert regs.memory is not None
            try:  # another program's name may not be paged in: not one of the loop's
                name = regs.memory.cstring(regs.si, 64)
            except GuestFaultError:
                return
            seen[regs.memory.u32(regs.gs_base + layout.cpu_number), name] += 1

        kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=on_open)
        done = threading.Event()
        stops = 0

        def poke() -> None:
            nonlocal stops
            while not done.wait(0.001):
                with vm.target.stopped():
                    stops += 1

        vm.run(f"echo x > {TARGET.decode()}", check=True)
        vm.register_kprobe(kp)
        poker = threading.Thread(target=poke, daemon=True)
        poker.start()
        try:
            loop = f"for i in $(seq {opens}); do read x < {TARGET.decode()}; done"
            vm.run(f"for c in 0 1; do taskset -c $c sh -c '{loop}' & done; wait",
                   check=True, timeout=120)  # fmt: skip
        finally:
            done.set()
            poker.join(timeout=30)
            vm.unregister_kprobe(kp)
        trouble = kernel_trouble(vm.serial_log())
    assert not trouble, trouble[:10]
    assert stops > 50, stops
    assert kp.nerrors == 0, kp.errors
    assert [seen[c, TARGET] for c in range(ncpus)] == [opens] * ncpus, (stops, seen)
