"""Slot reuse on kernels that preempt kernel code: the 6.1 PREEMPT_RT kernel, and the
default 6.1 kernel booted with ``preempt=full`` (PREEMPT_DYNAMIC), against the default
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

import re
import time

import pytest

from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.trap.watchpoint import WatchpointChannel

pytestmark = pytest.mark.vm

TROUBLE = re.compile(r"int3:|Oops|BUG:|general protection|\bpanic\b(?!=)")
LOOPS = ("for i in 1 2 3; do (while :; do cat /proc/version >/dev/null; done) &"
         " echo $! >> /tmp/kpt-loops; done")  # fmt: skip
SITES = (("clear_page_rep", 7), ("vfs_read", 0))
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


def _churn(vm: VM, rounds: int) -> list[int]:
    """Register and unregister a probe ``rounds`` times, alternating the two sites;
    the slot each got."""
    slots = []
    for i in range(rounds):
        name, offset = SITES[i % 2]
        kp = Kprobe(symbol_name=name, offset=offset)
        vm.register_kprobe(kp)
        assert kp.addr is not None
        site = vm.kprobes.site_at(kp.addr) or vm.kprobes.site_at(kp.addr + 5)  # ftrace NOP
        assert site is not None and site.slot is not None
        slots.append(site.slot.address)
        time.sleep(0.005)
        vm.unregister_kprobe(kp)
    return slots


def _texts(vm: VM) -> dict[str, bytes]:
    return {name: vm.read(vm.symbols[name], 64) for name, _ in SITES}


def _run_scenario(vm: VM, model: str, rounds: int) -> None:
    before = _texts(vm)
    resident = Kprobe(symbol_name="clear_page_rep", offset=7)
    vm.register_kprobe(resident)
    channel = _channel(vm)
    rule = channel.grace_rule
    assert (rule.name, rule.model.name, rule.model.preemptible) == ("tasks", model, True)
    vm.run(LOOPS, check=True)
    try:
        held = _find_preempted_in_slot(vm, channel)
        assert "clear_page" not in held  # a task's comm: the loops' shells or cat
        slots = _churn(vm, rounds)
    finally:
        vm.run("kill $(cat /tmp/kpt-loops); rm -f /tmp/kpt-loops", timeout=30)
    assert resident.nhit > 0
    vm.unregister_kprobe(resident)
    assert len(set(slots)) < len(slots), "freed slots were never reused"
    tasks = channel.quiescence.tasks
    assert tasks is not None and tasks.nscans > 0
    vm.run("cat /proc/version", check=True)
    assert _texts(vm) == before
    assert [ln for ln in vm.serial_log().splitlines() if TROUBLE.search(ln)] == []


def test_rt_kernel_slots_wait_for_tasks_preempted_inside() -> None:
    with boot(kernel_package="linux-image-rt-amd64", name="rtgrace") as vm:
        _run_scenario(vm, "rt", rounds=120)


def test_preempt_full_kernel_slots_wait_for_tasks_preempted_inside() -> None:
    with boot(append="preempt=full", name="fullgrace") as vm:
        _run_scenario(vm, "full", rounds=60)


def test_the_default_kernel_keeps_the_vcpu_rule(vm: VM) -> None:
    """PREEMPT_DYNAMIC in its default voluntary mode: no task scans."""
    rule = _channel(vm).grace_rule
    assert (rule.name, rule.model.name, rule.model.dynamic) == ("vcpus", "voluntary", True)
