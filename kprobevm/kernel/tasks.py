"""The guest's tasks, read from the host: ``current``, ``comm``, pid, and every task.

Offsets come from the kernel's own BTF (the vmlinux ``.BTF`` section), so no debug
package is needed. ``current`` is a per-CPU pointer at GS base + an offset while the
vCPU is in kernel mode, which is where every kprobe hit is. :func:`for_each_task` walks
every thread of every process from ``init_task``, as the kernel's
``for_each_process_thread`` does, for the tasks grace period of slot memory.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError, TaskWalkError
from kprobevm.kernel.btf import (
    Btf,
    BtfError,
    cpu_number_location,
    current_task_location,
    top_of_stack_location,
)
from kprobevm.x86.constants import PAGE_SIZE

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["DEFAULT_THREAD_SIZE", "TASK_COMM_LEN", "TaskLayout", "TaskListLayout",
           "for_each_task", "kernel_thread_size"]

TASK_COMM_LEN = 16
DEFAULT_THREAD_SIZE = 0x4000
"""x86-64's kernel stack size without KASAN, used when kallsyms cannot tell."""
MAX_TASKS = 1 << 20
"""A walk longer than this is a list gone wrong, not a guest (pid_max is 4M at most)."""



def kernel_thread_size(symbols: KernelSymbols) -> int | None:
    """The kernel's THREAD_SIZE, from the init task's stack as kallsyms bounds it
    (``__start_init_stack``..``__end_init_stack`` in newer kernels such as 6.12,
    ``__start_init_task``..``__end_init_task`` in 6.1); None when it names neither pair."""
    for first, last in (("__start_init_stack", "__end_init_stack"),
                        ("__start_init_task", "__end_init_task")):  # fmt: skip
        start, end = symbols.get(first), symbols.get(last)
        size = end - start if start is not None and end is not None else 0
        if PAGE_SIZE <= size <= 1 << 20 and not size & (size - 1):
            return size
    return None

@dataclass(frozen=True)
class TaskLayout:
    """Where ``current`` is, and the ``task_struct`` fields kprobevm reads."""

    current: int
    """Offset of ``current`` from the per-CPU base (GS base)."""
    comm: int
    pid: int
    tgid: int
    stack: int
    exit_state: int
    cpu_number: int = 0
    """Offset of this CPU's number from the per-CPU base."""
    top_of_stack: int = 0
    """Offset from the per-CPU base of the end of ``current``'s entry ``pt_regs``
    (0: this kernel's BTF does not say)."""
    task_list: TaskListLayout | None = None
    """How to walk every task and find its kernel stack (None: this BTF cannot say)."""

    @classmethod
    def build(cls, symbols: KernelSymbols, vmlinux: Vmlinux) -> TaskLayout:
        return cls.from_btf(symbols, Btf.from_vmlinux(vmlinux))

    @classmethod
    def from_btf(cls, symbols: KernelSymbols, btf: Btf) -> TaskLayout:
        """From the kernel's BTF however it was had (the vmlinux, or guest memory)."""

        def field(name: str) -> int:
            return btf.struct_member_offset("task_struct", name)

        return cls(
            current=current_task_location(symbols, btf).offset,
            comm=field("comm"),
            pid=field("pid"),
            tgid=field("tgid"),
            stack=field("stack"),
            exit_state=field("exit_state"),
            cpu_number=cpu_number_location(symbols, btf).offset,
            top_of_stack=_top_of_stack(symbols, btf),
            task_list=TaskListLayout.build(symbols, btf),
        )

    def current_task(self, memory: GuestMemory, gs_base: int) -> int:
        """``current`` of the vCPU whose kernel GS base is ``gs_base``."""
        return memory.u64(gs_base + self.current)

    def comm_of(self, memory: GuestMemory, task: int) -> str:
        raw = memory.read(task + self.comm, TASK_COMM_LEN)
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def pid_of(self, memory: GuestMemory, task: int) -> int:
        return memory.s32(task + self.pid)


def _top_of_stack(symbols: KernelSymbols, btf: Btf) -> int:
    """:attr:`TaskLayout.top_of_stack`, 0 when neither per-CPU slot is found (its user,
    the record program's stack copy, says so)."""
    try:
        return top_of_stack_location(symbols, btf).offset
    except BtfError:
        return 0


@dataclass(frozen=True)
class TaskListLayout:
    """What walking every task and reading its stack needs: ``init_task``, the
    ``task_struct``/``signal_struct`` list heads, the stack pointer saved at a switch
    (``thread.sp``) and the stack's base and size."""

    init_task: int
    tasks: int
    """``task_struct.tasks``: the list of processes (thread-group leaders)."""
    signal: int
    thread_node: int
    """``task_struct.thread_node``: this thread in ``signal->thread_head``."""
    thread_head: int
    """``signal_struct.thread_head``: every thread of a process."""
    stack: int
    thread_sp: int
    """``task_struct.thread.sp``: the kernel RSP saved when the task was switched out."""
    on_rq: int
    """``task_struct.on_rq``: 0 once the task blocked (a voluntary switch)."""
    pid: int
    comm: int
    thread_size: int = DEFAULT_THREAD_SIZE

    @classmethod
    def build(cls, symbols: KernelSymbols, btf: Btf) -> TaskListLayout | None:
        """From the BTF and kallsyms (``init_task``; the stack size as
        :func:`kernel_thread_size` finds it); None when either lacks a part."""
        try:
            field = functools.partial(btf.struct_member_offset, "task_struct")
            init_task = symbols["init_task"]
            layout = cls(
                init_task=init_task, tasks=field("tasks"), signal=field("signal"),
                thread_node=field("thread_node"),
                thread_head=btf.struct_member_offset("signal_struct", "thread_head"),
                stack=field("stack"), thread_sp=field("thread.sp"), on_rq=field("on_rq"),
                pid=field("pid"),
                comm=field("comm"),
            )  # fmt: skip
        except (BtfError, KeyError):
            return None
        size = kernel_thread_size(symbols)
        return layout if size is None else dataclasses.replace(layout, thread_size=size)

    def stack_of(self, memory: GuestMemory, task: int) -> tuple[int, int]:
        """``[base, top)`` of ``task``'s kernel stack (base 0: freed, the task is dead)."""
        base = memory.u64(task + self.stack)
        return base, (base + self.thread_size if base else 0)

    def runnable(self, memory: GuestMemory, task: int) -> bool:
        """``task`` is on a run queue: running, or preempted and waiting to run again
        (False: it blocked, of its own accord)."""
        return memory.u32(task + self.on_rq) != 0

    def saved_sp(self, memory: GuestMemory, task: int) -> int:
        """The RSP ``task`` had when it was last switched out (stale while it runs)."""
        return memory.u64(task + self.thread_sp)


def for_each_task(
    memory: GuestMemory,
    layout: TaskListLayout,
    *,
    deadline: float,
    limit: int = MAX_TASKS,
) -> Iterator[int]:
    """Every ``struct task_struct *``: each thread of each process, ``init_task``
    first, as ``for_each_process_thread`` visits them (VM stopped: the lists are then
    as an RCU reader sees them; idle tasks of other CPUs are on no list).

    Raises :class:`TaskWalkError` on a pointer that leaves kernel memory or a read that
    fails, past ``limit`` tasks (a list gone round in a loop) and past ``deadline``
    (``time.monotonic()``).
    """
    seen = 0

    def follow(node: int, what: str, task: int) -> int:
        try:
            nxt = memory.u64(node)
        except KprobeVMError as exc:
            raise TaskWalkError(f"{what} of task {task:#x} unreadable", task=task,
                                walked=seen) from exc  # fmt: skip
        if nxt < _KERNEL_HALF:  # top bit clear: user space or a null
            raise TaskWalkError(f"{what} of task {task:#x} points at {nxt:#x}, not kernel memory",
                                task=task, walked=seen)  # fmt: skip
        return nxt

    process = layout.init_task
    while True:
        head = follow(process + layout.signal, "signal", process) + layout.thread_head
        node = follow(head, "signal->thread_head", process)
        while node != head:
            task = node - layout.thread_node
            seen += 1
            if seen > limit:
                raise TaskWalkError(f"more than {limit} tasks: a list that loops?",
                                    task=task, walked=seen)  # fmt: skip
            if time.monotonic() > deadline:
                raise TaskWalkError("the walk ran out of time", task=task, walked=seen)
            yield task
            node = follow(node, "thread_node.next", task)
        process = follow(process + layout.tasks, "tasks.next", process) - layout.tasks
        if process == layout.init_task:
            return


_KERNEL_HALF = 1 << 63
