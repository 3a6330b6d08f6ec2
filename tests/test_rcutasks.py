"""The tasks grace period on a synthetic guest: a task list and kernel stacks laid out in
a fake memory, vCPUs as register sets. No QEMU: the walk, the stack scan, the holdout
bookkeeping and a slot cache that must not reuse a slot a preempted task is inside."""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kprobevm.errors import GdbErrorReply, TaskWalkError
from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kernel.preempt import BANNER_MAX, banner_flags, preemption_model
from kprobevm.kernel.tasks import TaskLayout, TaskListLayout, for_each_task
from kprobevm.trap.grace import GuestTasks, Quiescence
from kprobevm.trap.rcutasks import Region, RunningTask, TasksGrace, scan_tasks
from kprobevm.x86.constants import PAGE_SIZE

LAYOUT = TaskListLayout(init_task=0xFFFF888000100000, tasks=0x10, signal=0x20,
                        thread_node=0x30, thread_head=0x8, stack=0x40, thread_sp=0x48,
                        on_rq=0x50, pid=0x58, comm=0x60, thread_size=0x4000)  # fmt: skip
SLOTS = 0xFFFFFFFFFEE59000
"""A slot page of ours."""
STUB = 0xFFFFFFFFFEE50000
"""Our stub's page: any code of ours, not a slot page."""
TEXT = 0xFFFFFFFF81234567
"""Kernel text: a return address that is not ours."""
BANNER = 0xFFFFFFFF82000000
PERCPU = 0xFFFF88801F000000
CURRENT = 0x1000
"""Offset of ``current`` from the per-CPU base."""


class Ram:
    """Sparse guest memory: an unwritten byte reads as unmapped."""

    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def read_memory(self, addr: int, n: int) -> bytes:
        try:
            return bytes(self.bytes[a] for a in range(addr, addr + n))
        except KeyError:
            raise GdbErrorReply(0x0E, sent=b"m%x,%x" % (addr, n)) from None

    def write_memory(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[addr + i] = b

    def read_phys(self, addr: int, n: int) -> bytes:
        raise GdbErrorReply(0x0E, sent=b"phys")

    def write_phys(self, addr: int, data: bytes) -> None:
        raise GdbErrorReply(0x0E, sent=b"phys")

    def u64(self, addr: int, value: int) -> None:
        self.write_memory(addr, struct.pack("<Q", value))


@dataclass
class Task:
    """A synthetic task_struct and its stack."""

    addr: int
    pid: int
    runnable: bool = True
    words: list[int] = field(default_factory=list)
    """The live stack, top of stack last; the saved sp points at the first."""


class Guest:
    """Processes (each a list of threads) laid out as the kernel links them."""

    def __init__(self, processes: list[list[Task]]) -> None:
        self.ram = Ram()
        self.memory = GuestMemory(self.ram)
        self.processes = processes
        self.layout()

    def layout(self) -> None:
        ram, lay = self.ram, LAYOUT
        leaders = [p[0] for p in self.processes]
        for i, leader in enumerate(leaders):  # the process ring through ->tasks
            ram.u64(leader.addr + lay.tasks, leaders[(i + 1) % len(leaders)].addr + lay.tasks)
        for process in self.processes:
            signal = process[0].addr + 0x800  # a signal_struct per process
            head = signal + lay.thread_head
            nodes = [head] + [t.addr + lay.thread_node for t in process]
            for i, node in enumerate(nodes):
                ram.u64(node, nodes[(i + 1) % len(nodes)])
            for t in process:
                ram.u64(t.addr + lay.signal, signal)
                self.place(t)

    def place(self, t: Task) -> None:
        """Write the task's fields and its live stack at the top of its stack."""
        ram, lay = self.ram, LAYOUT
        base = t.addr + 0x100000
        top = base + lay.thread_size
        sp = top - 8 * len(t.words)
        ram.u64(t.addr + lay.stack, base)
        ram.u64(t.addr + lay.thread_sp, sp)
        ram.write_memory(t.addr + lay.on_rq, struct.pack("<I", int(t.runnable)))
        ram.write_memory(t.addr + lay.pid, struct.pack("<i", t.pid))
        ram.write_memory(t.addr + lay.comm, f"t{t.pid}".encode().ljust(16, b"\0"))
        # stale words below sp, as a deeper call once left them
        ram.write_memory(base, struct.pack("<Q", SLOTS + 0x40) * ((sp - base) // 8))
        ram.write_memory(sp, b"".join(struct.pack("<Q", w) for w in t.words))

    def stack_top(self, t: Task) -> int:
        return t.addr + 0x100000 + LAYOUT.thread_size


def _task(n: int, *, runnable: bool = True, words: list[int] | None = None) -> Task:
    """Task ``n`` (pid n), by default runnable with a return address to kernel text."""
    return Task(LAYOUT.init_task + n * 0x10000, n, runnable, words or [TEXT])


def _scan(guest: Guest, running: dict[int, RunningTask] | None = None) -> dict[int, str]:
    scan = scan_tasks(guest.memory, LAYOUT, region=Region.of_pages([SLOTS]),
                      ours=lambda rip: STUB <= rip < SLOTS + PAGE_SIZE,
                      running=running or {}, at=1.0, deadline=float("inf"))  # fmt: skip
    return {h.pid: h.why for h in scan.holders}


def test_the_walk_visits_every_thread_of_every_process_init_task_first() -> None:
    init, a, b1, b2, c = _task(0), _task(1), _task(2), _task(3), _task(4)
    guest = Guest([[init], [a], [b1, b2], [c]])
    walked = list(for_each_task(guest.memory, LAYOUT, deadline=float("inf")))
    assert walked == [t.addr for t in (init, a, b1, b2, c)]


def test_a_broken_or_looping_list_ends_in_a_task_walk_error() -> None:
    guest = Guest([[_task(0)], [_task(1)]])
    with pytest.raises(TaskWalkError, match="more than 1 tasks") as info:
        list(for_each_task(guest.memory, LAYOUT, deadline=float("inf"), limit=1))
    assert info.value.walked == 2
    guest.ram.u64(_task(1).addr + LAYOUT.tasks, 0x1234)  # a user address
    with pytest.raises(TaskWalkError, match="not kernel memory"):
        list(for_each_task(guest.memory, LAYOUT, deadline=float("inf")))
    with pytest.raises(TaskWalkError, match="ran out of time"):
        list(for_each_task(guest.memory, LAYOUT, deadline=0.0))


def test_a_preempted_task_holds_by_any_live_stack_word_in_a_slot_page() -> None:
    """Live words only (from the saved sp up); stale ones below it do not count."""
    guest = Guest([[_task(0, words=[TEXT])],
                   [_task(1, words=[0, SLOTS + 0x80, TEXT])],   # an interrupt frame's RIP
                   [_task(2, words=[TEXT, STUB + 8])],          # the stub: not a slot page
                   [_task(3, words=[TEXT, SLOTS + PAGE_SIZE])]])  # fmt: skip
    holders = _scan(guest)
    assert list(holders) == [1]
    assert "stack words" in holders[1]


def test_a_blocked_task_is_clean_whatever_its_stack_says() -> None:
    """Blocking is a call into the scheduler, which nothing in a slot makes."""
    guest = Guest([[_task(0)], [_task(1, runnable=False, words=[SLOTS + 0x80])]])
    assert _scan(guest) == {}


def test_running_tasks_are_judged_by_their_vcpu() -> None:
    t1, t2, t3, t4 = (_task(n, words=[SLOTS + 0x80, TEXT]) for n in (1, 2, 3, 4))
    guest = Guest([[_task(0)], [t1], [t2], [t3], [t4]])
    top = guest.stack_top
    running = {
        t1.addr: RunningTask(t1.addr, 0x401000, 0x7FFF0000, quiescent=True),  # user mode
        t2.addr: RunningTask(t2.addr, TEXT, top(t2) - 8, quiescent=False),  # above the word
        t3.addr: RunningTask(t3.addr, TEXT, top(t3) - 16, quiescent=False),  # the word is live
        t4.addr: RunningTask(t4.addr, TEXT, 0xFFFFC90000003F00, quiescent=False),  # irq stack
    }
    holders = _scan(guest, running)
    assert set(holders) == {3, 4}
    assert "another stack" in holders[4]
    # in our code (the stub too): holds, even with nothing on its stack
    idle = _task(9)
    running = {idle.addr: RunningTask(idle.addr, STUB + 0x10, 0, quiescent=False)}
    guest.place(idle)  # an idle task: on no list, found through its vCPU
    assert _scan(guest, running)[9] == "running in our code"


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_freed_slot_waits_for_the_tasks_inside_at_the_first_scan_only() -> None:
    holder, later = _task(1, words=[SLOTS + 0x80]), _task(2, words=[TEXT])
    guest = Guest([[_task(0)], [holder], [later]])
    grace = TasksGrace(guest.memory, LAYOUT, region=lambda: Region.of_pages([SLOTS]),
                       ours=lambda rip: False, clock=Clock())  # fmt: skip
    freed_at = 10.5
    assert not grace.grace_over(freed_at)  # no scan since
    grace.observe({})
    assert not grace.grace_over(freed_at)
    assert [h.pid for h in grace.holders(freed_at)] == [1]
    later.words = [SLOTS + 0x100]  # it cannot have entered the freed slot: not waited for
    guest.place(later)
    grace.observe({})
    assert not grace.grace_over(freed_at)
    holder.words = [TEXT]  # it moved on
    guest.place(holder)
    grace.observe({})
    assert grace.grace_over(freed_at)
    assert not grace.grace_over(grace.clock.now)  # type: ignore[attr-defined]


def test_a_holder_that_exits_no_longer_holds() -> None:
    holder = _task(1, words=[SLOTS + 0x80])
    guest = Guest([[_task(0)], [holder]])
    grace = TasksGrace(guest.memory, LAYOUT, region=lambda: Region.of_pages([SLOTS]),
                       ours=lambda rip: False, clock=Clock())  # fmt: skip
    grace.observe({})
    guest.processes = [[_task(0)]]
    guest.layout()
    grace.observe({})
    assert grace.grace_over(10.5)


# -- a slot cache under the tasks rule ---------------------------------------------------


@dataclass
class _Client:
    """One stopped vCPU in kernel mode, in ``current``'s code."""

    regs: dict[str, int]

    def read_registers(self, thread: str | None = None, *, wide: bool = True) -> dict[str, int]:
        return self.regs

    def read_register_each(self, name: str, threads: list[str]) -> dict[str, int]:
        return {t: self.regs[name] for t in threads}

    def threads(self) -> list[str]:
        return ["p1.1"]

    def read_memory(self, addr: int, n: int) -> bytes:
        return b"\x90" * n


@dataclass
class _Target:
    client: _Client

    @contextlib.contextmanager
    def stopped(self) -> Iterator[_Client]:
        yield self.client


class _Area:
    """A slot area whose pages are counted, not mapped."""

    def __init__(self) -> None:
        self.next = SLOTS

    def map_page(self, *, executable: bool = True) -> int:
        self.next += PAGE_SIZE
        return self.next - PAGE_SIZE

    def unmap_page(self, address: int) -> None:
        pass

    def contains(self, addr: int) -> bool:
        return STUB <= addr < SLOTS + 64 * PAGE_SIZE


def _rt_guest(guest: Guest, banner: bytes) -> GuestTasks:
    guest.ram.write_memory(BANNER, banner.ljust(BANNER_MAX, b"\0"))
    symbols = KernelSymbols.from_text(f"{BANNER:x} D linux_banner\n")
    layout = TaskLayout(current=CURRENT, comm=LAYOUT.comm, pid=LAYOUT.pid, tgid=0,
                        stack=LAYOUT.stack, exit_state=0, task_list=LAYOUT)  # fmt: skip
    return GuestTasks(guest.memory, symbols, layout)


RT_BANNER = b"Linux version 6.1.0-57-rt-amd64 (gcc) #1 SMP PREEMPT_RT Debian 6.1.192-3"


def _rt_vcpu_in_kernel() -> tuple[Guest, Task, _Area, Quiescence]:
    """An RT guest whose one vCPU runs a task in the kernel, a second task switched out,
    and the tasks rule over slot memory: the guest, the switched-out task, the slot
    memory, the rule."""
    running, preempted = _task(1, words=[TEXT]), _task(2, words=[TEXT])
    guest = Guest([[_task(0)], [running], [preempted]])
    guest.ram.u64(PERCPU + CURRENT, running.addr)
    client = _Client({"cs": 0x10, "rip": TEXT, "rsp": guest.stack_top(running) - 8,
                      "gs_base": PERCPU, "k_gs_base": 0})  # fmt: skip
    area = _Area()
    q = Quiescence(_Target(client), ["p1.1"], ours=area.contains,  # type: ignore[arg-type]
                   guest=_rt_guest(guest, RT_BANNER))  # fmt: skip
    return guest, preempted, area, q


def test_a_slot_a_preempted_task_is_inside_is_not_reused_until_it_moves_on() -> None:
    """The slot goes DIRTY; collections find the task (switched out, the slot's address
    in its interrupt frame) and keep the slot dirty; once the task has run on, the
    next collection cleans it and the slot is handed out again."""
    guest, preempted, area, q = _rt_vcpu_in_kernel()
    assert q.rule.name == "tasks" and q.rule.model.name == "rt"
    cache = q.slot_cache(area, 128, grace_seconds=0.0)  # type: ignore[arg-type]
    slot = cache.get_insn_slot()
    preempted.words = [0, slot.address + 0x10, TEXT]  # preempted inside the slot
    guest.place(preempted)
    cache.free_insn_slot(slot)
    others = [cache.get_insn_slot() for _ in range(cache.slots_per_page - 1)]
    assert slot not in others
    for _ in range(3):  # the page is full: each new slot collects first, in vain
        fresh = cache.get_insn_slot()
        assert fresh.page != slot.page
        cache.free_insn_slot(fresh, dirty=False)
    assert cache.stats()["dirty"] == 1
    preempted.words = [TEXT]  # scheduled again, and out of the slot
    guest.place(preempted)
    assert cache.collect_garbage() == 1
    assert cache.get_insn_slot() == slot


def test_the_rule_comes_from_the_kernel() -> None:
    """RT and full preemption scan tasks; a PREEMPT_DYNAMIC kernel in voluntary mode
    keeps the vCPU rule until it is switched to full, and then keeps the tasks rule."""
    assert banner_flags(RT_BANNER) == {"SMP", "PREEMPT_RT"}
    guest = Guest([[_task(0)]])
    dyn = b"Linux version 6.1.0-57-cloud-amd64 (gcc) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192"
    tasks = _rt_guest(guest, dyn)
    mode = 0xFFFFFFFF82001000
    tasks = GuestTasks(tasks.memory, KernelSymbols.from_text(
        f"{BANNER:x} D linux_banner\n{mode:x} d preempt_dynamic_mode\n"), tasks.layout)
    guest.ram.write_memory(mode, struct.pack("<i", 1))  # voluntary
    model = preemption_model(tasks.memory, tasks.symbols)
    assert (model.name, model.preemptible, model.dynamic) == ("voluntary", False, True)
    client = _Client({"cs": 0x33, "rip": 0x401000, "rsp": 0, "gs_base": 0,
                      "k_gs_base": PERCPU})  # fmt: skip
    q = Quiescence(_Target(client), ["p1.1"], guest=tasks)  # type: ignore[arg-type]
    assert q.rule.name == "vcpus"
    guest.ram.write_memory(mode, struct.pack("<i", 2))  # echo full > .../sched/preempt
    q.observe()
    assert q.rule.name == "tasks" and q.rule.model.name == "full"
    guest.ram.write_memory(mode, struct.pack("<i", 0))
    q.observe()
    assert q.rule.name == "tasks"
    plain = b"Linux version 6.1.0 (gcc) #1 SMP Debian 6.1.192"
    assert not preemption_model(_rt_guest(guest, plain).memory, tasks.symbols).preemptible


def test_a_jump_waits_for_a_task_preempted_in_a_slot_that_returns_inside_it() -> None:
    """A slot that copied the instructions of an older jump (a site uncovered by a probe
    inside it, or a freed one) goes back to the instruction after them, which may lie
    inside a newer jump's bytes. A task preempted in such a slot holds that jump off:
    no stack word of it points into the jump's bytes, but it will run into them."""
    guest, preempted, area, q = _rt_vcpu_in_kernel()
    cache = q.slot_cache(area, 128, grace_seconds=0.0)  # type: ignore[arg-type]
    old = cache.get_insn_slot()
    preempted.words = [0, old.address + 0x10, TEXT]  # switched out among the copies
    guest.place(preempted)
    cache.free_insn_slot(old)
    jump = [(TEXT + 0x100 + 1, TEXT + 0x100 + 6)]  # the old slot goes back to +3 of it
    since = time.monotonic()
    why = q.wait_until_out_of_text(jump, since, timeout=0.0)
    assert why is not None and "t2[2]" in why, why
    preempted.words = [TEXT]  # it ran on, out of the slot
    guest.place(preempted)
    assert q.wait_until_out_of_text(jump, since, timeout=0.0) is None
