"""A guest that goes away under a busy, probed session: ``reboot -f``, ``reboot``, a panic.

Each round boots a guest, arms one probe of each kind on hot functions (stopping, one
whose handler reads the guest, recorded, count-only, a return probe, a trace event),
runs a workload on every vCPU and three threads that keep using the session (a tracer
draining hits, a borrower reading guest memory, a counter flushing records and reading
guest counters), then ends the guest from inside. QEMU exits (``-no-reboot``,
``panic=-1``); the round times how soon after each party hears of it, what the next
call raises and how long close() takes, and keeps what the console and the journal
say. ``scripts/guest-lost`` prints the times of many rounds; the tests assert on one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kprobevm.errors import VMLost
from kprobevm.guest.console import kernel_trouble
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.journal import journal_lost, pending_writes
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.kprobes.recover import recover
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, plan_events

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kprobes.kretprobes import KretprobeInstance
    from kprobevm.x86.ptregs import PtRegs

__all__ = [
    "HOW",
    "STOP_FILE",
    "Armed",
    "How",
    "LostRound",
    "arm_core",
    "run_round",
    "start_workload",
]

How = Literal["reboot -f", "reboot", "panic"]
HOW: dict[How, str] = {
    "reboot -f": "reboot -f",
    "reboot": "reboot",
    "panic": "echo c > /proc/sysrq-trigger",
}
"""Each way a guest goes away, and the guest command that does it."""
STOP_FILE = "/tmp/kprobevm-changes.stop"
"""The workload loops end when it exists (the guest's busybox has no pkill)."""
LOOP = (f"while [ ! -e {STOP_FILE} ]; do cat /proc/version >/dev/null;"
        " head -c1 /etc/passwd >/dev/null; cat /proc/sys/fs/binfmt_misc/status"
        " >/dev/null 2>&1; done")
"""Opens, reads (busybox cat sends its file, head reads it), execs, and a read of the
spare module's status file when it is mounted."""
HIT_DEADLINE = 60.0
"""Seconds the workload gets to reach every probe (a hang guard under TCG)."""
ASKED_PANIC = "Kernel panic - not syncing: sysrq triggered crash"
"""What the guest kernel says at the panic a round asks for."""


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
    """One probe of each kind: stopping, recorded, count-only, a return probe, and more
    stopping ones."""

    stopping: Kprobe
    recorded: Kprobe
    counted: Kprobe
    ret: Kretprobe
    more: list[Kprobe] = field(default_factory=list)

    @property
    def kprobes(self) -> list[Kprobe]:
        return [self.stopping, self.recorded, self.counted, *self.more]

    def counts(self, vm: VM) -> list[int]:
        """Every probe's hits so far (recorded hits flushed, guest counters read)."""
        vm.flush_records()
        return [kp.nhit for kp in self.kprobes] + [self.ret.nhit]

    def errors(self) -> int:
        """Exceptions the handlers raised."""
        return sum(kp.nerrors for kp in self.kprobes) + self.ret.nerrors

    def unregister(self, vm: VM) -> None:
        if self.ret.registered:
            vm.unregister_kretprobe(self.ret)
        for kp in self.kprobes:
            if kp.registered:
                vm.unregister_kprobe(kp)


CORE = ("do_sys_openat2", "vfs_read", "ksys_read", "path_openat")
"""The core kernel's functions :func:`arm_core` probes."""


def arm_core(vm: VM) -> Armed:
    """Probes on the core kernel's busy functions, each hit by the workload."""
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


def arm_module(vm: VM, module: str) -> Armed:
    """Probes in the spare module (``binfmt_misc``): every exec stops at load_misc_binary
    (and its return), its fourth instruction records, a status read is counted."""
    armed = Armed(
        stopping=Kprobe(symbol_name=f"{module}:load_misc_binary", pre_handler=_hit),
        recorded=Kprobe(symbol_name=f"{module}:load_misc_binary", offset=0xB,
                        record=RecordSpec(), pre_handler=_hit),
        counted=Kprobe(symbol_name=f"{module}:bm_status_read"),
        ret=Kretprobe(symbol_name=f"{module}:load_misc_binary", handler=_returned),
    )  # fmt: skip
    vm.register_kprobes([armed.stopping, armed.recorded, armed.counted])
    vm.register_kretprobe(armed.ret)
    return armed


def wait_all_hit(vm: VM, armed: Armed, since: list[int] | None = None,
                 timeout: float = HIT_DEADLINE) -> list[int]:
    """Wait until every probe has more hits than ``since`` (or any); its counts then.
    Raises TimeoutError when the workload does not get there in time."""
    base = since or [0] * (len(armed.kprobes) + 1)
    deadline = time.monotonic() + timeout
    while True:
        counts = armed.counts(vm)
        if all(now > then for now, then in zip(counts, base, strict=True)):
            return counts
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every probe hit within {timeout:g} s:"
                               f" counts {counts}, before {base}")
        time.sleep(0.1)


def start_workload(vm: VM, smp: int) -> None:
    """The workload loop on every vCPU, until :data:`STOP_FILE` exists."""
    vm.run(f"rm -f {STOP_FILE}; for c in $(seq {smp}); do"
           f" (timeout 600 sh -c '{LOOP}' >/dev/null 2>&1 &); done", check=True)


class _Party(threading.Thread):
    """Calls ``step`` again and again until it raises; keeps what and when."""

    def __init__(self, name: str, step: Callable[[], object]) -> None:
        super().__init__(name=f"party-{name}", daemon=True)
        self.party = name
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


@dataclass(frozen=True)
class LostRound:
    """One guest gone under a busy session: who heard what, how soon, and what is left."""

    how: str
    smp: int
    exit_seconds: float
    """From the guest command to QEMU's exit (a plain reboot takes init's time)."""
    exitcode: int | None
    guest_said: str
    """The console line that says how the guest kernel ended."""
    heard: tuple[tuple[str, str, float], ...]
    """Each party: (name, what it raised, seconds after QEMU's exit); ``inf``: it
    still had not heard at the deadline."""
    next_call: tuple[tuple[str, str, float], ...]
    """Calls made after: (call, what it raised, seconds it took)."""
    close_seconds: float
    close_raised: str
    """'' when close() returned."""
    trouble: tuple[str, ...]
    """Console lines of kernel trouble, less the lines of a panic the round asked for."""
    int3_oops: tuple[str, ...]
    handler_errors: int
    left_registered: int
    journal_pending: int
    journal_lost: str
    recover_summary: str

    @property
    def ok(self) -> bool:
        return (all(what == "VMLost" for _, what, _ in self.heard + self.next_call)
                and not self.close_raised and not self.trouble and not self.int3_oops
                and not self.handler_errors and not self.left_registered
                and not self.journal_pending and bool(self.journal_lost))

    def worst_heard(self) -> float:
        return max(seconds for _, _, seconds in self.heard)


def run_round(how: How, smp: int, journal: Path, *, deadline: float = 10.0,
              qemu: str | None = None) -> LostRound:
    """Boot, arm, load, end the guest ``how``; ``deadline`` bounds each wait for a
    party (a party that hangs is recorded, not waited for)."""
    from kprobevm.guest.launcher import boot

    with boot(smp=smp, qemu=qemu, name=f"lost-{how.replace(' ', '')}") as vm:
        vm.journal_path = journal
        armed = arm_core(vm)
        event = parse_event("p:lost/w ksys_write")
        assert isinstance(event, ProbeEvent)
        trace = TraceSession(vm, plan_events(vm, [event]))
        trace.start()
        start_workload(vm, smp)
        wait_all_hit(vm, armed)
        address = vm.symbols["do_sys_openat2"]
        parties = [
            _Party("tracer", lambda: list(trace.drain())),  # waits for hits
            _Party("borrower", lambda: vm.read(address, 16)),  # holds the VM stopped
            _Party("counter", lambda: armed.counts(vm)),  # flushes, reads counters
        ]
        for party in parties:
            party.start()
        started = time.monotonic()
        with contextlib.suppress(VMLost):  # SSH goes with the guest (reboot -f, panic)
            vm.run(HOW[how], timeout=3 * deadline)
        machine = vm.machine
        assert machine is not None
        exitcode = machine.wait_exit(3 * deadline)
        exited = time.monotonic()
        heard = []
        for party in parties:
            party.join(max(0.0, exited + deadline - time.monotonic()))
            raised = party.raised
            heard.append((party.party, type(raised).__name__ if raised else "nothing",
                          party.at - exited if raised else float("inf")))
        next_call = []
        for name, call in (
            ("register_kprobe", lambda: vm.register_kprobe(Kprobe(symbol_name="vfs_write"))),
            ("run", lambda: vm.run("true", timeout=deadline)),
        ):
            t0 = time.monotonic()
            try:
                call()
                what = "nothing"
            except Exception as exc:
                what = type(exc).__name__
            next_call.append((name, what, time.monotonic() - t0))
        lost = vm.lost
        log = vm.serial_log()  # before close() removes it
        t0 = time.monotonic()
        close_raised = ""
        try:
            vm.close()
        except Exception as exc:
            close_raised = repr(exc)
        close_seconds = time.monotonic() - t0
    trouble = [line for line in kernel_trouble(log)
               if not (how == "panic" and ASKED_PANIC in line)]  # fmt: skip
    return LostRound(
        how=how, smp=smp, exit_seconds=exited - started, exitcode=exitcode,
        guest_said=lost.guest_said if lost is not None else "",
        heard=tuple(heard), next_call=tuple(next_call),
        close_seconds=close_seconds, close_raised=close_raised,
        trouble=tuple(trouble),
        int3_oops=tuple(line for line in log.splitlines() if "int3:" in line),
        handler_errors=armed.errors(),
        left_registered=sum(kp.registered for kp in armed.kprobes),
        journal_pending=len(pending_writes(journal)), journal_lost=journal_lost(journal),
        recover_summary=recover(journal).summary(),
    )  # fmt: skip
