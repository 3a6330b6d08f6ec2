"""The guest changes under armed probes: a reboot, a panic, modules coming and going.

With stopping, recorded and count-only probes and a return probe armed on busy
functions and a workload running: a guest reboot or panic (QEMU exits: ``-no-reboot``,
``panic=-1``) ends in :class:`VMLost` carrying QEMU's exit status and the serial log,
for a thread waiting for hits, a thread borrowing the VM and the next call alike, and
closing lets go in seconds. A module unloaded under its probes gets them out of the
guest first (``[GONE]``, still registered, as in the kernel), and modules coming and
going leave the core kernel's probes working and its text as found.

The deadlines turn a hang into a failure; they are not measurements.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.bench.lost import (
    ASKED_PANIC,
    CORE,
    HOW,
    STOP_FILE,
    How,
    arm_core,
    arm_module,
    run_round,
    start_workload,
    wait_all_hit,
)
from kprobevm.errors import KprobeError
from kprobevm.guest.vm import VM
from kprobevm.kprobes.journal import pending_writes

pytestmark = pytest.mark.vm

DEADLINE = 10.0
"""Seconds within which a lost guest is reported to every party, and closing ends."""
SPARE = "binfmt_misc"
"""A module the image carries unloaded: once loaded, every exec runs its
load_misc_binary, and reading its mount's status file runs bm_status_read."""
MOUNT = "/proc/sys/fs/binfmt_misc"
INSMOD = f"insmod /lib/modules/{SPARE}.ko && mount -t binfmt_misc none {MOUNT}"
RMMOD = (f"for i in $(seq 100); do grep -q ' {MOUNT} ' /proc/mounts || break;"
         f" umount {MOUNT} 2>/dev/null || sleep 0.05; done;"
         f" for i in $(seq 100); do grep -q '^{SPARE} ' /proc/modules || break;"
         f" rmmod {SPARE} 2>/dev/null || sleep 0.05; done; ! grep -q '^{SPARE} ' /proc/modules")
"""Unmount and unload, again while the workload's reads and execs hold them busy."""


def core_text(vm: VM) -> dict[str, bytes]:
    """The core kernel's probed functions, byte for byte."""
    return {name: vm.read(vm.symbols[name], vm.symbols.size(name)) for name in CORE}


# -- a guest that goes away ------------------------------------------------------------


@pytest.fixture
def thread_deaths() -> Iterator[list[str]]:
    """Exceptions that ended a thread (the engine's included) during the test."""
    deaths: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        deaths.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}")

    threading.excepthook = hook
    yield deaths
    threading.excepthook = previous


@pytest.mark.parametrize(("how", "smp"), [("reboot -f", 2), ("reboot", 1), ("panic", 1)])
def test_a_guest_that_goes_away_is_vm_lost_everywhere_in_seconds(
    how: How, smp: int, tmp_path: Path, thread_deaths: list[str]
) -> None:
    assert how in HOW
    r = run_round(how, smp, tmp_path / "session.journal", deadline=DEADLINE)
    # a tracer waiting for hits, a borrower and a counter, then the next calls
    for _, what, seconds in r.heard + r.next_call:
        assert what == "VMLost" and seconds < DEADLINE, r
    assert r.exitcode == 0, r
    assert r.guest_said == (ASKED_PANIC if how == "panic" else "reboot: Restarting system"), r
    assert not r.close_raised and r.close_seconds < DEADLINE, r
    assert not r.int3_oops and not r.trouble, r  # the panic asked for aside
    assert not thread_deaths, thread_deaths
    # a handler whose read found the guest gone did not fail: the guest did
    assert not r.handler_errors and not r.left_registered, r
    # the writes went with the guest: the journal is settled, says why, and recover too
    assert not r.journal_pending and r.journal_lost, r
    assert "guest is gone" in r.recover_summary, r
    assert r.ok


def test_trace_on_a_guest_that_panics_exits_2_with_the_facts() -> None:
    """The command line: a guest panic mid-trace ends ``kprobevm trace`` with exit 2 and
    VMLost's facts on stderr, not a traceback nor a wait for the duration."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kprobevm.cli", "trace", "--boot", "--duration", "300",
         "p:changes/o do_sys_openat2", "p:changes/r vfs_read",
         "--", "sleep 1; echo c > /proc/sysrq-trigger; sleep 300"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "QEMU exit status: 0" in proc.stderr
    assert f"guest kernel: {ASKED_PANIC}" in proc.stderr
    assert time.monotonic() - started < 120


# -- modules coming and going ----------------------------------------------------------


@pytest.fixture
def busy_guest(vm: VM) -> Iterator[VM]:
    """The shared guest running the workload (execs, opens, reads); afterwards no probe,
    no workload and no spare module is left."""
    vm.run(f"{RMMOD}; true")
    start_workload(vm, 1)
    try:
        yield vm
    finally:
        leftover = vm.list_kprobes()
        vm.kprobes.unregister_all()
        vm.run(f"touch {STOP_FILE}; sleep 1; {RMMOD}; true")
        assert not leftover, f"the test left probes registered:\n{leftover}"


def test_modules_coming_and_going_leave_armed_core_probes_working(busy_guest: VM) -> None:
    vm = busy_guest
    before = core_text(vm)
    armed = arm_core(vm)
    try:
        counts = wait_all_hit(vm, armed)
        for _ in range(3):
            vm.run(f"{INSMOD} && cat {MOUNT}/status && {{ {RMMOD}; }}", check=True)
            counts = wait_all_hit(vm, armed, counts)
        assert vm.kprobes.modules.probe is None and vm.kprobes.modules.unloads == 0
    finally:
        armed.unregister(vm)
    assert core_text(vm) == before
    assert not armed.errors()


MODULE_FUNCTIONS = (f"{SPARE}:load_misc_binary", f"{SPARE}:bm_status_read")


def _function(vm: VM, name: str) -> tuple[int, bytes]:
    """Where a function of a loaded module is, and its bytes."""
    sym = vm.symbols.symbol(name)
    return sym.address, vm.read(sym.address, sym.size)


def test_a_module_unloaded_under_armed_probes_takes_them_out_first(busy_guest: VM) -> None:
    """Twice: the module's probes (stopping, recorded, counted, return) are taken out
    before its memory is freed, marked gone and kept registered, with their hits; core
    probes go on; loaded again, the module runs, and new probes in it hit."""
    vm = busy_guest
    before = core_text(vm)
    core = arm_core(vm)
    try:
        counts = wait_all_hit(vm, core)
        for round_ in (1, 2):
            vm.run(INSMOD, check=True)
            vm.refresh_symbols()
            pristine = {name: _function(vm, name) for name in MODULE_FUNCTIONS}
            module = arm_module(vm, SPARE)
            wait_all_hit(vm, module)
            addrs = [kp.addr for kp in module.kprobes]
            journal = vm.journal_path
            assert journal is not None

            vm.run(RMMOD, check=True)  # the workload keeps exec'ing and reading meanwhile
            assert vm.kprobes.modules.unloads == round_
            kps = [*module.kprobes, module.ret.kp]
            assert all(kp is not None and kp.gone and kp.registered for kp in kps)
            assert module.ret.gone and module.ret.registered
            assert [kp.addr for kp in module.kprobes] == addrs  # as the kernel keeps them
            assert not any(a in vm.kprobes.table for a in addrs)
            assert vm.list_kprobes().count("[GONE]") == len(kps)
            assert f"{SPARE}:load_misc_binary" not in vm.symbols
            # every int3 in the module came out while its text was still there
            assert not any(e.address in addrs for e in pending_writes(journal))
            hits = module.counts(vm)  # the hits recorded and counted so far stay
            assert all(n >= 1 for n in hits), hits
            with pytest.raises(KprobeError, match="gone"):
                vm.enable_kprobe(module.stopping)
            counts = wait_all_hit(vm, core, counts)  # the core kernel's probes go on

            vm.run(f"{INSMOD} && cat {MOUNT}/status", check=True)  # it runs, loaded again
            module.unregister(vm)  # gone probes leave as any other
            assert not vm.kprobes.gone and vm.kprobes.modules.probe is None
            assert all(not kp.registered for kp in module.kprobes)
            vm.refresh_symbols()
            for name, (address, text) in pristine.items():
                again = _function(vm, name)
                if again[0] == address:  # at the same place: nothing of ours written there
                    assert again[1] == text, name
            vm.run(RMMOD, check=True)
    finally:
        core.unregister(vm)
    assert core_text(vm) == before
    assert not core.errors() and not module.errors()
