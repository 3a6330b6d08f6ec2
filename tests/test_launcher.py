"""The launcher and the guest shell against real QEMU guests (marked vm), plus the pieces
that need no guest."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kprobevm.errors import (
    GuestCommandError,
    GuestCommandTimeout,
    GuestNotReady,
    KprobeVMError,
    QEMUNotFound,
    VMLaunchFailure,
)
from kprobevm.guest.image import SLOT_RESERVE, default_image
from kprobevm.guest.launcher import QemuMachine, boot, kernel_cmdline
from kprobevm.guest.vm import VM
from tests.conftest import session_qemus, wait_no_qemu


def test_kernel_cmdline_kaslr_drops_nokaslr_and_append_comes_last() -> None:
    base = "console=ttyS0 nokaslr nopti"
    assert kernel_cmdline(base) == base
    assert kernel_cmdline(base, kaslr=True, append="loglevel=7 foo") == (
        "console=ttyS0 nopti loglevel=7 foo"
    )


def test_missing_qemu_binary_is_qemu_not_found() -> None:
    started = time.monotonic()
    with pytest.raises(QEMUNotFound) as info:
        boot(qemu="/nonexistent/qemu-system-x86_64", timeout=5)
    assert isinstance(info.value, VMLaunchFailure) and isinstance(info.value, KprobeVMError)
    assert "/nonexistent/qemu-system-x86_64" in str(info.value)
    assert time.monotonic() - started < 5


def test_qemu_from_the_environment_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPROBEVM_QEMU", "/nonexistent/env-qemu")
    with pytest.raises(QEMUNotFound) as info:
        boot(timeout=5)
    assert "'/nonexistent/env-qemu' (from $KPROBEVM_QEMU) not found" in str(info.value)
    with pytest.raises(QEMUNotFound) as info:
        boot(qemu="/nonexistent/explicit", timeout=5)  # an explicit QEMU wins
    assert "/nonexistent/explicit" in str(info.value) and "KPROBEVM_QEMU" not in str(info.value)


# -- with real guests ---------------------------------------------------------------------------


@pytest.mark.vm
def test_guest_runs_the_manifest_kernel_with_the_slot_reserve(vm: VM) -> None:
    image = default_image()
    assert vm.run("uname -r", check=True).stdout.strip() == image.kernel_release
    cmdline = vm.read_file("/proc/cmdline").split()
    start, size = SLOT_RESERVE
    assert f"memmap={size >> 20}M${start:#x}" in cmdline
    assert "nokaslr" in cmdline
    assert vm.kernel_cmdline is not None and vm.kernel_cmdline.split() == cmdline
    # The guest kernel does not use the range: /proc/iomem shows it reserved, not RAM...
    iomem = vm.run("cat /proc/iomem", check=True).stdout.lower()
    assert f"{start:08x}-{start + size - 1:08x} : reserved" in iomem
    # ...and it was plain RAM before memmap= took it: the firmware's e820 map gave the
    # whole range as usable (no ACPI tables or BIOS data inside the slot pages).
    e820 = vm.run("dmesg | grep 'BIOS-e820:.*usable'", check=True).stdout
    usable = [tuple(int(x, 16) for x in line.split("[mem ")[1].split("]")[0].split("-"))
              for line in e820.splitlines()]
    assert any(lo <= start and start + size - 1 <= hi for lo, hi in usable), e820


@pytest.mark.vm
def test_tracefs_and_debugfs_are_mounted(vm: VM) -> None:
    mounts = {f[1]: f[2] for f in map(str.split, vm.read_file("/proc/mounts").splitlines())}
    assert mounts.get("/sys/kernel/tracing") == "tracefs"
    assert mounts.get("/sys/kernel/debug") == "debugfs"
    assert "kprobe_events" in vm.run("ls /sys/kernel/tracing", check=True).stdout


@pytest.mark.vm
def test_run_separates_stdout_stderr_and_status(vm: VM) -> None:
    result = vm.run("echo out; echo err >&2; exit 7")
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 7)
    with pytest.raises(GuestCommandError) as info:
        vm.run("echo nope >&2; exit 3", check=True)
    assert info.value.returncode == 3 and info.value.stderr == "nope\n"


@pytest.mark.vm
def test_large_output_and_read_file(vm: VM) -> None:
    big = vm.run("head -c 3000000 /dev/zero | tr '\\0' a; echo; head -c 100000 /dev/zero >&2",
                 check=True)
    assert len(big.stdout) == 3000001 and set(big.stdout.strip()) == {"a"}
    assert len(big.stderr) == 100000
    kallsyms = vm.read_file("/proc/kallsyms")
    assert len(kallsyms.splitlines()) > 50_000
    assert " T _text\n" in kallsyms or " T _stext\n" in kallsyms
    with pytest.raises(GuestCommandError):
        vm.read_file("/no/such/file")


@pytest.mark.vm
def test_a_command_timeout_raises_and_the_shell_stays_usable(vm: VM) -> None:
    started = time.monotonic()
    with pytest.raises(GuestCommandTimeout):
        vm.run("sleep 30", timeout=1.0)
    assert time.monotonic() - started < 5
    assert vm.run("echo still here").stdout == "still here\n"
    vm.run("pkill -f 'sleep 30' || true")


@pytest.mark.vm
def test_endpoints_live_in_a_private_directory_and_qmp_answers(vm: VM) -> None:
    machine = vm.machine
    assert isinstance(machine, QemuMachine)
    assert stat.S_IMODE(machine.private_dir.stat().st_mode) == 0o700
    gdb = vm.endpoints.gdb
    assert isinstance(gdb, str) and Path(gdb).parent == machine.private_dir
    assert stat.S_ISSOCK(Path(gdb).stat().st_mode)
    assert vm.endpoints.ssh is not None and vm.endpoints.ssh[0] == "127.0.0.1"
    assert machine.status() == "running"
    assert "-nodefaults" in machine.command and "-no-reboot" in machine.command
    assert "READY" in vm.serial_log()


@pytest.mark.vm
def test_two_vms_at_once_do_not_collide(vm: VM) -> None:
    """A second guest (KASLR on, 2 vCPUs) next to the session one: own port, own sockets."""
    with boot(name="second", kaslr=True, smp=2) as other:
        assert other.endpoints.ssh != vm.endpoints.ssh
        assert other.endpoints.gdb != vm.endpoints.gdb
        assert other.endpoints.qmp != vm.endpoints.qmp
        assert other.run("nproc", check=True).stdout.strip() == "2"
        assert "nokaslr" not in other.read_file("/proc/cmdline").split()
        assert vm.run("nproc", check=True).stdout.strip() == "1"
        assert isinstance(other.machine, QemuMachine)
        private = other.machine.private_dir
        pid = other.machine.pid
    assert not private.exists()
    assert pid not in session_qemus()


@pytest.mark.vm
def test_a_missing_kernel_file_fails_before_starting_qemu(tmp_path: Path) -> None:
    before = session_qemus()
    with pytest.raises(VMLaunchFailure, match="does not exist") as info:
        boot(kernel=tmp_path / "no-such-bzImage", timeout=10)
    assert str(tmp_path / "no-such-bzImage") in " ".join(info.value.command)
    assert not wait_no_qemu(timeout=1, keep=before)


@pytest.mark.vm
def test_init_that_exits_fails_with_the_panic_in_the_log_tail() -> None:
    """rdinit (not init: that one is ignored with an initramfs) /bin/false: init exits, the
    kernel panics, -no-reboot makes QEMU exit; the error says so long before the timeout."""
    before = session_qemus()
    started = time.monotonic()
    with pytest.raises(VMLaunchFailure) as info:
        boot(append="rdinit=/bin/false", timeout=40)
    assert not isinstance(info.value, GuestNotReady)
    assert time.monotonic() - started < 40
    assert info.value.exitcode is not None
    assert "Attempted to kill init" in info.value.serial_log
    assert "-append" in info.value.command
    assert not wait_no_qemu(timeout=2, keep=before)


@pytest.mark.vm
def test_a_guest_that_never_answers_is_guest_not_ready_within_the_timeout() -> None:
    """rdinit=/bin/sh: a shell on the console waits for input forever, SSH never comes up."""
    before = session_qemus()
    started = time.monotonic()
    with pytest.raises(GuestNotReady) as info:
        boot(append="rdinit=/bin/sh", timeout=8)
    assert time.monotonic() - started < 8 + 5
    assert info.value.exitcode is None  # QEMU was still running: we stopped it
    assert "-append" in info.value.command
    assert not wait_no_qemu(timeout=2, keep=before)


CHILD = """
import sys, time
from kprobevm.guest.launcher import boot
vm = boot(name="orphan")
print(vm.machine.pid, vm.machine.private_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.vm
def test_qemu_dies_when_the_python_that_booted_it_is_killed() -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env=os.environ.copy())
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, "the child did not boot a guest"
        pid = int(line.split()[0])
        assert pid in session_qemus()
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.monotonic() + 5
        while pid in session_qemus() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid not in session_qemus(), "QEMU outlived the process that started it"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_boot_stalled_under_tcg_is_tried_once_more(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The retry policy alone (no guest): a TCG boot whose kernel said it stalled is
    booted again once, said as a warning; a second stall, or any other failure, raises."""
    from kprobevm.guest import launcher

    stall = "[   31.2] watchdog: BUG: soft lockup - CPU#2 stuck for 22s! [swapper/2:0]\n"
    outcomes: list[BaseException | str] = []

    def fake_launch(qemu: str, spec: object, *, name: str, accel: str,
                    timeout: float) -> object:  # fmt: skip
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(launcher, "_launch", fake_launch)
    spec = object()
    outcomes[:] = [GuestNotReady("no SSH", serial_log=stall), "booted"]
    assert launcher._launch_trying("qemu", spec, "tcg", name="g", timeout=1) == "booted"  # type: ignore[arg-type,comparison-overlap]
    assert "boot stalled under TCG" in caplog.text and "soft lockup" in caplog.text
    outcomes[:] = [GuestNotReady("no SSH", serial_log=stall)] * 2 + ["never"]
    with pytest.raises(GuestNotReady):
        launcher._launch_trying("qemu", spec, "tcg", name="g", timeout=1)  # type: ignore[arg-type]
    outcomes[:] = [GuestNotReady("no SSH", serial_log="Kernel panic - not syncing\n"), "never"]
    with pytest.raises(GuestNotReady):
        launcher._launch_trying("qemu", spec, "tcg", name="g", timeout=1)  # type: ignore[arg-type]
