"""Slot reuse on kernels that preempt kernel code: the 6.1 and 6.12 PREEMPT_RT kernels,
and the default 6.1 kernel booted with ``preempt=full`` (PREEMPT_DYNAMIC), against the default
guest's voluntary preemption.

The scenario: three shell loops fork ``cat`` (each fork and exec clears pages, through
``clear_page_rep``'s ``rep stosq``) while a probe sits on that instruction, so tasks
run through its slot all the time and now and then are switched out inside it (an
interrupt held off by the #BP stub arrives at the slot's first byte as it ``iretq``s).
The test first waits until a scan finds such a task, then registers and unregisters
probes on two different functions many times, so freed slots are reused by other code,
and checks the guest's console and text at the end.
"""

from __future__ import annotations

import time

import pytest

from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.trap.watchpoint import WatchpointChannel
from kprobevm.x86 import insn as x86insn

pytestmark = pytest.mark.vm

LOOPS = ("for i in 1 2 3; do (while :; do cat /proc/version >/dev/null; done) &"
         " echo $! >> /tmp/kpt-loops; done")  # fmt: skip
FUNCS = ("clear_page_rep", "vfs_read")
"""``rep stosq`` in clear_page_rep, and a hot function entry: different slot code."""
SCAN_BUDGET = 15.0
"""Seconds of scans to find a task switched out inside a slot (seen within 1-3 s)."""


def _channel(vm: VM) -> WatchpointChannel:
    channel = vm.kprobes.channel
    assert isinstance(channel, WatchpointChannel)
    return channel


def _find_preempted_in_slot(vm: VM, channel: WatchpointChannel) -> str:
    """Scan (VM stopped) until a task not on a vCPU holds a slot address on its stack."""
    q = channel.quiescence
    deadline = time.monotonic() + SCAN_BUDGET
    while time.monotonic() < deadline:
        with vm.target.stopped():
            q.observe()
        assert q.tasks is not None and q.tasks.last is not None
        for hold in q.tasks.last.holders:
            if hold.why.startswith("stack words"):
                return str(hold)
        time.sleep(0.01)
    raise AssertionError(f"no task seen switched out inside a slot in {SCAN_BUDGET:g} s")


def _rep_stos(vm: VM) -> int:
    """Offset of clear_page_rep's ``rep stosq`` (after an ``endbr64`` on IBT kernels;
    read before anything is probed there)."""
    start = vm.symbols["clear_page_rep"]
    code, offset = vm.read(start, 32), 0
    while offset < 24:
        insn = x86insn.decode(code[offset:], start + offset)
        if insn.mnemonic.startswith("rep stos"):
            return offset
        offset += insn.length
    raise AssertionError(f"no rep stos in clear_page_rep: {code.hex()}")


def _churn(vm: VM, rounds: int, rep_stos: int) -> list[int]:
    """Register and unregister a probe ``rounds`` times, alternating the two sites;
    the slot each got."""
    slots = []
    sites = (("clear_page_rep", rep_stos), ("vfs_read", 0))
    for i in range(rounds):
        name, offset = sites[i % 2]
        kp = Kprobe(symbol_name=name, offset=offset)
        vm.register_kprobe(kp)
        assert kp.addr is not None
        # a probe on vfs_read+0 sits after its ftrace NOP (and an endbr64 on IBT kernels)
        site = next(filter(None, map(vm.kprobes.site_at, (kp.addr + d for d in (0, 4, 5, 9)))),
                    None)  # fmt: skip
        assert site is not None and site.slot is not None
        slots.append(site.slot.address)
        time.sleep(0.005)
        vm.unregister_kprobe(kp)
    return slots


def _texts(vm: VM) -> dict[str, bytes]:
    return {name: vm.read(vm.symbols[name], 64) for name in FUNCS}


def _run_scenario(vm: VM, model: str, rounds: int) -> None:
    before = _texts(vm)
    rep_stos = _rep_stos(vm)
    resident = Kprobe(symbol_name="clear_page_rep", offset=rep_stos)
    vm.register_kprobe(resident)
    channel = _channel(vm)
    rule = channel.grace_rule
    assert (rule.name, rule.model.name, rule.model.preemptible) == ("tasks", model, True)
    vm.run(LOOPS, check=True)
    try:
        held = _find_preempted_in_slot(vm, channel)
        assert "clear_page" not in held  # a task's comm: the loops' shells or cat
        slots = _churn(vm, rounds, rep_stos)
    finally:
        vm.run("kill $(cat /tmp/kpt-loops); rm -f /tmp/kpt-loops", timeout=30)
    assert resident.nhit > 0
    vm.unregister_kprobe(resident)
    assert len(set(slots)) < len(slots), "freed slots were never reused"
    tasks = channel.quiescence.tasks
    assert tasks is not None and tasks.nscans > 0
    vm.run("cat /proc/version", check=True)
    assert _texts(vm) == before
    assert kernel_trouble(vm.serial_log()) == []


@pytest.mark.parametrize(("package", "rounds"),
                         [("linux-image-rt-amd64", 120), ("linux-image-6.12-rt-amd64", 60)])
def test_rt_kernel_slots_wait_for_tasks_preempted_inside(package: str, rounds: int) -> None:
    with boot(kernel_package=package, name="rtgrace") as vm:
        _run_scenario(vm, "rt", rounds=rounds)


def test_preempt_full_kernel_slots_wait_for_tasks_preempted_inside() -> None:
    with boot(append="preempt=full", name="fullgrace") as vm:
        _run_scenario(vm, "full", rounds=60)


def test_the_default_kernel_keeps_the_vcpu_rule(vm: VM) -> None:
    """PREEMPT_DYNAMIC in its default voluntary mode: no task scans."""
    rule = _channel(vm).grace_rule
    assert (rule.name, rule.model.name, rule.model.dynamic) == ("vcpus", "voluntary", True)
