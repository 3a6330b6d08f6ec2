"""The guest's current task, read from the host (the kernel's ``current``, ``comm``, pid).

Offsets come from the kernel's own BTF (the vmlinux ``.BTF`` section), so no debug
package is needed. ``current`` is a per-CPU pointer at GS base + an offset while the
vCPU is in kernel mode, which is where every kprobe hit is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.kernel.btf import Btf, cpu_number_location, current_task_location

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["TASK_COMM_LEN", "TaskLayout"]

TASK_COMM_LEN = 16


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

    @classmethod
    def build(cls, symbols: KernelSymbols, vmlinux: Vmlinux) -> TaskLayout:
        btf = Btf.from_vmlinux(vmlinux)

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
        )

    def current_task(self, memory: GuestMemory, gs_base: int) -> int:
        """``current`` of the vCPU whose kernel GS base is ``gs_base``."""
        return memory.u64(gs_base + self.current)

    def comm_of(self, memory: GuestMemory, task: int) -> str:
        raw = memory.read(task + self.comm, TASK_COMM_LEN)
        return raw.split(b"\0", 1)[0].decode(errors="replace")

    def pid_of(self, memory: GuestMemory, task: int) -> int:
        return memory.s32(task + self.pid)
