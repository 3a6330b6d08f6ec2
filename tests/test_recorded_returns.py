"""Recorded return probes on the shared guest: the guest hijacks each call at the entry
and records its return, with no VM stop; the handler sees what a stopping return probe
sees (the caller, the return value), every call is accounted for, and the guest stays
healthy (the fixtures check its text and console after each test)."""

from __future__ import annotations

import time

import pytest

from kprobevm.guest.vm import VM
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.recorder import RecordedRegs, RecordSpec
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.record import Capture

pytestmark = pytest.mark.vm

OPENS = "cat /etc/passwd /nonexistent >/dev/null 2>&1; true"


def _s64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def _returns(vm: VM, rp: Kretprobe, command: str) -> list[tuple[str, int, str]]:
    """(comm, return value, caller) of each return of ``rp`` while ``command`` runs."""
    seen: list[tuple[str, int, str]] = []

    def handler(ri: KretprobeInstance, regs: PtRegs) -> None:
        comm = regs.record.comm if isinstance(regs, RecordedRegs) else ""
        seen.append((comm, _s64(regs.ax), vm.symbols.describe(ri.ret_addr)))

    rp.handler = handler
    vm.register_kretprobe(rp)
    try:
        vm.run(command, check=True)
        vm.flush_records()
    finally:
        vm.unregister_kretprobe(rp)
    return seen


def _settle(vm: VM) -> None:
    deadline = time.monotonic() + 30.0
    while vm.kprobes.channel.records_settling() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not vm.kprobes.channel.records_settling()


def test_a_recorded_return_sees_what_a_stopping_one_sees(vm: VM) -> None:
    stopping = _returns(vm, Kretprobe(symbol_name="do_sys_openat2"), OPENS)
    rp = Kretprobe(symbol_name="do_sys_openat2", record=RecordSpec())
    recorded = _returns(vm, rp, OPENS)
    cat = [(ret, caller) for comm, ret, caller in recorded if comm == "cat"]
    assert (-2, cat[-1][1]) in cat  # /nonexistent: ENOENT, to the same caller
    assert any(ret >= 0 for ret, _ in cat)
    callers = {caller for _, _, caller in stopping}
    assert {caller for _, caller in cat} <= callers, (cat, callers)
    _settle(vm)
    kp = rp.recorded
    assert kp is not None and kp.guest_hits > 0
    assert kp.nhit + kp.nmissed == kp.guest_hits
    assert rp.nhit == kp.nhit == len(recorded)


def test_recorded_returns_do_not_stop_the_vm(vm: VM) -> None:
    """Thousands of returns of vfs_read with a capture at the return: no VM stop but the
    ring's own (the host keeps up), no miss, and every return handled."""
    seen: list[int] = []
    rp = Kretprobe(
        symbol_name="vfs_read",
        handler=lambda ri, regs: seen.append(regs.ax),
        record=RecordSpec(captures=(Capture(offset=0, size=8, reg="sp"),)),
    )
    vm.register_kretprobe(rp)
    channel = vm.kprobes.channel
    try:
        vm.kprobes.optimizer.settle()  # jumps in first: the optimizer's looks stop the guest
        with vm.target.stopped():
            stops, asked = vm.target.stops, channel.stats.ring_stops
        vm.run("i=0; while [ $i -lt 2000 ]; do read x </etc/passwd; i=$((i+1)); done",
               check=True, timeout=120)  # fmt: skip
        with vm.target.stopped():
            stops, asked = vm.target.stops - stops, channel.stats.ring_stops - asked
        assert stops - 1 == asked  # the read of the counts is the only stop of ours
        vm.flush_records()
        assert len(seen) >= 2000 and 1 in seen  # `read` reads a byte at a time
    finally:
        vm.unregister_kretprobe(rp)
    _settle(vm)
    kp = rp.recorded
    assert kp is not None and kp.nmissed == 0
    assert kp.nhit + kp.nmissed == kp.guest_hits == len(seen)


def test_maxactive_bounds_the_calls_in_flight(vm: VM) -> None:
    """Readers blocked in a pipe's read hold their instances: past maxactive a call is
    missed, not hijacked, and the blocked calls still return (through no program once
    the probe is gone) when the pipes close."""
    rp = Kretprobe(symbol_name="pipe_read", maxactive=2, record=RecordSpec())
    seen: list[int] = []
    rp.handler = lambda ri, regs: seen.append(regs.ax)
    vm.register_kretprobe(rp)
    try:
        vm.run("rm -f /tmp/rr.stop; for i in 1 2 3 4; do (sleep 2 | cat >/dev/null &); done",
               check=True)  # fmt: skip
        time.sleep(0.5)
        vm.flush_records()
        kp = rp.recorded
        assert kp is not None
        assert kp.nmissed >= 2  # four readers blocked at once, two instances
    finally:
        vm.unregister_kretprobe(rp)
    time.sleep(2.5)  # the sleeps end: the blocked reads return, the instances' program gone
    assert vm.run("echo ok").stdout.strip() == "ok"
    _settle(vm)
    assert kp.nhit + kp.nmissed == kp.guest_hits
