"""When slot memory may be reused or unmapped: the host's stand-in for the kernel's
RCU-tasks grace period.

A freed slot (or record program) may still hold a vCPU that was interrupted inside it.
On a kernel that does not preempt kernel code (``PREEMPT_NONE``/``VOLUNTARY``, or
``PREEMPT_DYNAMIC`` in those modes) it becomes reusable once no vCPU's RIP is inside it
and every vCPU has been seen in a quiescent state since it was freed: in user mode, or
halted in the idle loop (``sti; hlt`` right before RIP). Such a vCPU has no kernel
context of its own left interrupted inside a slot. This is the ``vcpus`` rule.

A kernel that preempts kernel code (``PREEMPT_RT``, ``preempt=full``) can switch a task
out inside a slot and leave it there: the ``tasks`` rule (:mod:`kprobevm.trap.rcutasks`)
then waits until every task that may have been inside has been seen out, by scanning
every task's kernel stack. Which rule is in force is read from the guest kernel at the
first collection, again at each one on a ``PREEMPT_DYNAMIC`` kernel (its mode can change
at run time; once preemptible, the tasks rule stays), logged, and in :attr:`Quiescence.rule`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError, KprobeVMError
from kprobevm.gdbstub.target import cpu_of_thread, halted_in_idle, vcpu_quiescent, vcpu_rips
from kprobevm.kernel.preempt import PreemptionModel, preemption_model
from kprobevm.kprobes.slots import SlotCache
from kprobevm.trap.rcutasks import Region, RunningTask, TasksGrace
from kprobevm.x86.slotmap import PMD_SPAN, ExecutablePages

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.target import Target
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.x86.slotmap import SlotArea

__all__ = ["GraceRule", "GuestTasks", "Quiescence"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class GuestTasks:
    """What the tasks rule reads in the guest: its memory, symbols and task layout."""

    memory: GuestMemory
    symbols: KernelSymbols
    layout: TaskLayout | None


@dataclass(frozen=True)
class GraceRule:
    """The grace period freed slot memory waits for: ``vcpus`` (every vCPU quiescent
    since), ``tasks`` (every task seen out of our slot pages since) or ``never`` (a
    preemptible kernel whose tasks cannot be walked: freed slots are not reused)."""

    name: str
    model: PreemptionModel
    why: str

    def __str__(self) -> str:
        return f"{self.name}: {self.why}"



class Quiescence:
    """Which vCPUs were last seen quiescent, and when; slot caches ask it before reuse."""

    def __init__(
        self,
        target: Target,
        threads: list[str],
        ours: Callable[[int], bool] = lambda rip: False,
        *,
        guest: GuestTasks | None = None,
    ) -> None:
        """``ours(rip)`` tells our own code (stub, slots, programs): a vCPU there is never
        quiescent, whatever byte precedes its RIP (an address or immediate in our code
        can hold 0xf4 too). ``guest`` lets the rule be read from the kernel and tasks be
        scanned; without it the ``vcpus`` rule holds (a stand-in guest in a test)."""
        self.target = target
        self.threads = threads
        self.ours = ours
        self.guest = guest
        self.last_quiescent: dict[str, float] = {}
        self.caches: list[SlotCache] = []
        self._rule: GraceRule | None = None
        self.tasks: TasksGrace | None = None
        """The tasks grace period, once the tasks rule is in force."""

    def slot_cache(self, area: SlotArea, slot_size: int, grace_seconds: float) -> SlotCache:
        """Cells of executable slot pages, freed only once nothing can be inside them."""
        cache = SlotCache(ExecutablePages(area), slot_size=slot_size, grace_seconds=grace_seconds)
        cache.before_collect = self.observe
        cache.grace_over = self.grace_over
        cache.in_use = self.in_use
        self.caches.append(cache)
        return cache

    # -- which rule --------------------------------------------------------------------

    @property
    def rule(self) -> GraceRule:
        """The rule in force (read from the guest kernel on first use)."""
        if self._rule is None:
            with self.target.stopped():
                self._decide()
        assert self._rule is not None
        return self._rule

    def _decide(self) -> GraceRule:
        """Read the preemption model and settle the rule (VM stopped). A kernel seen
        preemptible once keeps the tasks rule: a task preempted in a slot then is still
        there after a switch back to ``voluntary``."""
        rule = self._rule
        if rule is not None and (rule.name != "vcpus" or not rule.model.dynamic):
            return rule
        guest = self.guest
        if guest is None:
            model = PreemptionModel("unknown", False, False, "no guest kernel to ask")
            new = GraceRule("vcpus", model, "no guest kernel to ask (a stand-in target)")
        else:
            model = preemption_model(guest.memory, guest.symbols)
            new = self._rule_for(model, guest)
        if rule is None or new.name != rule.name:
            say = log.warning if new.name == "never" else log.info
            say("slot grace period: %s; preemption model %s", new, model)
        self._rule = new
        return new

    def _rule_for(self, model: PreemptionModel, guest: GuestTasks) -> GraceRule:
        if not model.preemptible:
            return GraceRule("vcpus", model, "kernel code is not preempted: every vCPU"
                             " quiescent since the free")  # fmt: skip
        layout = guest.layout.task_list if guest.layout is not None else None
        if layout is None:
            return GraceRule("never", model, "a task may be preempted inside a slot and"
                             " the kernel's BTF cannot walk its tasks: freed slots are not"
                             " reused")  # fmt: skip
        self.tasks = TasksGrace(guest.memory, layout, region=self._slot_pages,
                                ours=self.ours)  # fmt: skip
        return GraceRule("tasks", model, "a task may be preempted inside a slot: every"
                         " task seen out of the slot pages since the free")  # fmt: skip

    def _slot_pages(self) -> Region:
        return Region.of_pages(p for cache in self.caches for p in cache.pages)

    # -- observing ---------------------------------------------------------------------

    def observe(self) -> None:
        """Note which vCPUs are in a quiescent state now, and under the tasks rule
        where every task is (VM stopped)."""
        rule = self._decide()
        now = time.monotonic()
        if rule.name != "tasks":
            for thread in self.threads:
                if vcpu_quiescent(self.target.client, thread, self.ours):
                    self.last_quiescent[thread] = now
            return
        assert self.tasks is not None
        running = self._running_tasks()
        if running is not None:
            self.tasks.observe(running)

    def _running_tasks(self) -> dict[int, RunningTask] | None:
        """Each vCPU's current task (VM stopped); None when a vCPU in kernel code has
        no known current: its task's saved RSP is stale, so no scan can judge it."""
        now = time.monotonic()
        running: dict[int, RunningTask] = {}
        for thread in self.threads:
            r = self._running(thread)
            if r.quiescent:
                self.last_quiescent[thread] = now
            if r.task:
                running[r.task] = r
            elif not r.quiescent:
                log.debug("vCPU %d: current task unknown, no task scan this time",
                          cpu_of_thread(thread))  # fmt: skip
                return None
        return running

    def _running(self, thread: str) -> RunningTask:
        """The vCPU's current task and registers, one ``g`` (VM stopped); task 0 when its
        per-CPU base could not be read."""
        client = self.target.client
        regs = client.read_registers(thread=thread, wide=False)
        rip, user = regs["rip"], bool(regs["cs"] & 3)
        quiescent = user
        if not user and not self.ours(rip):
            quiescent = halted_in_idle(client, rip)
        guest = self.guest
        assert guest is not None and guest.layout is not None
        task = 0
        for base in (regs["gs_base"], regs["k_gs_base"]):  # kernel's: before/after swapgs
            if base >> 63:
                try:
                    task = guest.layout.current_task(guest.memory, base)
                except KprobeVMError:
                    task = 0
                break
        return RunningTask(task, rip, regs["rsp"], quiescent)

    def grace_over(self, freed_at: float) -> bool:
        """Nothing can be inside memory freed at ``freed_at`` any more: under the vcpus
        rule every vCPU has been quiescent since; under the tasks rule every task that
        may have been inside has been seen out since; under ``never``, not yet."""
        rule = self._rule
        if rule is not None and rule.name == "tasks":
            assert self.tasks is not None
            return self.tasks.grace_over(freed_at)
        if rule is not None and rule.name == "never":
            return False
        return all(self.last_quiescent.get(t, 0.0) > freed_at for t in self.threads)

    def in_use(self, start: int, end: int) -> bool:
        """Some vCPU's RIP is in [start, end) (VM stopped)."""
        return any(start <= rip < end for rip in vcpu_rips(self.target.client))

    def wait_until_out_of(self, area: SlotArea, timeout: float = 10.0) -> None:
        """Let the guest run until ``area`` (stub, slots, table walks), no longer
        reachable, holds no vCPU and no interrupted context: no RIP inside it, and every
        vCPU seen quiescent since this call. A RIP outside is not enough: a vCPU may be in
        an interrupt (or its softirqs) taken inside a slot, and return there after an
        unmap. After ``timeout`` it raises, and the area stays mapped: safe, if untidy."""
        since = time.monotonic()
        deadline = since + timeout
        tasks: TasksGrace | None = None
        while True:
            with self.target.stopped() as client:
                inside = [r for r in vcpu_rips(client) if area.contains(r)]
                self.observe()
                if self.tasks is not None:
                    if tasks is None:  # the whole area goes: stub and trampoline too
                        tasks = TasksGrace(self.tasks.memory, self.tasks.layout,
                                           region=lambda: Region(area.base, area.base + PMD_SPAN),
                                           ours=self.ours)  # fmt: skip
                    running = self._running_tasks()
                    if running is not None:
                        tasks.observe(running)
            if tasks is not None:
                left = not inside and tasks.grace_over(since)
            else:
                left = not inside and self.grace_over(since)
            if left:
                return
            if time.monotonic() > deadline:
                if tasks is not None and not inside:
                    held = "; ".join(map(str, tasks.holders(since))) or "none now"
                    raise KprobeError(f"tasks may still be inside the slot area: {held}")
                where = ", ".join(f"{r:#x}" for r in inside) or "none now, but some vCPU" \
                    " was never seen quiescent (user mode or idle)"
                raise KprobeError(f"vCPUs may still be inside the slot area: {where}")
            self.target.resume()
            time.sleep(0.02)

    def wait_until_out_of_text(
        self, ranges: Sequence[tuple[int, int]], since: float, timeout: float
    ) -> str | None:
        """Let the guest run until nothing can be inside kernel text ``ranges`` (each
        ``[lo, hi)``) that no new execution enters after ``since`` (what optimized jumps go over):
        no vCPU's RIP inside, and under the rule in force every vCPU (or every task that
        may have been interrupted inside them, or inside a slot, whose copies may end
        inside them) seen out since. None when so; else, after
        ``timeout`` seconds or at once under the ``never`` rule, why not."""
        deadline = time.monotonic() + timeout
        tasks: TasksGrace | None = None

        def inside(rip: int) -> bool:
            return any(lo <= rip < hi for lo, hi in ranges)

        # a task scan looks for stack words in one range: all of them and what lies between
        bounds = Region(min(lo for lo, _ in ranges), max(hi for _, hi in ranges))

        while True:
            with self.target.stopped() as client:
                rips = [r for r in vcpu_rips(client) if inside(r)]
                self.observe()
                rule = self.rule
                if rule.name == "never":
                    return f"slot grace period {rule}"
                if self.tasks is not None:
                    if tasks is None:
                        tasks = TasksGrace(self.tasks.memory, self.tasks.layout,
                                           region=lambda: bounds,
                                           ours=lambda r: inside(r) or self.ours(r))  # fmt: skip
                    running = self._running_tasks()
                    if running is not None:
                        tasks.observe(running)
            if tasks is not None:
                # a task switched out in a slot (one freed since, too) goes on to where
                # the slot's copies end, which may be inside these bytes: it holds too
                assert self.tasks is not None
                in_slots = self.tasks.grace_over(since)
                over = tasks.grace_over(since) and in_slots
            else:
                over = self.grace_over(since)
            if not rips and over:
                return None
            if time.monotonic() > deadline:
                if rips:
                    return "vCPUs inside the jump's bytes: " + ", ".join(f"{r:#x}" for r in rips)
                if tasks is not None:
                    assert self.tasks is not None
                    held = "; ".join(map(str, [*tasks.holders(since),
                                               *self.tasks.holders(since)])) or "none now"
                    return f"tasks may be inside the jump's bytes or a slot: {held}"
                return "some vCPU was never seen quiescent (user mode or idle)"
            self.target.resume()
            time.sleep(0.02)
