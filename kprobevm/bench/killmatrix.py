"""The kill matrix: a host SIGKILLed at each phase of its work on a guest.

A host process (the child) attaches to a guest this process booted, while the guest
runs a workload on every vCPU, and dies by SIGKILL at one phase of its work: at a kill
point of its own (:mod:`kprobevm.faults`, the N-th arrival picked at random), or killed
by this process while something is true (return probes in flight, a handler holding the
VM stopped). Each round then checks, before anyone recovers anything, that the guest
runs a workload to the end with a clean console; then runs ``recover`` on the child's
journal and checks that the probed functions' text, IDT gate 3 and the slot area's PMD
entry are byte for byte what they were, the console is still clean, and the guest
still answers.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kprobevm.bench.guestfacts import GuestFacts, read_state
from kprobevm.bench.guestfacts import guest_facts as facts_of
from kprobevm.faults import ENV
from kprobevm.guest.console import kernel_trouble
from kprobevm.kprobes.journal import pending_writes
from kprobevm.kprobes.recover import recover
from kprobevm.trap.watchpoint import TABLE_PAGES

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["PHASES", "GuestFacts", "KillRound", "guest_facts", "kill_point_for", "run_round"]

PHASES = (
    "idt", "slotmap", "journal", "register", "unregister", "promote", "kretprobe", "handler",
)  # fmt: skip
"""Where the host dies: hooking the IDT gate, mapping slot pages, between a journal
record and its write (or mid-line), mid-batch register, mid-batch unregister, promoting
a hot site, with return probes in flight, with a handler holding the VM stopped."""
BATCH = (
    "do_sys_openat2", "vfs_read", "ksys_read", "path_openat", "vfs_write", "ksys_write",
    "do_filp_open", "getname_flags", "vfs_open", "do_dentry_open", "alloc_empty_file",
    "complete_walk", "may_open", "path_init", "seq_read_iter", "alloc_fd",
)  # fmt: skip
"""The batch the child registers: functions the workload runs through."""
COUNTED = ("ksys_write", "path_init")
"""Batch members without handlers: counted in the guest (the record ring's pages too)."""
RETURNS = ("do_nanosleep", "pipe_read")
"""Return probes of the kretprobe phase: both sleep with the call in flight (pipe_read
gets two, as two return probes on one function share the call's hijack)."""
HOLD = "do_sys_openat2"
"""The handler phase's probe: its pre_handler sleeps, holding the VM stopped."""
LOOP = "while :; do cat /proc/version >/dev/null; head -c1 /etc/passwd >/dev/null; done"
READERS = 4
"""Readers blocked in pipe_read (the kretprobe phase): half are let go before recovery
(their calls return through the trampoline with no host), half after it (through the
return address recovery gave back)."""
WORKLOAD = 100
"""Iterations of the workload that must finish after the kill, before recovery."""
DEADLINE = 60.0
"""A hang guard for the child's arming and the checks' workloads."""

# The host that dies. argv: gdb kallsyms cmdline vmlinux journal phase
CHILD = r"""
import os, sys, time
from pathlib import Path
import kprobevm
from kprobevm.bench.killmatrix import BATCH, COUNTED, HOLD, RETURNS
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
gdb, kallsyms, cmdline, vmlinux, journal, phase = sys.argv[1:7]
vm = kprobevm.attach(gdb=gdb, kallsyms=kallsyms, kernel_cmdline=cmdline, vmlinux=vmlinux)
vm.journal_path = Path(journal)
# one write(2) a line: the trap thread's "holding" and the main thread's "armed" do not mix
say = lambda *words: os.write(1, (" ".join(map(str, words)) + "\n").encode())
hit = lambda kp, regs: None
if phase == "kretprobe":
    # two on pipe_read: each blocked reader's call carries both probes' instances
    rps = [Kretprobe(symbol_name=name, handler=hit) for name in (*RETURNS, RETURNS[-1])]
    for rp in rps:
        vm.register_kretprobe(rp)
    say("armed")
    while True:
        time.sleep(0.05)
        say("inflight", sum(rp.active for rp in rps))
elif phase == "handler":
    def hold(kp, regs):
        say("holding")
        time.sleep(600)
    vm.register_kprobe(Kprobe(symbol_name=HOLD, pre_handler=hold))
    say("armed")
else:
    kps = [Kprobe(symbol_name=name, pre_handler=None if name in COUNTED else hit)
           for name in BATCH]
    vm.register_kprobes(kps)
    say("armed")
    if phase == "unregister":
        time.sleep(0.5)
        vm.unregister_kprobes(kps)
    if phase == "promote":
        time.sleep(5)
    say("done")
while True:
    time.sleep(1)
"""


@dataclass
class KillRound:
    """One round: where the child died, the guest before recovery, and after it."""

    phase: str
    point: str
    """The kill point (``NAME:N``), or what was true when this process killed the child."""
    smp: int
    killed_at_point: bool = False
    """The child died of its own kill point (False: this process killed it)."""
    healthy_before_recovery: bool = False
    """The workload ran to the end with a clean console before anyone recovered anything."""
    recovered: int = 0
    returns_given_back: int = 0
    recover_error: str = ""
    text_restored: bool = False
    """Probed text, IDT gate 3 and the slot PMD entry byte for byte as before the round."""
    differs: tuple[str, ...] = ()
    pending_after: int = 0
    trouble: tuple[str, ...] = ()
    guest_answers: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.healthy_before_recovery and not self.recover_error and self.text_restored
                and not self.pending_after and not self.trouble and self.guest_answers)


def guest_facts(vm: VM, directory: Path) -> GuestFacts:
    """The facts for this matrix's probed functions."""
    return facts_of(vm, directory, (*BATCH, *RETURNS, HOLD))


def kill_point_for(phase: str, rng: random.Random) -> str | None:
    """The ``KPROBEVM_KILL_POINT`` a phase dies at, N at random (None: killed from here)."""
    sites = len(BATCH)
    channel_pages = 4 + TABLE_PAGES  # stub, mailbox, table, trampoline, return table
    if phase == "idt":
        return "idt_gate"
    if phase == "slotmap":
        if rng.random() < 0.2:
            return "pmd_populate"
        return f"set_pte:{rng.randint(1, channel_pages + 1)}"
    if phase == "journal":
        name = rng.choice(("journal_write", "journal_torn"))
        return f"{name}:{rng.randint(1, sites + 2)}"  # PMD, gate, then the int3s
    if phase == "register":
        return f"arm_kprobe:{rng.randint(1, sites)}"
    if phase == "unregister":
        return f"disarm_kprobe:{rng.randint(1, sites)}"
    if phase == "promote":
        return f"promote_site:{rng.randint(1, 3)}"
    return None


class _Lines:
    """The child's stdout, line by line, read on a thread (it may print a lot)."""

    def __init__(self, child: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        assert child.stdout is not None
        stdout = child.stdout

        def read() -> None:
            for line in stdout:
                self.queue.put(line.strip())
            self.queue.put(None)

        threading.Thread(target=read, daemon=True).start()

    def wait_for(self, test: str, timeout: float) -> str | None:
        """The first line starting with ``test`` within ``timeout`` (None: not seen)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                return None
            if line is None:
                return None
            if line.startswith(test):
                return line
        return None


def _guest(vm: VM, command: str, timeout: float = 30.0) -> str | None:
    """A command's output, or None when the guest does not answer in time."""
    try:
        return vm.run(command, timeout=timeout).stdout.strip()
    except Exception:  # a guest that stopped answering is the finding, not an error
        return None


def _kill_matching(*patterns: str) -> str:
    """A guest command that kills the processes whose command line matches one of the
    awk ``patterns`` (the guest's busybox has no pkill)."""
    match = " || ".join(f"/{p}/" for p in patterns)
    return f"kill $(ps -o pid,args | awk '({match}) && !/awk/ {{print $1}}') 2>/dev/null; true"


def _trouble(vm: VM, start: int) -> tuple[str, ...]:
    return tuple(kernel_trouble(vm.serial_log()[start:]))


def run_round(vm: VM, facts: GuestFacts, phase: str, smp: int, journal: Path,
              *, rng: random.Random) -> KillRound:
    """One child on ``vm`` under load, SIGKILLed at ``phase``; the guest checked after."""
    started = time.monotonic()
    point = kill_point_for(phase, rng)
    r = KillRound(phase, point or "", smp)
    log_start = len(vm.serial_log())
    before = read_state(facts)
    vm.run(f"for c in $(seq {smp}); do (timeout 300 sh -c '{LOOP}' >/dev/null 2>&1 &); done")
    journal.unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop(ENV, None)
    if point is not None:
        env[ENV] = point
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, facts.gdb, str(facts.kallsyms), facts.cmdline,
         str(facts.vmlinux), str(journal), phase],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        _kill(vm, child, _Lines(child), r, rng)
    finally:
        if child.poll() is None:
            child.kill()
        code = child.wait()
    r.killed_at_point = point is not None and code == -signal.SIGKILL and not r.notes
    if code != -signal.SIGKILL:
        r.notes.append(f"the child exited {code}")
    _check(vm, facts, journal, r, before, log_start)
    r.seconds = time.monotonic() - started
    return r


def _kill(vm: VM, child: subprocess.Popen[str], lines: _Lines, r: KillRound,
          rng: random.Random) -> None:
    """Let the child die at its point, or kill it while the phase's condition holds."""
    if r.phase == "kretprobe":
        if lines.wait_for("armed", DEADLINE) is None:
            r.notes.append(f"the child did not arm (exit {child.poll()})")
            return
        # readers block in pipe_read with the call in flight
        half = READERS // 2
        vm.run(f"for i in $(seq {half}); do (sleep 300 | cat >/dev/null &);"
               f" (sleep 301 | cat >/dev/null &); done")
        deadline = time.monotonic() + 30
        line = None
        while time.monotonic() < deadline:
            line = lines.wait_for("inflight", 5.0)
            if line is not None and int(line.split()[1]) > 0:
                break
        else:
            r.notes.append("no return probe instance in flight")
        time.sleep(rng.uniform(0.0, 1.0))
        r.point = f"{line or 'inflight ?'} and up to 1 s"
        child.send_signal(signal.SIGKILL)
    elif r.phase == "handler":
        if lines.wait_for("holding", DEADLINE) is None:
            r.notes.append(f"the handler never held the VM (exit {child.poll()})")
            return
        time.sleep(rng.uniform(0.0, 0.5))
        r.point = "pre_handler holding the VM stopped"
        child.send_signal(signal.SIGKILL)
    elif lines.wait_for("done", DEADLINE) is not None or child.poll() is None:
        # the child got through its work (or hangs): a moment more, then it was missed
        try:
            child.wait(2.0)
        except subprocess.TimeoutExpired:
            r.notes.append("the kill point was not reached")


def _check(vm: VM, facts: GuestFacts, journal: Path, r: KillRound, before: dict[str, bytes],
           log_start: int) -> None:
    """The guest before recovery, recovery, and the guest after it."""
    if r.phase == "kretprobe":  # calls in flight return with nobody on the host
        _guest(vm, _kill_matching("sleep 301"))
    done = _guest(vm, f"for i in $(seq {WORKLOAD}); do cat /proc/version; done | wc -l",
                  timeout=DEADLINE)  # fmt: skip
    trouble = _trouble(vm, log_start)
    r.healthy_before_recovery = done == str(WORKLOAD) and not trouble
    if done != str(WORKLOAD):
        r.notes.append(f"workload before recovery: {done!r}")
    if journal.exists():
        try:
            report = recover(journal, timeout=30.0)
            r.recovered = len(report.restored)
            r.returns_given_back = report.returns_restored
            if not report.ok:
                r.recover_error = report.summary()
            r.pending_after = len(pending_writes(journal))
        except Exception as exc:
            r.recover_error = f"{type(exc).__name__}: {exc}"
    # the blocked readers' calls return now, through the return address recovery gave back
    _guest(vm, _kill_matching("sleep 300", "while :; do cat"))
    try:
        after = read_state(facts)
    except Exception as exc:
        r.notes.append(f"state after recovery unreadable: {exc}")
        after = {}
    r.differs = tuple(name for name in before if after.get(name) != before[name])
    r.text_restored = not r.differs
    r.guest_answers = _guest(vm, "sleep 0.5; echo ok", timeout=30.0) == "ok"
    r.trouble = _trouble(vm, log_start)
