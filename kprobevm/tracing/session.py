"""A tracing session: kprobe_events definitions placed in a guest, one hit per line.

What ``kprobevm trace`` and ``kprobevm count`` (and the pytest plugin's ``events``) run:
:func:`plan_events` resolves parsed definitions against the guest's symbols and
instruction boundaries with the kernel's registration checks, touching nothing;
:class:`TraceSession` places them (kprobes for ``p``, kretprobes for ``r``), records
each hit as an :class:`~kprobevm.tracing.EventHit` on the engine's trap thread and hands
it over through a queue, so printing never holds the guest stopped.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from kprobevm.errors import AmbiguousSymbol, GuestFaultError, KprobeError
from kprobevm.gdbstub.readahead import HitReader, ReadPredictor
from kprobevm.kernel.tasks import TASK_COMM_LEN
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance
from kprobevm.kprobes.recorder import RecordedRegs, RecordSpec
from kprobevm.tracing import (
    EventDeletion,
    EventHit,
    FetchArg,
    ProbeEvent,
    ResolvedEvent,
    parse_event,
    resolve_event,
)
from kprobevm.tracing.capture import DEFAULT_STRING_SIZE, MODES, Unrecordable, record_spec
from kprobevm.tracing.errors import probe_error
from kprobevm.tracing.fetch import (
    THREAD_SIZE,
    Arg,
    ArgValue,
    Comm,
    Deref,
    FetchSource,
    Imm,
    ImmString,
    Reg,
    Retval,
    Stack,
    StackPointer,
    SymbolAddress,
)
from kprobevm.tracing.registry import EventRegistry
from kprobevm.x86.constants import MASK64
from kprobevm.x86.insn import Insn, InsnKind, check_boundary, decode

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.guest.vm import VM
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.x86.ptregs import PtRegs

__all__ = [
    "TIMESTAMP_NOTE",
    "HitContext",
    "PlannedProbe",
    "TraceSession",
    "args_of",
    "check_definitions",
    "fetch_plan",
    "plan_events",
]

log = logging.getLogger(__name__)

TIMESTAMP_NOTE = (
    "timestamps are host monotonic time since the probes were placed: the guest's trace "
    "clock (local_clock) cannot be read from the host"
)

MAX_INSN_SIZE = 15
_UNKNOWN_COMM = "<...>"  # what the trace file prints for a pid with no saved comm


def args_of(hit: EventHit) -> dict[str, ArgValue]:
    """A hit's argument values by name (``bytes`` for strings, ``None`` for a fault)."""
    return {arg.name: value for arg, value in hit.args}


# --- One hit: the FetchContext over a stopped vCPU -------------------------------------


class HitContext:
    """The stopped guest as fetch arguments see it: registers, memory, ``current``.

    Only guest memory through the gdbstub (``regs.memory``): a handler runs with the VM
    stopped on the trap thread, where SSH would deadlock.
    """

    __slots__ = ("_layout", "_memory", "_regs", "_symbols", "_task")

    def __init__(
        self,
        regs: PtRegs,
        symbols: KernelSymbols,
        layout: TaskLayout | None,
        memory: GuestMemory | None = None,
        task: tuple[str, int] | None = None,
    ) -> None:
        assert regs.memory is not None
        self._regs = regs
        self._memory: GuestMemory = memory or regs.memory
        self._symbols = symbols
        self._layout = layout
        self._task = task

    def reg(self, name: str) -> int:
        if name == "orig_ax":
            return MASK64  # the int3 entry pushes -1: no system call number
        return self._regs[name]

    def read(self, address: int, size: int) -> bytes:
        return self._memory.read(address, size)

    def read_user(self, address: int, size: int) -> bytes:
        # In kernel mode the vCPU's CR3 maps the current task's user half (also with PTI:
        # the kernel page tables keep the user mappings).
        return self._memory.read(address, size)

    def symbol_address(self, name: str) -> int:
        try:
            return self._symbols[name]
        except AmbiguousSymbol as exc:
            if not exc.addresses:
                raise KeyError(name) from exc
            return exc.addresses[0]

    def describe(self, address: int) -> str:
        return self._symbols.describe(address)

    def comm(self) -> str:
        return self.task()[0]

    def retval(self) -> int:
        return self._regs.ax

    def stack(self, n: int) -> int:
        """regs_get_kernel_stack_nth(): 0 when the word is off the task's stack."""
        sp = self._regs.sp
        address = (sp + 8 * n) & MASK64
        if address & ~(THREAD_SIZE - 1) != sp & ~(THREAD_SIZE - 1):
            return 0
        try:
            return self._memory.u64(address)
        except GuestFaultError:
            return 0

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


# --- Planning: the kernel's checks, nothing written ------------------------------------


def _source_plan(src: FetchSource) -> str:
    """How a fetch source is read, innermost first (the kernel's fetch_insn chain)."""
    match src:
        case Reg(name):
            return f"reg {name}"
        case Stack(n):
            return f"stack word {n}"
        case StackPointer():
            return "reg sp"
        case Retval():
            return "reg ax at return"
        case Comm():
            return "current->comm"
        case Arg(n):
            regs = ("di", "si", "dx", "cx", "r8", "r9")
            return f"reg {regs[n - 1]}" if n <= len(regs) else f"stack word {n - len(regs)}"
        case Imm(value):
            return f"imm {value:#x}"
        case ImmString(data):
            return f"imm string {data!r}"
        case SymbolAddress(expr, _, _, address):
            where = f"{address:#x}" if address is not None else "unresolved"
            return f"address of {expr} ({where})"
        case Deref(offset, inner, user):
            space = "user" if user else "kernel"
            return f"{_source_plan(inner)} -> {space} load at {offset:+#x}"
    return repr(src)


def fetch_plan(arg: FetchArg) -> str:
    """One argument's fetch plan in words (``reg si -> user string``)."""
    src = arg.source
    kind = arg.type.kind
    if kind in ("string", "ustring") and isinstance(src, Deref):
        space = "user" if src.user or kind == "ustring" else "kernel"
        text = f"{_source_plan(src.inner)} -> {space} string at {src.offset:+#x}"
    elif kind in ("string", "ustring") and not isinstance(src, Comm | ImmString):
        space = "user" if kind == "ustring" else "kernel"
        text = f"{_source_plan(src)} -> {space} string"
    else:
        text = _source_plan(src)
        if isinstance(src, Deref):
            text = text.rsplit(" -> ", 1)[0] + (
                f" -> {'user' if src.user else 'kernel'} {arg.type.size}-byte load"
                f" at {src.offset:+#x}"
            )
    if kind == "string" and "user string" not in text and isinstance(src, Deref):
        # x86_64 6.1 refuses kernel reads of user addresses: a user pointer needs ustring.
        text += " (a user pointer reads (fault): use :ustring or +u)"
    return f"{arg.name}={arg.comm}: {text}"


def _execution(insn: Insn) -> str:
    """How the displaced instruction runs (copied to a slot, or an equivalent sequence)."""
    if insn.kind is InsnKind.PLAIN:
        fixup = ", rip-relative displacement fixed up" if insn.rip_disp_offset is not None else ""
        return f"slot: copied{fixup}"
    return f"slot: emulated ({insn.kind.value})"


@dataclass(frozen=True)
class PlannedProbe:
    """One definition resolved against the guest: where it goes and how it would run."""

    resolved: ResolvedEvent
    insn: Insn

    @property
    def event(self) -> ProbeEvent:
        return self.resolved.event

    def describe(self) -> str:
        """What ``trace --dry-run`` prints for this definition (several lines)."""
        ev, res, insn = self.event, self.resolved, self.insn
        kind = "kretprobe" if ev.is_return else "kprobe"
        lines = [
            f"{ev.group}/{ev.event}: {kind} at {res.address:#018x} ({res.where})",
            f"  insn: {insn.bytes.hex(' ')}  {insn.mnemonic} {insn.op_str}".rstrip(),
            f"  runs: {_execution(insn)}",
        ]
        if ev.is_return:
            lines.append(f"  maxactive: {ev.maxactive or 'default'}")
        lines += [f"  fetch {fetch_plan(arg)}" for arg in res.args]
        return "\n".join(lines)


def _position_of_place(event: ProbeEvent) -> int:
    """Where the kernel's caret goes for a registration error: the probe point (word 1)."""
    return len(event.command.split(" ", 1)[0]) + 1


def _boundary_checker(vm: VM) -> Callable[[int], bool]:
    def is_boundary(address: int) -> bool:
        sym = vm.symbols.lookup(address)
        if sym is None:
            return False
        # probes placed already read as the bytes they replaced
        code = vm.original_text(
            sym.address, min(sym.size, address - sym.address + MAX_INSN_SIZE)
        )
        try:
            check_boundary(code, sym.address, address, sym.name)
        except KprobeError:
            return False
        return True

    return is_boundary


def guest_event_names(vm: VM, events: Sequence[ProbeEvent]) -> set[tuple[str, str]]:
    """Which of the events' GROUP/EVENT names the guest's tracefs already has."""
    names = sorted({f"{e.group}/{e.event}" for e in events})
    if not names:
        return set()
    # names are C identifiers (parse_event checked them): safe in a shell word
    found = vm.run(
        "cd /sys/kernel/tracing/events 2>/dev/null || exit 0;"
        f" for e in {' '.join(names)}; do [ -d $e ] && echo $e; done; true"
    ).stdout.split()
    return {(g, e) for g, _, e in (name.partition("/") for name in found)}


def plan_events(vm: VM, events: Sequence[ProbeEvent]) -> list[PlannedProbe]:
    """Resolve every event with the kernel's checks; reads the guest, writes nothing.

    Raises :class:`ProbeSyntaxError` as the kernel's ``error_log`` would: BAD_PROBE_ADDR,
    NON_UNIQ_SYMBOL, BAD_RETPROBE, BAD_INSN_BNDRY, FAIL_REG_PROBE for a blacklisted
    address or an instruction that cannot be probed, and the registry's EVENT_EXIST,
    DIFF_PROBE_TYPE, DIFF_ARG_TYPE and SAME_PROBE (:mod:`kprobevm.tracing.registry`).
    """
    boundary = _boundary_checker(vm)
    registry = EventRegistry(existing=guest_event_names(vm, events))
    planned = []
    for event in events:
        # the kernel checks a join with an existing event before the address, and a
        # new name against the guest's events after it (register_trace_kprobe)
        joins = (event.group, event.event) in registry.events
        if joins:
            registry.add(event)
        resolved = resolve_event(event, vm.symbols, is_insn_boundary=boundary)
        if not joins:
            registry.add(event)
        position = _position_of_place(event)
        entry = vm.kprobe_blacklist.within_kprobe_blacklist(resolved.address)
        if entry is not None:
            raise probe_error(
                "FAIL_REG_PROBE", position, event.command,
                f"{resolved.where} is in the kprobe blacklist ({entry.symbol})",
            )  # fmt: skip
        try:
            insn = decode(vm.read(resolved.address, MAX_INSN_SIZE), resolved.address)
        except KprobeError as exc:
            raise probe_error("FAIL_REG_PROBE", position, event.command, str(exc)) from exc
        if insn.is_refused:
            raise probe_error(
                "FAIL_REG_PROBE", position, event.command,
                f"cannot probe `{insn.mnemonic} {insn.op_str}`: {insn.refusal}",
            )  # fmt: skip
        planned.append(PlannedProbe(resolved, insn))
    return planned


# --- The session --------------------------------------------------------------------------


@dataclass(eq=False)
class _Placed:
    """One planned event and the engine object that carries it."""

    plan: PlannedProbe
    probe: Kprobe | Kretprobe
    hits: int = 0


@dataclass(eq=False)
class TraceSession:
    """Planned events placed in ``vm``; hits are queued as :class:`EventHit` values.

    ``count_only`` records nothing but the counts (no fetch, the cheapest handler).
    ``on_hit``, when given, receives each hit on the trap thread (keep it short) instead
    of the queue. Use as a context manager: leaving it unregisters everything.
    """

    vm: VM
    plan: Sequence[PlannedProbe]
    count_only: bool = False
    on_hit: Callable[[EventHit], None] | None = None
    clock: Callable[[], int] = time.monotonic_ns
    mode: str = "auto"
    string_size: int = DEFAULT_STRING_SIZE
    """Bytes a recorded string keeps (its NUL included)."""
    recorded: bool = field(default=False, init=False)
    """Whether the events are recorded by the guest (decided in :meth:`start`)."""
    _specs: list[RecordSpec | None] = field(default_factory=list, init=False, repr=False)
    _tsc_khz: int = field(default=0, init=False, repr=False)
    hits: queue.SimpleQueue[EventHit] = field(default_factory=queue.SimpleQueue, init=False)
    placed: list[_Placed] = field(default_factory=list, init=False)
    finished: list[_Placed] = field(default_factory=list, init=False)
    started_ns: int = field(default=0, init=False)

    def start(self) -> None:
        """Place every probe; on a failure, remove those already placed and re-raise."""
        vm = self.vm
        # Filled now, on this thread: the handlers must never reach for SSH.
        symbols, layout = vm.symbols, vm.task_layout
        if layout is None:
            log.warning("no kernel BTF (vmlinux): comm and pid of hits are unknown")
        self._choose_mode(layout is not None)
        placed = [
            self._place_for(p, symbols, layout, spec)
            for p, spec in zip(self.plan, self._specs, strict=True)
        ]
        self.started_ns = self.clock()
        # One registration per probe: vm.register_kprobes() (one stop for the batch)
        # fails on the 6.1 engine when the first probe installs the trap channel.
        try:
            for p in placed:
                if isinstance(p.probe, Kretprobe):
                    vm.register_kretprobe(p.probe)
                else:
                    vm.register_kprobe(p.probe)
                self.placed.append(p)
        except BaseException:
            self.stop()
            raise

    def _choose_mode(self, have_btf: bool) -> None:
        """Record every event when ``mode`` allows and each can be; else stop at each hit."""
        if self.mode not in MODES:
            raise KprobeError(f"trace mode {self.mode!r} is not one of {', '.join(MODES)}")
        specs, why = record_specs(
            self.vm, self.plan, count_only=self.count_only, string_size=self.string_size,
            have_btf=have_btf,
        )  # fmt: skip
        if self.mode == "record" and why:
            raise KprobeError(f"cannot record these events: {why}")
        self.recorded = self.mode != "stop" and not why
        self._specs = [*specs] if self.recorded else [None] * len(self.plan)
        if self.recorded and not self.count_only:
            raw = self.vm.read(self.vm.symbols["tsc_khz"], 4)
            self._tsc_khz = int.from_bytes(raw, "little")

    def flush(self) -> None:
        """Bring every hit the guest has recorded so far into the queue."""
        if self.recorded and self.placed:
            self.vm.kprobes.flush_records()

    def stop(self) -> None:
        """Unregister everything placed (idempotent); calls in flight still return safely."""
        placed, self.placed = self.placed, []
        self.finished = placed
        errors: list[BaseException] = []
        for p in reversed(placed):
            try:
                if isinstance(p.probe, Kretprobe):
                    if p.probe.registered:
                        self.vm.unregister_kretprobe(p.probe)
                elif p.probe.registered:
                    self.vm.unregister_kprobe(p.probe)
            except BaseException as exc:  # try the others, then report the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def counts(self) -> list[tuple[PlannedProbe, int]]:
        """Hits per planned event, in plan order."""
        placed = self.placed or self.finished
        if self.recorded and self.count_only:  # counted by the guest
            return [(p.plan, p.probe.nhit) for p in placed]
        return [(p.plan, p.hits) for p in placed]

    def missed(self) -> int:
        """Hits the engine could not record (kretprobe maxactive reached, the record ring
        full, or a recorded probe hit inside another record on the same CPU)."""
        placed = self.placed or self.finished
        return sum(p.probe.nmissed for p in placed)

    def handler_errors(self) -> list[str]:
        """Exceptions the handlers raised (the engine catches and keeps them)."""
        placed = self.placed or self.finished
        out: list[str] = []
        for p in placed:
            if isinstance(p.probe, Kprobe):
                out += p.probe.errors
            else:  # a return probe's own handler, and the entry kprobe it runs through
                out += p.probe.errors
                if p.probe.kp is not None:
                    out += p.probe.kp.errors
        return out

    def drain(self) -> Iterator[EventHit]:
        """The hits queued so far (without waiting)."""
        while True:
            try:
                yield self.hits.get_nowait()
            except queue.Empty:
                return

    # -- handlers (trap thread, VM stopped) -------------------------------------------

    def _place_for(
        self,
        plan: PlannedProbe,
        symbols: KernelSymbols,
        layout: TaskLayout | None,
        spec: RecordSpec | None,
    ) -> _Placed:
        res = plan.resolved
        ev = res.event
        args = res.args
        sink = self.on_hit or self.hits.put
        clock = self.clock
        counter: list[_Placed] = []  # filled below: the handler counts on its _Placed
        predictor = ReadPredictor()

        def emit(
            values: tuple[tuple[FetchArg, ArgValue], ...], comm: str, pid: int, cpu: int,
            timestamp_ns: int, where: str, function: str | None,
        ) -> None:
            sink(EventHit(
                event=ev.event, group=ev.group, comm=comm, pid=pid, cpu=cpu,
                timestamp_ns=timestamp_ns, where=where, args=values, function=function,
            ))  # fmt: skip

        def hit(regs: PtRegs, where: str, function: str | None) -> None:
            """One hit of this event: count it, and unless counting only, fetch its args
            (with the reads the last hit on this vCPU made sent ahead with the ``g``)."""
            counter[0].hits += 1
            if self.count_only:
                return
            now = clock()
            assert regs.memory is not None
            reader = HitReader(regs.memory)
            reader.read_ahead(regs, predictor.guess(regs.cpu))
            ctx = HitContext(regs, symbols, layout, memory=reader)
            values = tuple((a, a.fetch(ctx)) for a in args)
            comm, pid = ctx.task()
            predictor.remember(regs.cpu, reader.reads)
            emit(values, comm, pid, regs.cpu, now - self.started_ns, where, function)

        probe: Kprobe | Kretprobe
        if spec is not None:
            tsc_khz = self._tsc_khz

            def recorded(kp: Kprobe, regs: PtRegs) -> None:
                """A hit the guest recorded: the same fetch, against the record."""
                assert isinstance(regs, RecordedRegs) and regs.memory is not None
                counter[0].hits += 1
                r = regs.record
                ctx = HitContext(regs, symbols, layout, memory=regs.memory,
                                 task=(r.comm, r.pid))  # fmt: skip
                values = tuple((a, a.fetch(ctx)) for a in args)
                timestamp = r.tsc * 1_000_000 // tsc_khz if tsc_khz else 0
                emit(values, r.comm, r.pid, r.cpu, timestamp, res.where, None)

            probe = Kprobe(addr=res.address, pre_handler=recorded, record=spec)
        elif ev.is_return:

            def ret_handler(ri: KretprobeInstance, regs: PtRegs) -> None:
                hit(regs, symbols.describe(ri.ret_addr), res.where)

            probe = Kretprobe(addr=res.address, handler=ret_handler, maxactive=ev.maxactive)
        else:
            where = res.where

            def pre_handler(kp: Kprobe, regs: PtRegs) -> None:
                hit(regs, where, None)

            probe = Kprobe(addr=res.address, pre_handler=pre_handler)
        holder = _Placed(plan, probe)
        counter.append(holder)
        return holder

    def __enter__(self) -> TraceSession:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def record_specs(
    vm: VM,
    plan: Sequence[PlannedProbe],
    *,
    count_only: bool = False,
    string_size: int = DEFAULT_STRING_SIZE,
    have_btf: bool = True,
) -> tuple[list[RecordSpec], str]:
    """Each event's record spec, or why the events cannot all be recorded ("" if they can)."""
    specs: list[RecordSpec] = []
    for p in plan:
        ev = p.resolved.event
        if ev.is_return:
            return specs, f"{ev.group}/{ev.event} is a return probe"
        if not have_btf:
            return specs, "the record program needs the kernel's BTF"
        if not vm.kprobes.channel.records:
            return specs, f"the {vm.kprobes.channel.name} channel does not record"
        if count_only:
            specs.append(RecordSpec(count_only=True))
            continue
        try:
            specs.append(record_spec(p.resolved.args, string_size=string_size))
        except Unrecordable as exc:
            return specs, f"{ev.group}/{ev.event}: {exc}"
    return specs, ""


def check_definitions(texts: Sequence[str]) -> tuple[list[ProbeEvent], list[str]]:
    """Parse definitions without a guest; deletions (``-:``) come back as notes."""
    events: list[ProbeEvent] = []
    notes: list[str] = []
    for text in texts:
        parsed = parse_event(text)
        if isinstance(parsed, EventDeletion):
            notes.append(f"ignored {text!r}: a new session has no events to delete")
            continue
        events.append(parsed)
    return events, notes

