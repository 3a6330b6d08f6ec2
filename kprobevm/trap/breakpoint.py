"""The fallback trap channel: a gdbstub breakpoint on the guest's own #BP vector entry.

Needs no guest memory of ours. At the stop the vCPU is at the vector's first
instruction with the exception frame on its stack. For a probe of ours the host unwinds
the exception (RIP, RSP, RFLAGS from the frame) and runs the handlers, then emulates a
branch, or puts the original byte back and single-steps that one vCPU (``vCont;s``: the
others stay stopped, so none can pass the unprobed instruction; QEMU's default step
flags mask interrupts), then writes the int3 again. Slow by design: under TCG, QEMU
flushes its whole translation cache at every breakpoint stop (not at a watchpoint stop).
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

from kprobevm.gdbstub.target import cpu_of_thread
from kprobevm.kprobes.core import ProbeSite
from kprobevm.trap.channel import INT3_BYTE, ChannelContext, TrapChannel
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.idt import BP_VECTOR, GATE_SIZE, decode_idt_gate, gate_address
from kprobevm.x86.ptregs import PtRegs

if TYPE_CHECKING:
    from kprobevm.gdbstub.packet import StopReply
    from kprobevm.gdbstub.transport import GdbTransport

__all__ = ["BreakpointChannel"]

_FRAME = struct.Struct("<5Q")
"""The exception frame the CPU pushes: RIP, CS, RFLAGS, RSP, SS."""


class BreakpointChannel(TrapChannel):
    """A breakpoint on the #BP vector; single-steps each displaced instruction."""

    name = "breakpoint"

    def __init__(self, ctx: ChannelContext, threads: list[str], *, vector: int, skip_to: int):
        super().__init__(ctx, threads)
        self.vector = vector
        """The #BP vector's entry (the guest's ``asm_exc_int3``), where the breakpoint is."""
        self.skip_to = skip_to
        """Where a trap that is not ours resumes: past the vector's first instruction,
        when that is a NOP (asm_exc_int3 starts with a patched-out clac), else 0."""

    @classmethod
    def install(cls, ctx: ChannelContext) -> BreakpointChannel:
        """Put the breakpoint on the vector IDT entry 3 points at."""
        memory = ctx.memory
        idt = ctx.symbols["idt_table"]
        with ctx.target.stopped() as client:
            vector = decode_idt_gate(memory.read(gate_address(idt, BP_VECTOR), GATE_SIZE))
            first = x86insn.decode(memory.read(vector, x86insn.MAX_INSN_SIZE), vector)
            skip_to = vector + first.length if first.mnemonic.startswith("nop") else 0
            client.insert_breakpoint(0, vector, 1)
            threads = client.threads()
        return cls(ctx, threads, vector=vector, skip_to=skip_to)

    def prepare_site(self, addr: int) -> ProbeSite:
        return ProbeSite(addr=addr, insn=self.read_insn(addr), slot=None)

    def commit_site(self, site: ProbeSite) -> None:
        pass

    def rebuild_site(self, site: ProbeSite) -> None:
        pass

    def discard_site(self, site: ProbeSite) -> None:
        pass

    def on_stop(self, stop: StopReply) -> None:
        client = self.ctx.target.client
        thread = stop.thread or ""
        gregs = dict(client.read_registers(wide=False))
        if gregs["rip"] != self.vector:
            return
        memory = self.ctx.memory
        frame_rip, cs, rflags, rsp, _ss = _FRAME.unpack(memory.read(gregs["rsp"], _FRAME.size))
        addr = frame_rip - 1
        handlers = self.ctx.handlers
        site = handlers.site_at(addr)
        if cs & 3 or site is None or not site.armed:
            self._not_ours(client, thread, addr, cs, rsp, rflags)
            return
        self._handler_end = time.perf_counter_ns()
        # the context the int3 interrupted, as the pre_handler must see it
        gregs.update(rip=addr, rsp=rsp, eflags=rflags)
        regs = PtRegs.from_gdb(gregs, cpu=cpu_of_thread(thread), memory=memory)
        if handlers.run_pre_handlers(site, regs):
            client.write_registers(regs.gdb_writes(rip=regs.ip) | _frame(rsp, rflags))
            return
        if site.insn.is_branch:
            # the exception is unwound: RSP and flags come from the frame even when the
            # branch leaves them as they were
            client.write_registers(self.emulate(site, regs) | _frame(regs.sp, regs.flags))
            self.stats.hits += 1
            return
        client.write_registers(regs.gdb_writes(rip=addr) | _frame(rsp, rflags))
        self._step_displaced(client, thread, site)
        self.stats.hits += 1

    def _step_displaced(self, client: GdbTransport, thread: str, site: ProbeSite) -> None:
        """Run the original instruction in place on this vCPU alone, then the post
        handlers with the registers it left."""
        memory = self.ctx.memory
        memory.write(site.addr, site.insn.bytes[:1])
        try:
            client.step(thread)
        finally:
            memory.write(site.addr, INT3_BYTE)
        if site.wants_post:
            after = dict(client.read_registers(thread=thread, wide=False))
            post = PtRegs.from_gdb(after, cpu=cpu_of_thread(thread), memory=memory)
            self.ctx.handlers.run_post_handlers(site, post)
            if post.changes():
                client.write_registers(post.gdb_writes(rip=post.ip), thread=thread)

    def _not_ours(
        self, client: GdbTransport, thread: str, addr: int, cs: int, rsp: int, rflags: int
    ) -> None:
        """A trap of someone else's goes to the guest's handler; a vanished int3 retries."""
        if not cs & 3 and (byte := self.ctx.memory.read(addr, 1)) != INT3_BYTE:
            # the kernel-mode int3 went away (a probe just removed, a patch of the guest's
            # own done): re-run the instruction. The byte written back as it is has QEMU
            # drop a translation that may still hold the int3 (a breakpoint stop flushes
            # them all anyway, but only on QEMU before 10.2)
            self.ctx.memory.write(addr, byte)
            client.write_registers({"rip": addr} | _frame(rsp, rflags))
            return
        self.unknown_stops += 1
        if self.skip_to:
            client.write_register("rip", self.skip_to)
        else:
            client.step(thread)  # past the breakpoint; the guest's handler goes on

    def close(self) -> None:
        target = self.ctx.target
        target.stop()
        with target.stopped() as client:
            client.remove_breakpoint(0, self.vector, 1)


def _frame(rsp: int, rflags: int) -> dict[str, int]:
    """The stack pointer and flags an exception frame gives back (what iretq would)."""
    return {"rsp": rsp, "eflags": rflags}
