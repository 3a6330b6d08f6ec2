"""A vanished int3 on the real guest: the #BP stub tells the host before it re-executes
the address, the host has QEMU translate it anew, and the vCPU goes on where it was.

A vCPU busy in the kernel is made to look as if it had just trapped on an int3 at its
RIP that is gone since (its registers and an exception frame written as the CPU would,
interrupts off as the #BP gate leaves them): the stub's lookup misses, the byte there is
not 0xcc, so it stores to its watched byte and the trap thread retranslates."""

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
KERNEL_BUSY = "dd if=/dev/zero of=/dev/null bs=1 count=3000000 2>/dev/null"


def test_a_vanished_int3_is_retranslated_and_the_vcpu_goes_on(vm: VM) -> None:
    kp = Kprobe(symbol_name="do_sys_openat2")
    vm.register_kprobe(kp)  # the channel goes in with it
    try:
        channel = vm.kprobes.channel
        assert isinstance(channel, WatchpointChannel)
        before = channel.stats.retranslated
        vm.run(f"{KERNEL_BUSY} </dev/null >/dev/null 2>&1 &", check=True)
        try:
            at = _fake_a_vanished_int3(vm, channel)
            deadline = time.monotonic() + 10
            while channel.stats.retranslated == before and time.monotonic() < deadline:
                time.sleep(0.05)
            assert channel.stats.retranslated == before + 1, vm.symbols.describe(at)
        finally:
            vm.run(f"pkill -f '{KERNEL_BUSY.split(' 2>')[0]}' || true")
        assert vm.run("echo alive", timeout=30).stdout == "alive\n"
    finally:
        vm.unregister_kprobe(kp)


def _fake_a_vanished_int3(vm: VM, channel: WatchpointChannel) -> int:
    """Stop the guest until its vCPU runs kernel code of the guest's own, then send it
    into the stub as a #BP at its RIP would have; that RIP."""
    for _ in range(200):
        with vm.target.stopped() as client:
            thread = client.threads()[0]
            regs = client.read_registers(thread=thread)
            rip, rsp = regs["rip"], regs["rsp"]
            if (regs["cs"] & 3 or channel.area.contains(rip) or halted_in_idle(client, rip)
                    or vm.memory.read(rip, 1)[0] == INT3):  # fmt: skip
                continue
            # the CPU aligns the stack, then pushes SS, RSP, RFLAGS, CS and the RIP past
            # the int3 (which re-executes at RIP when the int3 is gone)
            frame = (rsp & ~0xF) - 40
            vm.memory.write(frame, struct.pack("<5Q", rip + 1, regs["cs"], regs["eflags"],
                                               rsp, regs["ss"]))  # fmt: skip
            client.write_registers({"rip": channel.pages.stub, "rsp": frame,
                                    "eflags": regs["eflags"] & ~IF}, thread=thread)  # fmt: skip
            return rip
        time.sleep(0.01)
    raise AssertionError("the guest's vCPU was never seen running kernel code")
