"""The tasks grace period: the host's ``synchronize_rcu_tasks`` for slot memory.

On a kernel that preempts kernel code (``PREEMPT_RT``, ``preempt=full``) a task can be
switched out with its RIP inside a slot (the interrupt frame on its stack holds it), or
inside a function a record program called (a return address into the program on its
stack), and stay so for as long as the scheduler likes. That every vCPU has since been
in user mode or idle says nothing about such a task. So a slot freed at time T is
reused only once every task that could have been inside our slot pages at T has been
seen outside them: the first scan after T names the tasks that may be inside
(*holders*), and the slot is free once each of them has been seen clean (or gone) in a
later scan. Nobody can enter a slot after it was freed (its table entry went first), so
a task seen clean once stays clean for that slot, and a task born later never held it.

A scan (VM stopped, so the lists hold still as an RCU reader sees them) looks at every
task from ``init_task``:

- blocked (``on_rq`` 0): clean, as RCU-tasks takes it. A task blocks only by calling
  the scheduler itself, which nothing inside a slot does: a displaced instruction never
  blocks, an emulated call pushes the original return address, and the record
  programs' copy helpers take no lock. Only preemption leaves a task inside, and a
  preempted task stays on its run queue. This also keeps a sleeping task's stale stack
  word that looks like a slot address from holding the grace period up for ever;
- preempted (on a run queue, not on a vCPU): every 8-byte word of the live part of its
  kernel stack, from the saved ``thread.sp`` to the stack top (interrupt frames, return
  addresses, and anything else that happens to look like a slot address: conservative);
- running on a vCPU: its RIP (inside any of our code, stub included: it holds), then
  user mode or idle (nothing of ours left), else the live stack from RSP to the top when
  RSP is on the task's stack; on an interrupt or exception stack it holds (unknown).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError
from kprobevm.kernel.tasks import TASK_COMM_LEN, for_each_task
from kprobevm.x86.constants import PAGE_SIZE

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.tasks import TaskListLayout

__all__ = ["Region", "RunningTask", "TaskHold", "TaskScan", "TasksGrace", "scan_tasks"]

SCAN_DEADLINE = 2.0
"""Seconds one scan may take (about 100 tasks take milliseconds)."""
HISTORY = 64
"""Scans remembered: a slot freed before the oldest one waits on the oldest one's
holders instead, which is later than needed but still safe."""
MAX_HITS = 4
"""Addresses kept per holder, to say why it holds."""


@dataclass(frozen=True)
class Region:
    """Memory whose reuse waits on the grace period: ``[lo, hi)``, and within it only
    the pages in ``pages`` when given (the slot caches' pages, not the stub's)."""

    lo: int
    hi: int
    pages: frozenset[int] | None = None

    @classmethod
    def of_pages(cls, pages: Iterable[int]) -> Region:
        """The pages at ``pages`` (page addresses); empty when there are none."""
        found = frozenset(pages)
        if not found:
            return cls(0, 0, found)
        return cls(min(found), max(found) + PAGE_SIZE, found)

    def __contains__(self, addr: int) -> bool:
        return self.lo <= addr < self.hi and (
            self.pages is None or addr & ~(PAGE_SIZE - 1) in self.pages)

    def find_in(self, words: Iterable[int]) -> list[int]:
        """The words that point inside (a scan's inner loop: kept to comparisons)."""
        lo, hi, pages = self.lo, self.hi, self.pages
        if pages is None:
            return [w for w in words if lo <= w < hi]
        mask = ~(PAGE_SIZE - 1)
        return [w for w in words if lo <= w < hi and w & mask in pages]


@dataclass(frozen=True)
class RunningTask:
    """A vCPU's ``current`` at a stop, with what its registers say."""

    task: int
    rip: int
    rsp: int
    quiescent: bool
    """User mode, or halted in the idle loop: its kernel stack holds nothing of ours."""


@dataclass(frozen=True)
class TaskHold:
    """A task that may be inside our code: which, and why."""

    task: int
    pid: int
    comm: str
    why: str
    addresses: tuple[int, ...] = ()
    """Words inside our code found on its stack (or its RIP)."""

    def __str__(self) -> str:
        found = ", ".join(f"{a:#x}" for a in self.addresses)
        return f"{self.comm}[{self.pid}] at {self.task:#x}: {self.why}" + (
            f" ({found})" if found else "")


@dataclass(frozen=True)
class TaskScan:
    """One look at every task (VM stopped): who may be inside our code."""

    at: float
    """When (the grace period's clock)."""
    tasks: frozenset[int]
    """Every task looked at (``task_struct *``)."""
    holders: tuple[TaskHold, ...]
    words: int
    """Stack words read."""
    seconds: float


def scan_tasks(
    memory: GuestMemory,
    layout: TaskListLayout,
    *,
    region: Region,
    ours: Callable[[int], bool],
    running: Mapping[int, RunningTask],
    at: float,
    deadline: float,
) -> TaskScan:
    """Look at every task's kernel stack for words in ``region`` (our slot pages); a
    running task's RIP in ``ours`` (any code of ours) holds too."""
    t0 = time.perf_counter()
    holders: list[TaskHold] = []
    seen: set[int] = set()
    words = 0

    def hold(task: int, why: str, addresses: Iterable[int] = ()) -> None:
        try:
            pid = memory.s32(task + layout.pid)
            comm = memory.read(task + layout.comm, TASK_COMM_LEN).split(b"\0", 1)[0]
        except KprobeVMError:
            pid, comm = -1, b"?"
        holders.append(TaskHold(task, pid, comm.decode(errors="replace"), why,
                                tuple(addresses)[:MAX_HITS]))  # fmt: skip

    def look(task: int) -> None:
        nonlocal words
        try:
            base, top = layout.stack_of(memory, task)
            if not base:
                return  # a dead task whose stack is gone: nothing to come back to
            r = running.get(task)
            if r is not None:
                if ours(r.rip):
                    hold(task, "running in our code", (r.rip,))
                    return
                if r.quiescent:
                    return
                if not base <= r.rsp < top:
                    hold(task, f"running in kernel mode on another stack (rsp {r.rsp:#x})")
                    return
                sp = r.rsp
            else:
                if not layout.runnable(memory, task):
                    return
                sp = layout.saved_sp(memory, task)
                if not base <= sp < top:
                    sp = base  # not a stack pointer of this stack: look at all of it
            sp &= ~7
            data = memory.read(sp, top - sp)
        except KprobeVMError as exc:
            hold(task, f"stack unreadable: {exc}")
            return
        stack = memoryview(data).cast("Q")
        words += len(stack)
        hits = region.find_in(stack)
        if hits:
            hold(task, "stack words point into our slot pages", hits)

    for task in for_each_task(memory, layout, deadline=deadline):
        seen.add(task)
        look(task)
    for task in running:  # idle tasks of other CPUs are on no list
        if task not in seen:
            seen.add(task)
            look(task)
    return TaskScan(at, frozenset(seen), tuple(holders), words, time.perf_counter() - t0)


class TasksGrace:
    """Which tasks may still be inside our slot pages, scan after scan; slot caches ask
    :meth:`grace_over` before reuse."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: TaskListLayout,
        *,
        region: Callable[[], Region],
        ours: Callable[[int], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``region()``: the memory whose reuse waits on this grace period, now;
        ``ours(rip)``: any code of ours (a running task there holds, whatever region)."""
        self.memory = memory
        self.layout = layout
        self.region = region
        self.ours = ours
        self.clock = clock
        self.scans: list[tuple[float, frozenset[int]]] = []
        """(when, holders) of the last :data:`HISTORY` scans, oldest first."""
        self.last_clean: dict[int, float] = {}
        """Task -> when it was last seen holding nothing of ours (or seen gone)."""
        self.last: TaskScan | None = None
        self.nscans = 0
        self.scan_seconds = 0.0

    def observe(self, running: Mapping[int, RunningTask]) -> TaskScan:
        """Scan every task now (VM stopped)."""
        now = self.clock()
        scan = scan_tasks(self.memory, self.layout, region=self.region(),
                          ours=self.ours, running=running, at=now,
                          deadline=time.monotonic() + SCAN_DEADLINE)  # fmt: skip
        holders = frozenset(h.task for h in scan.holders)
        pending = frozenset().union(*(h for _, h in self.scans))
        for task in pending - scan.tasks:  # gone: it will never run again
            self.last_clean[task] = now
        for task in scan.tasks - holders:
            self.last_clean[task] = now
        keep = scan.tasks | pending
        self.last_clean = {t: c for t, c in self.last_clean.items() if t in keep}
        self.scans.append((now, holders))
        del self.scans[:-HISTORY]
        self.last = scan
        self.nscans += 1
        self.scan_seconds += scan.seconds
        return scan

    def grace_over(self, freed_at: float) -> bool:
        """Every task that may have been inside at ``freed_at`` has been seen out since."""
        for when, holders in self.scans:
            if when > freed_at:
                return all(self.last_clean.get(t, -1.0) > when for t in holders)
        return False

    def holders(self, freed_at: float) -> list[TaskHold]:
        """The tasks a slot freed at ``freed_at`` still waits on (for error messages)."""
        last = self.last
        if last is None:
            return []
        for when, holders in self.scans:
            if when > freed_at:
                return [h for h in last.holders if h.task in holders
                        and self.last_clean.get(h.task, -1.0) <= when]  # fmt: skip
        return list(last.holders)
