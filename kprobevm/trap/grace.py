"""When slot memory may be reused or unmapped: the host's stand-in for the kernel's
RCU-tasks grace period.

A freed slot (or record program) may still hold a vCPU that was interrupted inside it.
It becomes reusable once no vCPU's RIP is inside it and every vCPU has been seen in a
quiescent state since it was freed: in user mode, or halted in the idle loop (the byte
before RIP is ``hlt``). Such a vCPU has no kernel context of its own left interrupted
inside a slot, because the guest kernel does not preempt kernel code
(PREEMPT_NONE/VOLUNTARY).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError
from kprobevm.gdbstub.target import vcpu_rips
from kprobevm.kprobes.slots import SlotCache
from kprobevm.x86.arch import quiescent
from kprobevm.x86.slotmap import ExecutablePages

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.target import Target
    from kprobevm.x86.slotmap import SlotArea

__all__ = ["Quiescence"]


class Quiescence:
    """Which vCPUs were last seen quiescent, and when; slot caches ask it before reuse."""

    def __init__(
        self,
        target: Target,
        memory: GuestMemory,
        threads: list[str],
        ours: Callable[[int], bool] = lambda rip: False,
    ) -> None:
        """``ours(rip)`` tells our own code (stub, slots, programs): a vCPU there is never
        quiescent, whatever byte precedes its RIP (an address or immediate in our code
        can hold 0xf4 too)."""
        self.target = target
        self.memory = memory
        self.threads = threads
        self.ours = ours
        self.last_quiescent: dict[str, float] = {}

    def slot_cache(self, area: SlotArea, slot_size: int, grace_seconds: float) -> SlotCache:
        """Cells of executable slot pages, freed only once no vCPU can be inside them."""
        cache = SlotCache(ExecutablePages(area), slot_size=slot_size, grace_seconds=grace_seconds)
        cache.before_collect = self.observe
        cache.grace_over = self.grace_over
        cache.in_use = self.in_use
        return cache

    def observe(self) -> None:
        """Note which vCPUs are in a quiescent state now (VM stopped)."""
        client = self.target.client
        now = time.monotonic()
        for thread in self.threads:
            regs = client.read_registers(thread=thread, wide=False)
            if quiescent(regs["cs"], regs["rip"], ours=self.ours, read=self.memory.read):
                self.last_quiescent[thread] = now

    def grace_over(self, freed_at: float) -> bool:
        """Every vCPU has been quiescent since ``freed_at``."""
        return all(self.last_quiescent.get(t, 0.0) > freed_at for t in self.threads)

    def in_use(self, start: int, end: int) -> bool:
        """Some vCPU's RIP is in [start, end) (VM stopped)."""
        return any(start <= rip < end for rip in vcpu_rips(self.target.client))

    def wait_until_out_of(self, area: SlotArea, timeout: float = 10.0) -> None:
        """Let the guest run until no vCPU is inside ``area`` (stub, slots, table walks)
        and each has been seen quiescent since the call, for the caller to unmap it.

        Nothing may lead into the area any more (gate, int3s and returns restored). A
        vCPU whose RIP is outside may still be in an interrupt handler that returns
        into a slot; once seen quiescent it holds no such context.
        """
        since = time.monotonic()
        deadline = since + timeout
        while True:
            with self.target.stopped() as client:
                self.observe()
                inside = [r for r in vcpu_rips(client) if area.contains(r)]
            if not inside and self.grace_over(since):
                return
            if time.monotonic() > deadline:
                late = [t for t in self.threads if self.last_quiescent.get(t, 0.0) <= since]
                raise KprobeError(
                    "vCPUs stay inside the slot area or never quiescent: "
                    + ", ".join([f"{r:#x}" for r in inside] + late)
                )
            self.target.resume()
            time.sleep(0.02)
