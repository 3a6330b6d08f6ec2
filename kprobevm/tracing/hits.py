"""Hits of a trace session: the handlers that turn a probe's hit into an EventHit.

Each planned event becomes one engine probe (:class:`PlacedEvent`): a kprobe whose
handler fetches the arguments with the guest stopped, a kretprobe whose handler does the
same at the return, or a recorded kprobe whose handler runs later on the host against
what the guest recorded. All three fetch through a :class:`HitContext` and hand the hit
to one sink; they run on the engine's trap thread, where nothing may reach for SSH.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kprobevm.errors import GuestFaultError
from kprobevm.gdbstub.readahead import HitReader, ReadPredictor
from kprobevm.kernel.tasks import TASK_COMM_LEN
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.recorder import RecordedRegs, RecordSpec
from kprobevm.tracing.fetch import THREAD_SIZE, ArgValue, FetchArg
from kprobevm.tracing.format import FTRACE_CONTEXT_FLAGS, INT3_CONTEXT_FLAGS, EventHit
from kprobevm.tracing.plan import PlannedProbe
from kprobevm.tracing.resolve import lookup_symbol
from kprobevm.x86.constants import MASK64

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.x86.ptregs import PtRegs

__all__ = ["KRETPROBED", "RETURN_FRAME_CS", "HitBuilder", "HitContext", "PlacedEvent"]

_UNKNOWN_COMM = "<...>"
HIJACKED_RETURN = "$stack0"
"""A ``fixed`` entry for the return address at a function's entry, as the kernel's return
probe has already replaced it when a later-defined return probe on the same function
runs first (the newest_first rule): the kernel's trampoline."""
KRETPROBED = "[unknown/kretprobe'd]"
"""What the kernel prints for a return address that is its return trampoline: the
return of a call another return probe on the same function hooked first, whose
instance kept that probe's trampoline as the address to return to."""
RETURN_FRAME_CS = "%cs@frame"
"""A ``fixed`` entry: how far below a return's stack pointer the kernel's return
trampoline frame has its ``pt_regs`` cs word, which a kernel with the selector_cs rule
fills only in its low 16 bits; ``%cs`` reads that word so."""
_KERNEL_CS_FRAME = 40  # arch_rethook_trampoline: 3 pushes and flags, then cs
_REGISTERS = frozenset(("ip", "orig_ax"))  # what the trace file prints for a pid with no saved comm


class HitContext:
    """The stopped guest as fetch arguments see it: registers, memory, ``current``.

    Only guest memory through the gdbstub (``regs.memory``): a handler runs with the VM
    stopped on the trap thread, where SSH would deadlock. ``fixed`` gives registers the
    values the kernel's handler would see instead of the engine's (``ip`` one past the
    probe, as after an int3; ``orig_ax`` as the kernel's entry path sets it);
    ``stack_aliases`` maps a word on the stack to what the kernel would have there (our
    return trampoline's address to the kernel's).
    """

    __slots__ = ("_aliases", "_fixed", "_layout", "_memory", "_regs", "_symbols", "_task")

    def __init__(
        self,
        regs: PtRegs,
        symbols: KernelSymbols,
        layout: TaskLayout | None,
        memory: GuestMemory | None = None,
        task: tuple[str, int] | None = None,
        fixed: Mapping[str, int] | None = None,
        stack_aliases: Mapping[int, int] | None = None,
    ) -> None:
        assert regs.memory is not None
        self._regs = regs
        self._memory: GuestMemory = memory or regs.memory
        self._symbols = symbols
        self._layout = layout
        self._task = task
        self._fixed = fixed or {}
        self._aliases = stack_aliases or {}

    def reg(self, name: str) -> int:
        fixed = self._fixed.get(name)
        if fixed is not None and name in _REGISTERS:
            return fixed
        if name == "orig_ax":
            return MASK64  # the int3 entry pushes -1: no system call number
        below = self._fixed.get(RETURN_FRAME_CS)
        if name == "cs" and below is not None:
            # our trampoline leaves that word as the function left it (rethook.py)
            stale = self._memory.u64((self._regs.sp - below) & MASK64)
            return (stale & ~0xFFFF & MASK64) | (self._regs.cs & 0xFFFF)
        return self._regs[name]

    def read(self, address: int, size: int) -> bytes:
        return self._memory.read(address, size)

    def read_user(self, address: int, size: int) -> bytes:
        # In kernel mode the vCPU's CR3 maps the current task's user half (also with PTI:
        # the kernel page tables keep the user mappings).
        return self._memory.read(address, size)

    def symbol_address(self, name: str) -> int:
        address = lookup_symbol(self._symbols, name)
        if address is None:
            raise KeyError(name)
        return address

    def describe(self, address: int) -> str:
        return self._symbols.describe(address)

    def comm(self) -> str:
        return self.task()[0]

    def retval(self) -> int:
        return self._regs.ax

    def stack(self, n: int) -> int:
        """regs_get_kernel_stack_nth(): 0 when the word is off the task's stack."""
        if n == 0 and HIJACKED_RETURN in self._fixed:
            return self._fixed[HIJACKED_RETURN]
        sp = self._regs.sp
        address = (sp + 8 * n) & MASK64
        if address & ~(THREAD_SIZE - 1) != sp & ~(THREAD_SIZE - 1):
            return 0
        try:
            word = self._memory.u64(address)
        except GuestFaultError:
            return 0
        return self._aliases.get(word, word)

    def task(self) -> tuple[str, int]:
        """``current``'s comm and pid (``<...>``, -1 without the kernel's BTF or on a fault)."""
        if self._task is None:
            self._task = self._read_task()
        return self._task

    def _read_task(self) -> tuple[str, int]:
        layout = self._layout
        if layout is None:
            return _UNKNOWN_COMM, -1
        try:
            task = layout.current_task(self._memory, self._regs.gs_base)
            # comm and pid in one read when they are close (one gdbstub round trip).
            low = min(layout.pid, layout.comm)
            high = max(layout.pid + 4, layout.comm + TASK_COMM_LEN)
            if high - low <= 1024:
                raw = self._memory.read(task + low, high - low)
                pid = int.from_bytes(raw[layout.pid - low : layout.pid - low + 4], "little",
                                     signed=True)
                comm = raw[layout.comm - low : layout.comm - low + TASK_COMM_LEN]
                return comm.split(b"\0", 1)[0].decode(errors="replace"), pid
            return layout.comm_of(self._memory, task), layout.pid_of(self._memory, task)
        except GuestFaultError:
            return _UNKNOWN_COMM, -1


@dataclass(eq=False)
class PlacedEvent:
    """One planned event and the engine probe that carries it."""

    plan: PlannedProbe
    probe: Kprobe | Kretprobe
    hits: int = 0
    """Hits handled on the host (a count-only recorded event is counted by the guest)."""
    entry: Kprobe | None = None
    """A return probe's entry kprobe, kept from its registration: unregistering drops
    ``probe.kp``, and the errors of its handler are still to be reported after."""

    def handler_errors(self) -> list[str]:
        """The exceptions this event's handlers raised, formatted (the engine keeps them)."""
        return self.probe.errors + (self.entry.errors if self.entry is not None else [])


_Emit = Callable[
    [tuple[tuple[FetchArg, ArgValue], ...], str, int, int, int, str, str | None,
     tuple[tuple[str, ...], str | None] | None],
    None,
]  # fmt: skip
"""An event's hit handed on: (values, comm, pid, cpu, timestamp_ns, where, function,
stack)."""


@dataclass(frozen=True)
class HitBuilder:
    """What the handlers of one session share: the guest's symbols and task layout (read
    before any hit, on the caller's thread), where hits go, and how they are stamped."""

    symbols: KernelSymbols
    layout: TaskLayout | None
    sink: Callable[[EventHit], None]
    clock: Callable[[], int]
    started_ns: int
    """The clock when the probes were placed: stopped hits are stamped relative to it."""
    count_only: bool
    tsc_khz: int
    """The guest's TSC rate, for a recorded hit's timestamp (0: not known)."""
    stack_aliases: dict[int, int] = field(default_factory=dict)
    """Stack words read as the kernel would have them (see :class:`HitContext`); filled
    once the return trampoline is in place."""
    kernel_trampoline: int = 0
    """The kernel's own return trampoline (0: unknown)."""
    kretprobed: bool = True
    """The kernel prints a return to its trampoline as :data:`KRETPROBED` (the
    kretprobed rule); else as the trampoline's symbol."""
    stacktrace: bool = False
    """Each entry hit carries the kernel stack (``options/stacktrace``), unwound on the
    host (``Kprobe(stack=True)``)."""

    def place(
        self, plan: PlannedProbe, spec: RecordSpec | None, *, hijacked: bool = False
    ) -> PlacedEvent:
        """The engine probe for ``plan``, not registered yet: recorded with ``spec`` when
        given, else stopping the guest at each hit (at the return for a return probe).
        ``hijacked``: a return probe on the same function runs before this event in the
        kernel, so its return address reads as the kernel's trampoline."""
        res = plan.resolved
        counter: list[PlacedEvent] = []  # filled below: the handler counts on its event
        probe: Kprobe | Kretprobe
        if spec is not None and res.event.is_return:
            recorded = self._recorded(plan, counter)
            hooked_r = self._hooked()

            def recorded_return(ri: KretprobeInstance, regs: PtRegs) -> None:
                where = hooked_r if ri.chained else self.symbols.describe(ri.ret_addr)
                recorded(regs, where, res.where)

            probe = Kretprobe(addr=res.address, handler=recorded_return,
                              maxactive=res.event.maxactive, record=spec)  # fmt: skip
        elif spec is not None:
            recorded_entry, where = self._recorded(plan, counter), res.where

            def recorded_pre(kp: Kprobe, regs: PtRegs) -> None:
                recorded_entry(regs, where, None)

            probe = Kprobe(
                addr=res.address, pre_handler=recorded_pre, record=spec, stack=self.stacktrace
            )
        elif res.event.is_return:
            hit, describe = self._stopped(plan, counter, False), self.symbols.describe
            hooked = self._hooked()

            def ret_handler(ri: KretprobeInstance, regs: PtRegs) -> None:
                hit(regs, hooked if ri.chained else describe(ri.ret_addr), res.where)

            probe = Kretprobe(addr=res.address, handler=ret_handler, maxactive=res.event.maxactive)
        else:
            hit, where = self._stopped(plan, counter, hijacked), res.where

            def pre_handler(kp: Kprobe, regs: PtRegs) -> None:
                hit(regs, where, None)

            probe = Kprobe(addr=res.address, pre_handler=pre_handler, stack=self.stacktrace)
        placed = PlacedEvent(plan, probe)
        counter.append(placed)
        return placed

    def _hooked(self) -> str:
        """Where the kernel's instance of a call another return probe hooked first
        returns: that probe's trampoline (the kretprobed rule says how that prints)."""
        if not self.kretprobed and self.kernel_trampoline:
            return self.symbols.describe(self.kernel_trampoline)
        return KRETPROBED

    def _emitter(self, plan: PlannedProbe) -> _Emit:
        sink, ev = self.sink, plan.resolved.event
        flags = _context_flags(plan)

        def emit(
            values: tuple[tuple[FetchArg, ArgValue], ...], comm: str, pid: int, cpu: int,
            timestamp_ns: int, where: str, function: str | None,
            stack: tuple[tuple[str, ...], str | None] | None = None,
        ) -> None:
            sink(EventHit(
                event=ev.event, group=ev.group, comm=comm, pid=pid, cpu=cpu,
                timestamp_ns=timestamp_ns, where=where, args=values, function=function,
                flags=flags, stack=stack[0] if stack else None,
                stack_cut=stack[1] if stack else None,
            ))  # fmt: skip

        return emit

    def _stopped(
        self, plan: PlannedProbe, counter: list[PlacedEvent], hijacked: bool
    ) -> Callable[[PtRegs, str, str | None], None]:
        """The handler body of a hit that stops the guest: (regs, where, function)."""
        res = plan.resolved
        symbols, layout, clock, args = self.symbols, self.layout, self.clock, res.args
        count_only, started_ns, emit = self.count_only, self.started_ns, self._emitter(plan)
        fixed, aliases = _fixed_regs(plan), self.stack_aliases
        if hijacked and self.kernel_trampoline:
            fixed[HIJACKED_RETURN] = self.kernel_trampoline
        predictor = ReadPredictor()

        def hit(regs: PtRegs, where: str, function: str | None) -> None:
            """One hit of this event: count it, and unless counting only, fetch its args
            (with the reads the last hit on this vCPU made sent ahead with the ``g``)."""
            counter[0].hits += 1
            if count_only:
                return
            now = clock()
            assert regs.memory is not None
            reader = HitReader(regs.memory)
            reader.read_ahead(regs, predictor.guess(regs.cpu))
            ctx = HitContext(
                regs, symbols, layout, memory=reader, fixed=fixed, stack_aliases=aliases
            )
            values = tuple((a, a.fetch(ctx)) for a in args)
            comm, pid = ctx.task()
            predictor.remember(regs.cpu, reader.reads)
            stack = _stack_lines(regs, symbols)
            emit(values, comm, pid, regs.cpu, now - started_ns, where, function, stack)

        return hit

    def _recorded(
        self, plan: PlannedProbe, counter: list[PlacedEvent]
    ) -> Callable[[PtRegs, str, str | None], None]:
        """The handler body of a recorded event, run on the host after the hit:
        (regs, where, function)."""
        res = plan.resolved
        symbols, layout, tsc_khz, args = self.symbols, self.layout, self.tsc_khz, res.args
        emit = self._emitter(plan)
        fixed, aliases = _fixed_regs(plan), self.stack_aliases

        def recorded(regs: PtRegs, where: str, function: str | None) -> None:
            """A hit the guest recorded: the same fetch, against the record."""
            assert isinstance(regs, RecordedRegs) and regs.memory is not None
            counter[0].hits += 1
            r = regs.record
            ctx = HitContext(
                regs, symbols, layout, memory=regs.memory, task=(r.comm, r.pid), fixed=fixed,
                stack_aliases=aliases,
            )  # fmt: skip
            values = tuple((a, a.fetch(ctx)) for a in args)
            timestamp = r.tsc * 1_000_000 // tsc_khz if tsc_khz else 0
            stack = _stack_lines(regs, symbols)
            emit(values, r.comm, r.pid, r.cpu, timestamp, where, function, stack)

        return recorded


def _stack_lines(
    regs: PtRegs, symbols: KernelSymbols
) -> tuple[tuple[str, ...], str | None] | None:
    """The hit's stack (from ``Kprobe(stack=True)``) as ``%pS`` entries, and why it was
    cut short if it was; None without one."""
    if regs.stack is None:
        return None
    return tuple(symbols.describe(addr) for addr in regs.stack.entries), regs.stack.error


def _fixed_regs(plan: PlannedProbe) -> dict[str, int]:
    """Registers the kernel's handler sees otherwise than our engine's stop shows them.

    At an entry probe ``ip`` is one past the probe (int3 leaves it there; the kernel's
    ftrace and jump-optimized paths set it so); ``orig_ax`` is -1 on the int3 path and
    0 where ftrace built the registers. A return probe's registers are the engine's,
    but for ``%cs`` on a kernel whose return trampoline sets only its low 16 bits.
    """
    if plan.event.is_return:
        return {RETURN_FRAME_CS: _KERNEL_CS_FRAME} if plan.rules.selector_cs else {}
    fixed = {"ip": (plan.resolved.address + 1) & MASK64}
    if plan.ftrace:
        fixed["orig_ax"] = 0
    return fixed


def _context_flags(plan: PlannedProbe) -> str:
    """The latency flags the kernel's line shows for this probe (see ``format``)."""
    if plan.event.is_return or plan.ftrace:
        return FTRACE_CONTEXT_FLAGS
    return INT3_CONTEXT_FLAGS
