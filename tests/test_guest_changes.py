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

import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kprobevm.errors import KprobeError, VMLost
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.journal import journal_lost, pending_writes
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.kprobes.recover import recover
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events
from kprobevm.x86.ptregs import PtRegs
from tests.conftest import kernel_trouble

pytestmark = pytest.mark.vm

DEADLINE = 10.0
"""Seconds within which a lost guest is reported to every party, and closing ends."""
HIT_DEADLINE = 60.0
"""Seconds the workload gets to reach a probe (a hang guard under TCG)."""
CORE = ("do_sys_openat2", "vfs_read", "ksys_read", "path_openat")
STOP_FILE = "/tmp/kprobevm-changes.stop"
"""The workload loops end when it exists (the guest's busybox has no pkill)."""
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
LOOP = (f"while [ ! -e {STOP_FILE} ]; do cat /proc/version >/dev/null;"
        f" head -c1 /etc/passwd >/dev/null; cat {MOUNT}/status >/dev/null 2>&1; done")
"""Opens, reads (busybox cat sends its file, head reads it) and execs; a status read
once the spare module is mounted."""


def _hit(kp: Kprobe, regs: PtRegs) -> None:
    pass


def _returned(ri: KretprobeInstance, regs: PtRegs) -> None:
    pass


def _reads(kp: Kprobe, regs: PtRegs) -> None:
    """A handler that reads the guest at each hit (registers, the return address)."""
    assert regs.memory is not None
    regs.memory.u64(regs.sp)


@dataclass
class Armed:
    """One of each kind of probe: stopping, recorded, count-only and a return probe."""

    stopping: Kprobe
    recorded: Kprobe
    counted: Kprobe
    ret: Kretprobe
    more: list[Kprobe] = field(default_factory=list)

    @property
    def kprobes(self) -> list[Kprobe]:
        return [self.stopping, self.recorded, self.counted, *self.more]

    def counts(self, vm: VM) -> list[int]:
        """Every probe's hits so far (recorded hits flushed, counters read)."""
        vm.flush_records()
        return [kp.nhit for kp in self.kprobes] + [self.ret.nhit]

    def unregister(self, vm: VM) -> None:
        if self.ret.registered:
            vm.unregister_kretprobe(self.ret)
        for kp in self.kprobes:
            if kp.registered:
                vm.unregister_kprobe(kp)


def arm_core(vm: VM) -> Armed:
    """Probes on the core kernel's busy functions (each hit by the workload)."""
    armed = Armed(
        stopping=Kprobe(symbol_name="do_sys_openat2", pre_handler=_reads),
        recorded=Kprobe(symbol_name="ksys_read", record=RecordSpec(), pre_handler=_hit),
        counted=Kprobe(symbol_name="path_openat"),
        ret=Kretprobe(symbol_name="do_sys_openat2", handler=_returned),
        more=[Kprobe(symbol_name="vfs_read", pre_handler=_hit)],
    )  # fmt: skip
    vm.register_kprobes([armed.stopping, *armed.more])
    vm.register_kprobe(armed.recorded)
    vm.register_kprobe(armed.counted)
    vm.register_kretprobe(armed.ret)
    return armed


def arm_module(vm: VM) -> Armed:
    """Probes in the spare module: every exec stops at load_misc_binary (and its return),
    its fourth instruction records, and a read of the status file is counted."""
    armed = Armed(
        stopping=Kprobe(symbol_name=f"{SPARE}:load_misc_binary", pre_handler=_hit),
        recorded=Kprobe(symbol_name=f"{SPARE}:load_misc_binary", offset=0xB,
                        record=RecordSpec(), pre_handler=_hit),
        counted=Kprobe(symbol_name=f"{SPARE}:bm_status_read"),
        ret=Kretprobe(symbol_name=f"{SPARE}:load_misc_binary", handler=_returned),
    )  # fmt: skip
    vm.register_kprobes([armed.stopping, armed.recorded, armed.counted])
    vm.register_kretprobe(armed.ret)
    return armed


def wait_until(what: str, ready: Callable[[], bool], timeout: float = HIT_DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def wait_all_hit(vm: VM, armed: Armed, since: list[int] | None = None) -> list[int]:
    """Wait until every probe has more hits than ``since`` (or any); its counts then."""
    base = since or [0] * len(armed.counts(vm))
    counts: list[int] = []

    def grown() -> bool:
        counts[:] = armed.counts(vm)
        return all(now > then for now, then in zip(counts, base, strict=True))

    wait_until(f"every probe hit (counts {counts}, before {base})", grown)
    return counts


def core_text(vm: VM) -> dict[str, bytes]:
    """The core kernel's probed functions, byte for byte."""
    return {name: vm.read(vm.symbols[name], vm.symbols.size(name)) for name in CORE}


def start_workload(vm: VM, smp: int) -> None:
    vm.run(f"rm -f {STOP_FILE}; for c in $(seq {smp}); do"
           f" (timeout 600 sh -c '{LOOP}' >/dev/null 2>&1 &); done", check=True)


# -- a guest that goes away ------------------------------------------------------------


class Waiter(threading.Thread):
    """Calls ``step`` again and again until it raises; keeps what and when."""

    def __init__(self, name: str, step: Callable[[], object]) -> None:
        super().__init__(name=f"waiter-{name}", daemon=True)
        self.step = step
        self.raised: BaseException | None = None
        self.at = 0.0

    def run(self) -> None:
        try:
            while True:
                self.step()
                time.sleep(0.02)
        except BaseException as exc:
            self.at = time.monotonic()
            self.raised = exc


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


def _event(text: str) -> ProbeEvent:
    event = parse_event(text)
    assert isinstance(event, ProbeEvent)
    return event


GUEST_ENDS = {
    "reboot -f": ("reboot -f", 2),
    "reboot": ("reboot", 1),
    "panic": ("echo c > /proc/sysrq-trigger", 1),
}
"""How the guest goes away, and on how many vCPUs."""


@pytest.mark.parametrize("how", list(GUEST_ENDS))
def test_a_guest_that_goes_away_is_vm_lost_everywhere_in_seconds(
    how: str, tmp_path: Path, thread_deaths: list[str]
) -> None:
    command, smp = GUEST_ENDS[how]
    with boot(smp=smp, name=f"changes-{how.replace(' ', '')}") as vm:
        vm.journal_path = tmp_path / "session.journal"
        armed = arm_core(vm)
        trace = TraceSession(vm, plan_events(vm, [_event("p:changes/w ksys_write")]))
        trace.start()
        start_workload(vm, smp)
        wait_all_hit(vm, armed)
        address = vm.symbols["do_sys_openat2"]
        waiters = [
            Waiter("tracer", lambda: list(trace.drain())),  # a tracer waiting for hits
            Waiter("borrower", lambda: vm.read(address, 16)),  # holds the VM stopped
            Waiter("counter", lambda: armed.counts(vm)),  # flushes, reads guest counters
        ]
        for w in waiters:
            w.start()

        started = time.monotonic()
        with contextlib.suppress(VMLost):  # SSH goes with the guest (reboot -f, panic)
            vm.run(command, timeout=3 * DEADLINE)
        machine = vm.machine
        assert machine is not None
        wait_until("QEMU exited", lambda: not machine.alive(), 3 * DEADLINE)
        exited = time.monotonic()

        for w in waiters:
            w.join(DEADLINE)
            assert not w.is_alive(), f"{w.name} still waiting {DEADLINE:g} s after QEMU exited"
            assert isinstance(w.raised, VMLost), (w.name, repr(w.raised))
            assert w.at - exited < DEADLINE, (w.name, w.at - exited)
        t0 = time.monotonic()
        with pytest.raises(VMLost) as next_call:
            vm.register_kprobe(Kprobe(symbol_name="vfs_write", pre_handler=_hit))
        with pytest.raises(VMLost):
            vm.run("true")
        assert time.monotonic() - t0 < DEADLINE
        lost = next_call.value
        assert lost.exitcode == 0 and lost.qemu_exited and vm.lost is not None
        assert lost.serial_log and "QEMU exit status: 0" in str(lost)

        log = vm.serial_log()  # before close() removes it
        t0 = time.monotonic()
        vm.close()
        closing = time.monotonic() - t0
    assert closing < DEADLINE, closing
    assert time.monotonic() - started < 3 * DEADLINE + HIT_DEADLINE

    # our int3 never trapped unhandled; only the panic we asked for, if any
    trouble = kernel_trouble(log)
    assert not [line for line in trouble if "int3:" in line], trouble
    if how == "panic":  # the one we asked for: its lines say panic, nothing else does
        assert lost.guest_said == "Kernel panic - not syncing: sysrq triggered crash"
        assert log.count("Kernel panic") == 1, trouble
        trouble = [line for line in trouble if not re.search(r"\bpanic\b", line)]
    else:
        assert lost.guest_said == "reboot: Restarting system"
    assert not trouble, trouble
    assert not thread_deaths, thread_deaths
    assert not any(kp.registered for kp in armed.kprobes)
    # a handler whose read found the guest gone did not fail: the guest did
    assert not any(kp.nerrors for kp in armed.kprobes) and not armed.ret.nerrors
    # the writes went with the guest: the journal is settled and says why
    assert pending_writes(vm.journal_path) == [] and journal_lost(vm.journal_path)
    report = recover(vm.journal_path)
    assert report.ok and not report.restored and "guest is gone" in report.summary()


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
    assert "guest kernel: Kernel panic - not syncing: sysrq triggered crash" in proc.stderr
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
    assert not any(kp.nerrors for kp in armed.kprobes) and not armed.ret.nerrors


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
            module = arm_module(vm)
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
    assert not any(kp.nerrors for kp in core.kprobes) and not core.ret.nerrors
