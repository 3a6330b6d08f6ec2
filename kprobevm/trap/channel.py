"""The trap channel interface: what the probe table needs from whatever brings a guest
int3 to the host, and the choice between the two channels.

A channel places sites (the int3 and what runs the displaced instruction), arms and
disarms them, and on the trap thread turns each stop into handler calls through
:class:`TrapHandlers` (the probe table). Two channels exist: the watchpoint channel
(:mod:`.watchpoint`, fast: no TCG flush per hit) and the breakpoint channel
(:mod:`.breakpoint`, needs no guest memory of ours). :func:`install_channel` picks one,
and says so on stderr when it has to fall back.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from kprobevm import faults
from kprobevm.errors import KprobeError, ProbeTextChanged
from kprobevm.trap.optjump import disarm_jump
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.asm import INT3
from kprobevm.x86.emulate import emulate
from kprobevm.x86.ptregs import to_gdb_names

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.gdbstub.packet import StopReply
    from kprobevm.gdbstub.target import Target
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kprobes.core import Kprobe, ProbeSite
    from kprobevm.kprobes.journal import Journal
    from kprobevm.kprobes.recorder import Record
    from kprobevm.trap.grace import GraceRule, Quiescence
    from kprobevm.x86.ptregs import PtRegs

__all__ = [
    "ChannelContext",
    "ChannelKind",
    "ReturnProbes",
    "TrapChannel",
    "TrapHandlers",
    "TrapStats",
]

INT3_BYTE = bytes([INT3])

ChannelKind = Literal["watchpoint", "breakpoint"]
"""``watchpoint``: the fast channel, falling back to the breakpoint one when the guest
cannot take it; ``breakpoint``: the #BP-vector breakpoint outright (for comparison)."""


class TrapHandlers(Protocol):
    """The probe table as a channel sees it: where the sites are and who runs handlers."""

    def site_at(self, addr: int) -> ProbeSite | None: ...
    def run_pre_handlers(self, site: ProbeSite, regs: PtRegs) -> bool: ...
    def run_post_handlers(self, site: ProbeSite, regs: PtRegs) -> None: ...
    def run_recorded(self, kp: Kprobe, record: Record) -> None: ...


class ReturnProbes(Protocol):
    """Return probes as the watchpoint channel sees them: a trampoline in its slot
    memory, the handler at each return, and the hijacked returns to undo at close."""

    @property
    def store_end(self) -> int: ...
    def install(
        self, trampoline: int, table: int, mailbox: int, *, info: int | None = None
    ) -> bytes: ...
    def on_return(self, gregs: dict[str, int], cpu: int, *, redirect: bool) -> dict[str, int]: ...
    def unhijack_all(self) -> int: ...


@dataclass(frozen=True)
class ChannelContext:
    """What every channel uses: run control, memory, the journal, symbols, the table."""

    target: Target
    memory: GuestMemory
    journal: Journal
    symbols: KernelSymbols
    handlers: TrapHandlers


@dataclass
class TrapStats:
    """Where the host's time per hit goes (nanoseconds, summed over ``hits``)."""

    hits: int = 0
    regs_ns: int = 0
    """Reading the vCPU's RIP or registers, when the stop or a handler needs them."""
    handler_ns: int = 0
    """Running the handlers (memory reads they make included)."""
    writeback_ns: int = 0
    """Preparing register write-backs (they are sent with the resume)."""
    caught_pending: int = 0
    """Hits found on another vCPU than the one QEMU reported (SMP)."""
    promoted: int = 0
    """Hot sites given a watchpoint of their own."""
    ring_stops: int = 0
    """Stops of the record ring's half-full watch (the guest asking for a drain)."""
    folded: int = 0
    """Hits found at a stop of our own (SMP): QEMU reported only the interrupt that
    raced the vCPU's watched store."""

    def per_hit_us(self) -> dict[str, float]:
        """Mean microseconds per hit in each phase."""
        n = max(self.hits, 1)
        return {
            "regs": self.regs_ns / n / 1e3,
            "handler": self.handler_ns / n / 1e3,
            "writeback": self.writeback_ns / n / 1e3,
        }


class TrapChannel(abc.ABC):
    """What the probe table needs from a channel: sites, arming, and the trap handler."""

    name: str
    #: Whether probes with a RecordSpec (recorded in the guest) can be placed.
    records = False

    def __init__(self, ctx: ChannelContext, threads: list[str]) -> None:
        self.ctx = ctx
        self.threads = threads
        """The vCPUs' gdbstub thread ids."""
        self.unknown_stops = 0
        self.stats = TrapStats()
        self.fallback_reason: str | None = None
        """Why the faster channel could not be used (None: this is the one asked for)."""
        self._handler_end = 0

    #: Whether sites can be jump-optimized (a slot to jump to: :mod:`.optjump`).
    optimizes = False

    def optimize(self, site: ProbeSite) -> None:
        """Turn the site's armed int3 into its jump (VM stopped; the optimizer waited)."""
        raise KprobeError(f"the {self.name} channel cannot optimize probes", address=site.addr)

    def unoptimize(self, site: ProbeSite) -> None:
        """Turn the site's jump back into its int3 (VM stopped)."""
        disarm_jump(self.ctx, site)

    def quiescence_for_text(self) -> Quiescence | None:
        """What tells when no vCPU or task can be inside some text (None: nothing)."""
        return None

    @property
    def grace_rule(self) -> GraceRule | None:
        """The grace period freed slot memory waits for (None: this channel has no slots)."""
        return None

    def read_insn(self, addr: int) -> x86insn.Insn:
        """The instruction at ``addr``, refused when it cannot be probed."""
        insn = x86insn.decode(self.ctx.memory.read(addr, x86insn.MAX_INSN_SIZE), addr)
        insn.check_probeable()
        return insn

    @abc.abstractmethod
    def prepare_site(self, addr: int) -> ProbeSite:
        """A new site at ``addr`` with its instruction (and slot), not yet in the guest."""

    @abc.abstractmethod
    def commit_site(self, site: ProbeSite) -> None:
        """Make a prepared site reachable from the trap path (its slot code, its entry)."""

    @abc.abstractmethod
    def rebuild_site(self, site: ProbeSite) -> None:
        """Its probes changed (a post_handler, a recorded probe): write it anew."""

    @abc.abstractmethod
    def discard_site(self, site: ProbeSite) -> None:
        """The site's last probe is gone: free what it held."""

    def flush_records(self) -> None:  # noqa: B027 (a channel that records overrides it)
        """Hand every recorded hit in the guest to its handler now (VM stopped)."""

    def release_record_id(self, kp: Kprobe) -> None:  # noqa: B027 (as flush_records)
        """An unregistered recorded probe gives its id back."""

    def records_settling(self) -> int:
        """Unregistered recorded probes whose hits in flight are not all counted yet."""
        return 0

    def why_not_counting(self) -> str | None:
        """Why probes cannot be counted in the guest here (None: they can; VM stopped)."""
        return None if self.records else f"the {self.name} channel cannot record"

    def arm(self, site: ProbeSite) -> None:
        """Write the int3 (journal first; refuse if the guest changed the bytes)."""
        memory, journal = self.ctx.memory, self.ctx.journal
        current = memory.read(site.addr, site.insn.length)
        if current != site.insn.bytes:
            raise ProbeTextChanged(site.addr, site.insn.bytes, current)
        site.int3_seq = journal.record(
            "virt", site.addr, site.insn.bytes[:1], INT3_BYTE,
            f"int3 at {self.ctx.symbols.describe(site.addr)}",
        )  # fmt: skip
        memory.write(site.addr, INT3_BYTE)
        site.armed, site.armed_at = True, time.monotonic()

    def disarm(self, site: ProbeSite) -> None:
        """Put the original byte back, unless the guest changed it under us (an
        optimized jump goes back to the int3 first)."""
        memory = self.ctx.memory
        if site.optimized:
            disarm_jump(self.ctx, site)
        current = memory.read(site.addr, 1)
        if current != INT3_BYTE:
            raise ProbeTextChanged(site.addr, INT3_BYTE, current)
        memory.write(site.addr, site.insn.bytes[:1])
        faults.kill_point("disarm_kprobe")
        if site.int3_seq is not None:
            self.ctx.journal.undone(site.int3_seq)
        site.int3_seq = None
        site.armed = False

    def emulate(self, site: ProbeSite, regs: PtRegs) -> dict[str, int]:
        """Run a branch on the host, then the post_handlers; the registers to write back.

        For a probe whose instruction the slot cannot follow with a post store (returns,
        indirect branches), and for every branch on the breakpoint channel.
        """
        memory = self.ctx.memory
        result = emulate(site.insn, to_gdb_names(regs.as_dict()), memory.u64)
        for write in result.writes:
            memory.write(write.addr, write.data)
        regs.ip, regs.sp = result.rip, result.rsp
        if result.rcx is not None:
            regs.cx = result.rcx
        self.ctx.handlers.run_post_handlers(site, regs)
        self._handler_end = time.perf_counter_ns()
        return regs.gdb_writes(rip=regs.ip)

    def ensure_running(self) -> None:
        """The trap thread runs while any probe is registered."""
        target = self.ctx.target
        target.on_stop = self.on_stop
        target.start()

    @abc.abstractmethod
    def on_stop(self, stop: StopReply) -> None:
        """A stop of the VM (trap thread, VM stopped): handle the hits it holds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Take the channel out of the guest and leave it running."""

    def forget(self) -> None:  # noqa: B027 (most channels run nothing on the host)
        """The guest is gone: end what the channel runs on the host, touching no guest."""
