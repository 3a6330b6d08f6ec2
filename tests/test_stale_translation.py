"""An int3 QEMU still runs after memory lost it: the #BP stub has it translated anew.

Under TCG a vCPU can keep running a translation of an int3 that is gone from memory
(with 2 vCPUs, when one translates the code while the other patches it; seen with the
guest's own static keys). The stub, finding no int3 at the trap's address, stores the
byte back as it is, which makes QEMU drop the translation, and counts the trap.

The test makes such a translation on purpose: a probe's int3, run and so translated, is
taken out of memory behind TCG's back (through shared guest RAM, whose writes TCG does
not watch for code) and out of the stub's table. Without the stub's store every later
call would trap on it again, and be sent back to it, until something else dropped it.
"""

from __future__ import annotations

import pytest

from kprobevm import Kprobe
from kprobevm.guest.vm import VM
from kprobevm.trap.watchpoint import WatchpointChannel
from kprobevm.x86.asm import INT3

pytestmark = pytest.mark.vm

READS = "dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null"


def test_an_int3_left_in_a_translation_is_translated_anew(vm: VM) -> None:
    optimizer = vm.kprobes.optimizer
    jumps = optimizer.enabled
    optimizer.enabled = False  # the probe keeps its int3
    try:
        _translate_a_gone_int3(vm)
    finally:
        optimizer.enabled = jumps


def _translate_a_gone_int3(vm: VM) -> None:
    kp = Kprobe(symbol_name="vfs_read")
    vm.register_kprobe(kp)
    channel = vm.kprobes.channel
    assert isinstance(channel, WatchpointChannel)
    site = vm.kprobes.site_of(kp)
    assert site.slot is not None and not site.optimized
    direct = vm.memory.direct
    assert direct is not None, "the session guest shares its RAM with the host"
    try:
        vm.run(READS.format(n=50), check=True)  # QEMU translates the int3
        assert kp.nhit >= 50
        before = channel.vanished_int3s()
        with vm.target.stopped() as client:
            vcpus = len(client.threads())
            channel.table.remove(site.addr)
            assert direct.write_data(site.addr, site.insn.bytes[:1])  # no code write TCG sees
        vm.run(READS.format(n=200), check=True, timeout=30)
        # one trap per vCPU at most: the first that runs the stale translation drops it
        # (without the stub's store: one per call, some 230)
        assert 1 <= channel.vanished_int3s() - before <= vcpus
    finally:
        with vm.target.stopped():  # the probe as it was, then taken out the usual way
            vm.memory.write(site.addr, bytes((INT3,)))
            channel.table.insert(site.addr, site.slot.address)
        vm.unregister_kprobe(kp)
