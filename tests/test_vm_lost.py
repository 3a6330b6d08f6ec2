"""VMLost's facts, without a guest: what it says, and what a copy for another thread keeps."""

from __future__ import annotations

from kprobevm.errors import GdbConnectionClosed, VMLost
from kprobevm.guest.vm import last_words

PANIC_LOG = """\
[    2.79] sysrq: Trigger a crash
[    2.79] Kernel panic - not syncing: sysrq triggered crash
[    2.79] CPU: 1 PID: 113 Comm: sh Not tainted 6.1.0-57-cloud-amd64 #1
[    2.79] Call Trace:
""" + "[    2.79]  ? do_fault+0x1a7/0x410\n" * 40 + "[    2.79] Kernel Offset: disabled\n"


def test_last_words_name_the_panic_even_when_its_trace_pushed_it_out_of_the_tail() -> None:
    assert last_words(PANIC_LOG) == "Kernel panic - not syncing: sysrq triggered crash"
    assert last_words("[ 4.6] reboot: Restarting system\n") == "reboot: Restarting system"
    assert last_words("console=ttyS0 panic=-1 oops=panic\nKPROBEVM-READY\n") == ""


def test_vm_lost_says_its_facts_and_a_copy_keeps_them() -> None:
    cause = GdbConnectionClosed("the stub closed the connection")
    lost = VMLost("vm1: the guest exited (W00, status 0)", exitcode=0,
                  guest_said=last_words(PANIC_LOG), serial_log=PANIC_LOG)
    lost.__cause__ = cause
    text = str(lost)
    assert "QEMU exit status: 0" in text and "guest kernel: Kernel panic" in text
    assert text.endswith("Kernel Offset: disabled")  # the serial log's tail
    assert lost.qemu_exited  # an exit status is an exit
    again = lost.again()
    assert again is not lost and str(again) == text and again.__cause__ is cause
    assert (again.exitcode, again.guest_said, again.reason) == (0, lost.guest_said, lost.reason)
    assert not VMLost("vm1: SSH: gone").qemu_exited
