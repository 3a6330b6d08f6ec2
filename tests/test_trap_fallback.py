"""A guest with no memory reserved for slots still gets probes: on the breakpoint channel,
said on stderr and visible from Python, and the text and IDT are left as they were."""

from __future__ import annotations

import logging
import re

import pytest

import kprobevm
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.vm import attach
from kprobevm.kprobes.core import Kprobe


@pytest.mark.vm
def test_no_slot_memory_falls_back_to_the_breakpoint_channel_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with kprobevm.boot(name="fallback") as booted:
        assert booted.kernel_cmdline is not None and "memmap=" in booted.kernel_cmdline
        assert booted.endpoints.gdb is not None
        # The same guest as a user's QEMU without memmap= would be: nothing reserved.
        cmdline = re.sub(r"\s*memmap=\S+", "", booted.kernel_cmdline)
        vm = attach(booted.endpoints.gdb, ssh=booted.endpoints.ssh,
                    ssh_key=booted.endpoints.ssh_key, kernel_cmdline=cmdline, name="no-slots")
        func = vm.symbols.symbol("do_sys_openat2")
        text = vm.read(func.address, func.size)
        gate = vm.read(vm.symbols["idt_table"] + 48, 16)
        kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
        with vm, caplog.at_level(logging.WARNING):
            vm.register_kprobe(kp)
            assert vm.trap_channel == "breakpoint"
            assert vm.trap_fallback is not None and "reserved memory" in vm.trap_fallback
            assert any("fast trap channel unavailable" in r.getMessage()
                       for r in caplog.records)  # fmt: skip
            vm.run("cat /proc/version >/dev/null", check=True)
            vm.unregister_kprobe(kp)
            assert kp.nhit >= 1
            assert vm.read(func.address, func.size) == text
            assert vm.read(vm.symbols["idt_table"] + 48, 16) == gate
        assert not kernel_trouble(booted.serial_log())
