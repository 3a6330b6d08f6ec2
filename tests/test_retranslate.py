"""A vanished int3 on the real guest: the #BP stub tells the host before it re-executes
the address, the host has QEMU translate it anew, and the vCPU goes on where it was.

A vCPU busy in the kernel is made to look as if it had just trapped on an int3 at its
RIP that is gone since (its registers and an exception frame written as the CPU would,
interrupts off as the #BP gate leaves them): the stub's lookup misses, the byte there is
not 0xcc, so it stores to its watched byte and the trap thread retranslates.

Then the failure itself: a probe's int3, run and so translated by QEMU, is taken out of
memory behind TCG's back (through shared guest RAM, which TCG does not watch for code
writes) and out of the stub's table. QEMU keeps running its translation with the int3;
without the retranslation every later call would trap and be sent back for ever."""

from __future__ import annotations

import struct
import time

import pytest

from kprobevm.gdbstub.target import halted_in_idle
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.trap.watchpoint import WatchpointChannel
from kprobevm.x86.asm import INT3

pytestmark = pytest.mark.vm

IF = 0x200
READS = "dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null"
KERNEL_BUSY = "dd if=/dev/zero of=/dev/null bs=64k count=200000"


def test_a_vanished_int3_is_retranslated_and_the_vcpu_goes_on(vm: VM) -> None:
    kp = Kprobe(symbol_name="do_sys_openat2")
    vm.register_kprobe(kp)  # the channel goes in with it
    try:
        channel = vm.kprobes.channel
        assert isinstance(channel, WatchpointChannel)
        before = channel.stats.retranslated
        vm.run(f"{KERNEL_BUSY} </dev/null >/dev/null 2>&1 & echo $! > /tmp/busy.pid",
               check=True)  # fmt: skip
        try:
            at = _fake_a_vanished_int3(vm, channel)
            deadline = time.monotonic() + 10
            while channel.stats.retranslated == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert channel.stats.retranslated == before + 1, vm.symbols.describe(at)
        finally:
            vm.run("kill $(cat /tmp/busy.pid) 2>/dev/null; rm -f /tmp/busy.pid", check=True)
        assert vm.run("echo alive", timeout=30).stdout == "alive\n"
    finally:
        vm.unregister_kprobe(kp)


def test_a_translation_that_kept_a_removed_int3_is_dropped(vm: VM) -> None:
    kp = Kprobe(symbol_name="vfs_read")
    vm.register_kprobe(kp)
    channel = vm.kprobes.channel
    assert isinstance(channel, WatchpointChannel)
    site = vm.kprobes.site_of(kp)
    original = site.insn.bytes[:1]
    direct = vm.memory.direct
    assert direct is not None, "the session guest shares its RAM with the host"
    try:
        vm.run(READS.format(n=50), check=True)  # QEMU translates the int3
        assert kp.nhit >= 50
        before, hits = channel.stats.retranslated, kp.nhit
        with vm.target.stopped():
            channel.table.remove(site.addr)
            assert direct.write_data(site.addr, original)  # no code write TCG sees
        vm.run(READS.format(n=50), check=True, timeout=30)
        assert channel.stats.retranslated == before + 1 and kp.nhit == hits
    finally:
        with vm.target.stopped():  # the probe as it was, then taken out the usual way
            vm.memory.write(site.addr, bytes((INT3,)))
            channel.table.insert(site.addr, channel._slot(site).address)
        vm.unregister_kprobe(kp)


def _fake_a_vanished_int3(vm: VM, channel: WatchpointChannel) -> int:
    """Stop the guest until its vCPU runs kernel code of the guest's own, then send it
    into the stub as a #BP at its RIP would have; that RIP."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with vm.target.stopped() as client:
            thread = client.threads()[0]
            regs = client.read_registers(thread=thread)
            rip, rsp = regs["rip"], regs["rsp"]
            usable = not (regs["cs"] & 3 or channel.area.contains(rip)
                          or halted_in_idle(client, rip) or vm.memory.read(rip, 1)[0] == INT3)
            if usable:
                # the CPU aligns the stack, then pushes SS, RSP, RFLAGS, CS and the RIP
                # past the int3 (which re-executes at RIP when the int3 is gone)
                frame = (rsp & ~0xF) - 40
                vm.memory.write(frame, struct.pack("<5Q", rip + 1, regs["cs"], regs["eflags"],
                                                   rsp, regs["ss"]))  # fmt: skip
                client.write_registers({"rip": channel.pages.stub, "rsp": frame,
                                        "eflags": regs["eflags"] & ~IF}, thread=thread)  # fmt: skip
                return rip
        time.sleep(0.01)
    raise AssertionError("the guest's vCPU was never seen running kernel code")
