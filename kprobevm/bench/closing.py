"""How fast a busy, probed session ends: close(), SIGTERM, and SIGTERM twice.

A host process (the child) attaches to a guest that this process booted, places
stopping, recorded, counted and return probes on hot functions while the guest runs a
workload on every vCPU, and is then told to leave: by an exception out of its
``with`` (close), by SIGTERM, or by SIGTERM twice (exit at once, recovery after). Each
round times the exit and then checks the guest: kernel text and IDT gate as before,
no trouble on its console, and still answering.
"""

from __future__ import annotations

import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kprobevm.bench.guestfacts import GuestFacts, read_state
from kprobevm.bench.guestfacts import guest_facts as facts_of
from kprobevm.guest.console import kernel_trouble
from kprobevm.kprobes.recover import recover

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = ["HOW", "CloseRound", "GuestFacts", "guest_facts", "run_round"]

HOW = ("close", "sigterm", "twice")
How = Literal["close", "sigterm", "twice"]
HOT = ("do_sys_openat2", "vfs_read", "kmem_cache_alloc", "ksys_read", "path_openat")
STOP_FILE = "/tmp/kprobevm-close.stop"
"""The workload loops end when it exists (the guest's busybox has no pkill)."""
LOOP = (f"while [ ! -e {STOP_FILE} ]; do cat /proc/version >/dev/null;"
        " head -c1 /etc/passwd >/dev/null; done")
ARM_DEADLINE = 120.0
EXIT_DEADLINE = 60.0
"""A hang guard: the figure is the measured time, not this."""

# The host that is told to leave. Stopping probes on three hot functions (one also a
# return probe), a recorded one and a counted one; its stdin says when to leave by close.
CHILD = r"""
import sys, time
from pathlib import Path
import kprobevm
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec
gdb, kallsyms, cmdline, vmlinux, journal = sys.argv[1:6]
with kprobevm.attach(gdb=gdb, kallsyms=kallsyms, kernel_cmdline=cmdline,
                     vmlinux=vmlinux) as vm:
    vm.journal_path = Path(journal)
    hit = lambda kp, regs: None
    vm.register_kprobes([Kprobe(symbol_name=n, pre_handler=hit)
                         for n in ("do_sys_openat2", "vfs_read", "kmem_cache_alloc")])
    vm.register_kprobe(Kprobe(symbol_name="ksys_read", record=RecordSpec(), pre_handler=hit))
    vm.register_kprobe(Kprobe(symbol_name="path_openat"))
    vm.register_kretprobe(Kretprobe(symbol_name="do_sys_openat2", handler=hit))
    print("armed", flush=True)
    sys.stdin.readline()
    print("leaving", flush=True)
    raise RuntimeError("the session leaves by an exception")
"""


@dataclass(frozen=True)
class CloseRound:
    """One round: how the session was ended, how long it took, and the guest after."""

    how: str
    smp: int
    seconds: float
    """From the request to leave (stdin line, first SIGTERM) to the process's exit."""
    exit_code: int
    hung: bool
    recovered: int
    """Writes ``recover`` restored after a double SIGTERM (0 when close finished first)."""
    text_restored: bool
    """Probed text, IDT gate 3 and the slot PMD entry as when the facts were gathered."""
    trouble: tuple[str, ...]
    guest_answers: bool

    @property
    def ok(self) -> bool:
        return (not self.hung and self.text_restored and not self.trouble
                and self.guest_answers)


def guest_facts(vm: VM, directory: Path) -> GuestFacts:
    """The facts for the functions this harness probes."""
    return facts_of(vm, directory, HOT)


def run_round(vm: VM, facts: GuestFacts, how: How, smp: int, journal: Path,
              *, rng: random.Random) -> CloseRound:
    """One session on ``vm`` under load, ended ``how``; the guest checked after."""
    log_start = len(vm.serial_log())
    vm.run(f"rm -f {STOP_FILE}; for c in $(seq {smp}); do"
           f" (timeout 300 sh -c '{LOOP}' >/dev/null 2>&1 &); done")
    journal.unlink(missing_ok=True)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, facts.gdb, str(facts.kallsyms), facts.cmdline,
         str(facts.vmlinux), str(journal)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        seconds, code, hung = _end(child, how, rng)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    recovered = 0
    if how == "twice" and journal.exists():
        recovered = len(recover(journal).restored)
    vm.run(f"touch {STOP_FILE}")
    state = read_state(facts)
    trouble = tuple(kernel_trouble(vm.serial_log()[log_start:]))
    try:
        answers = vm.run("echo ok", timeout=20).stdout.strip() == "ok"
    except Exception:  # a guest that stopped answering is the finding, not an error
        answers = False
    return CloseRound(how, smp, seconds, code, hung, recovered, state == facts.before,
                      trouble, answers)


def _end(child: subprocess.Popen[str], how: How, rng: random.Random) -> tuple[float, int, bool]:
    """Wait for "armed", let the load run a while, end the child; (seconds, code, hung)."""
    assert child.stdout is not None and child.stdin is not None
    if not _wait_line(child, "armed", ARM_DEADLINE):
        raise RuntimeError(f"the session did not arm its probes (exit {child.poll()})")
    time.sleep(rng.uniform(0.5, 2.0))
    started = time.monotonic()
    if how == "close":
        child.stdin.write("go\n")
        child.stdin.flush()
    else:
        child.send_signal(signal.SIGTERM)
        if how == "twice":
            time.sleep(rng.uniform(0.0, 0.05))  # before, during or after the restore
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        return time.monotonic() - started, -1, True
    return time.monotonic() - started, code, False


def _wait_line(child: subprocess.Popen[str], word: str, timeout: float) -> bool:
    assert child.stdout is not None
    deadline = time.monotonic() + timeout
    fd = child.stdout.fileno()
    while time.monotonic() < deadline:
        if select.select([fd], [], [], deadline - time.monotonic())[0]:
            line = child.stdout.readline()
            if not line:
                return False
            if line.strip() == word:
                return True
    return False


def signal_name(code: int) -> str:
    """An exit code as a shell shows it (128 + n: that signal)."""
    if code > 128 and code - 128 in {s.value for s in signal.Signals}:
        return f"{code} ({signal.Signals(code - 128).name})"
    return str(code)


