"""Planning a trace session: definitions checked and resolved in the guest, nothing written.

:func:`check_definitions` parses without a guest; :func:`plan_events` resolves parsed
events against the guest's symbols and instruction boundaries with the kernel's
registration checks, reading the guest only; each :class:`PlannedProbe` can say how it
would run (``trace --dry-run``); :func:`record_specs` says whether the guest can record
the events itself or must stop at each hit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeError
from kprobevm.kernel.patchsites import FTRACE_NOP
from kprobevm.kprobes.recorder import PROGRAM_SIZE, RecordSpec, program_size
from kprobevm.tracing.btf_args import FunctionPrototype, function_prototype
from kprobevm.tracing.capture import DEFAULT_STRING_SIZE, Unrecordable, record_spec
from kprobevm.tracing.errors import probe_error
from kprobevm.tracing.events import EventDeletion, ProbeEvent, ResolvedEvent
from kprobevm.tracing.fetch import Comm, Deref, FetchArg, ImmString, describe_source
from kprobevm.tracing.kernel_rules import LATEST, KernelRules, kernel_rules
from kprobevm.tracing.parse import GuestKernel, parse_event
from kprobevm.tracing.registry import EventRegistry
from kprobevm.tracing.resolve import EntryAdjust, resolve_event
from kprobevm.x86.arch import adjust_kprobe_addr
from kprobevm.x86.insn import MAX_INSN_SIZE, Insn, InsnKind, check_boundary, decode

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "PlannedProbe",
    "check_definitions",
    "fetch_plan",
    "guest_event_names",
    "guest_kernel",
    "plan_events",
    "record_specs",
]

log = logging.getLogger(__name__)


def _kernel_space(arg: FetchArg) -> str:
    """What a kernel-space read of ``arg`` reads (the mixed_reads rule: user below TASK_SIZE)."""
    return "kernel (user below TASK_SIZE)" if arg.mixed else "kernel"


def fetch_plan(arg: FetchArg) -> str:
    """One argument's fetch plan in words (``reg si -> user string``)."""
    src = arg.source
    kind = arg.type.kind
    if kind in ("string", "ustring") and isinstance(src, Deref):
        space = "user" if src.user or kind == "ustring" else _kernel_space(arg)
        text = f"{describe_source(src.inner)} -> {space} string at {src.offset:+#x}"
    elif kind in ("string", "ustring") and not isinstance(src, Comm | ImmString):
        space = "user" if kind == "ustring" else "kernel"
        text = f"{describe_source(src)} -> {space} string"
    else:
        text = describe_source(src)
        if isinstance(src, Deref):
            text = text.rsplit(" -> ", 1)[0] + (
                f" -> {'user' if src.user else _kernel_space(arg)} {arg.type.size}-byte load"
                f" at {src.offset:+#x}"
            )
    if kind == "string" and not arg.mixed and "user" not in text and isinstance(src, Deref):
        # A kernel without the mixed_reads rule refuses kernel reads of user addresses.
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
    """The instruction the int3 displaces (past the NOP on a function's ftrace site)."""
    place: int
    """Where the int3 goes."""
    ftrace: bool = False
    """The guest kernel would place this probe through ftrace (a function's ftrace call
    site, on a kernel with the ftrace_kprobes rule): its lines show that context."""
    rules: KernelRules = LATEST
    """The guest kernel's rules this probe was planned with."""

    @property
    def event(self) -> ProbeEvent:
        """The definition as parsed."""
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
        if self.place != res.address:
            lines.insert(1, f"  ftrace site: the int3 goes past the NOP, at {self.place:#018x}")
        if ev.is_return:
            lines.append(f"  maxactive: {ev.maxactive or 'default'}")
        lines += [f"  fetch {fetch_plan(arg)}" for arg in res.args]
        return "\n".join(lines)


def _position_of_place(event: ProbeEvent) -> int:
    """Where the kernel's caret goes for a registration error: the probe point (word 1)."""
    return len(event.command.split(" ", 1)[0]) + 1


def _boundary_checker(vm: VM) -> Callable[[int], bool]:
    """Whether an address of ``vm``'s kernel starts an instruction of its function."""

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
    if vm.endpoints.ssh is None:
        return _events_in_memory(vm, names)
    # names are C identifiers (parse_event checked them): safe in a shell word
    found = vm.run(
        "cd /sys/kernel/tracing/events 2>/dev/null || exit 0;"
        f" for e in {' '.join(names)}; do [ -d $e ] && echo $e; done; true"
    ).stdout.split()
    return {(g, e) for g, _, e in (name.partition("/") for name in found)}


def _events_in_memory(vm: VM, names: list[str]) -> set[tuple[str, str]]:
    """Which of ``names`` the kernel's own event list has, read from guest memory (no
    SSH to look at tracefs); none, said on stderr, when it cannot be read."""
    from kprobevm.errors import KprobeVMError
    from kprobevm.kernel.trace_events_list import trace_event_names

    head, btf = vm.symbols.get("ftrace_events"), vm.btf
    try:
        if head is None or btf is None:
            raise KprobeVMError("no ftrace_events in kallsyms, or no BTF to read it by")
        with vm.target.stopped():
            events = trace_event_names(vm.memory.read, head, btf)
    except KprobeVMError as exc:
        log.warning("the guest's trace events are not looked up, so a name it has already"
                    " is not refused (EVENT_EXIST): %s", exc)  # fmt: skip
        return set()
    return {pair for pair in events if f"{pair[0]}/{pair[1]}" in names}


def plan_events(vm: VM, events: Sequence[ProbeEvent]) -> list[PlannedProbe]:
    """Resolve every event with the kernel's checks; reads the guest, writes nothing.

    ``events`` are parsed definitions (:func:`check_definitions`), in the order the
    kernel would take them. Returns one :class:`PlannedProbe` each, in that order.
    Raises :class:`~kprobevm.errors.ProbeSyntaxError` as the kernel's ``error_log``
    would: BAD_PROBE_ADDR, NON_UNIQ_SYMBOL, BAD_RETPROBE, BAD_INSN_BNDRY, FAIL_REG_PROBE
    for a blacklisted address or an instruction that cannot be probed, and the
    registry's EVENT_EXIST, DIFF_PROBE_TYPE, DIFF_ARG_TYPE and SAME_PROBE
    (:mod:`kprobevm.tracing.registry`).
    """
    if any(e.symbol_name is not None and e.symbol_name not in vm.symbols for e in events):
        vm.refresh_symbols()  # a module loaded since kallsyms was read
    rules = kernel_rules(vm)
    guest = guest_kernel(vm)
    split = vm.address_space
    boundary = _boundary_checker(vm)
    registry = EventRegistry(existing=guest_event_names(vm, events))
    planned = []
    for event in events:
        # parsed again as the guest's kernel parses it: its entries, rules and BTF types
        reparsed = parse_event(event.command, kernel=guest)
        assert isinstance(reparsed, ProbeEvent)
        event = reparsed
        # the kernel checks a join with an existing event before the address, and a
        # new name against the guest's events after it (register_trace_kprobe)
        joins = (event.group, event.event) in registry.events
        if joins:
            registry.add(event)
        resolved = resolve_event(event, vm.symbols, is_insn_boundary=boundary,
                                 adjust=entry_adjust(vm) if rules.ibt_entry else None)
        if not joins:
            registry.add(event)
        position = _position_of_place(event)
        entry = vm.kprobe_blacklist.within_kprobe_blacklist(resolved.address)
        if entry is not None:
            raise probe_error(
                "FAIL_REG_PROBE", position, event.command,
                f"{resolved.where} is in the kprobe blacklist ({entry.symbol})",
            )  # fmt: skip
        place = vm.kprobes.int3_place(resolved.address)
        try:
            # our own int3s read as the bytes they replaced: a definition may join a probe
            insn = decode(vm.kprobes.original_text(place, MAX_INSN_SIZE), place)
        except KprobeError as exc:
            raise probe_error("FAIL_REG_PROBE", position, event.command, str(exc)) from exc
        if insn.is_refused:
            raise probe_error(
                "FAIL_REG_PROBE", position, event.command,
                f"cannot probe `{insn.mnemonic} {insn.op_str}`: {insn.refusal}",
            )  # fmt: skip
        # the guest's rule for kernel reads of user addresses, and its paging mode's split
        resolved = replace(resolved, args=tuple(
            replace(a, mixed=rules.mixed_reads, split=split) for a in resolved.args))
        ftrace = _on_ftrace_site(vm, rules, resolved, place)
        planned.append(PlannedProbe(resolved, insn, place, ftrace, rules))
    return planned


def guest_kernel(vm: VM) -> GuestKernel:
    """``vm``'s kernel as the parser needs it: symbols, entries, rules, BTF prototypes."""
    rules = kernel_rules(vm)
    btf = vm.btf
    prototype = None
    if btf is not None:
        known: dict[str, FunctionPrototype | None] = {}

        def prototype(name: str) -> FunctionPrototype | None:
            if name not in known:
                known[name] = function_prototype(btf, name)
            return known[name]

    return GuestKernel(
        vm.symbols, rules, entry_adjust(vm) if rules.ibt_entry else None, prototype
    )


def entry_adjust(vm: VM) -> EntryAdjust | None:
    """The guest kernel's ``arch_adjust_kprobe_addr()`` (None when it is built without
    X86_KERNEL_IBT), reading a function's first bytes as they were before our probes."""
    if not vm.kprobes.ibt:
        return None

    def adjust(start: int, offset: int) -> tuple[int, bool]:
        return adjust_kprobe_addr(vm.kprobes.original_text(start, 4), offset)

    return adjust


def _on_ftrace_site(vm: VM, rules: KernelRules, resolved: ResolvedEvent, place: int) -> bool:
    """Whether the kernel would take this probe through ftrace: at a function's ftrace
    call site (the mcount table, or the ftrace NOP at an entry without a vmlinux)."""
    if not rules.ftrace_kprobes:
        return False
    if place != resolved.address or resolved.address in vm.patch_sites.ftrace:
        return True
    entry = vm.kprobes.original_text(resolved.address, len(FTRACE_NOP))
    return resolved.on_entry and entry == FTRACE_NOP


def record_specs(
    vm: VM,
    plan: Sequence[PlannedProbe],
    *,
    count_only: bool = False,
    string_size: int = DEFAULT_STRING_SIZE,
    have_btf: bool = True,
    stack_size: int = 0,
) -> tuple[list[RecordSpec], str]:
    """Each event's record spec, or why the events cannot all be recorded ("" if they can).

    ``stack_size``: bytes of kernel stack each record copies, for a stack trace (0: none).
    """
    specs: list[RecordSpec] = []
    for p in plan:
        ev = p.resolved.event
        if ev.is_return and p.rules.selector_cs and any("%cs" in a.comm for a in ev.args):
            # the kernel's frame leaves the stack's word there: read on a stop
            return specs, f"{ev.group}/{ev.event}: a return's %cs on this kernel"
        if not have_btf:
            return specs, "the record program needs the kernel's BTF"
        if not vm.can_record:
            return specs, f"the {vm.trap_channel} channel does not record"
        if count_only:
            if ev.is_return:  # the guest counts entries, not returns
                return specs, f"{ev.group}/{ev.event} is a return probe, counted on a stop"
            specs.append(RecordSpec(count_only=True))
            continue
        try:
            spec = record_spec(p.resolved.args, string_size=string_size, at_return=ev.is_return)
            specs.append(replace(spec, stack_size=stack_size))
        except Unrecordable as exc:
            return specs, f"{ev.group}/{ev.event}: {exc}"
    return specs, _program_too_large(plan, specs)


def _program_too_large(plan: Sequence[PlannedProbe], specs: Sequence[RecordSpec]) -> str:
    """Why the events of one address cannot be recorded together ("" if they can): the
    guest runs one record program per address, in a cell of :data:`PROGRAM_SIZE` bytes."""
    at: dict[int, list[int]] = {}
    for i, p in enumerate(plan):
        at.setdefault(p.place, []).append(i)
    for place, indices in at.items():
        size = program_size([specs[i] for i in indices], probe_ip=place)
        if size > PROGRAM_SIZE:
            names = ", ".join(f"{plan[i].event.group}/{plan[i].event.event}" for i in indices)
            return (
                f"{plan[indices[0]].resolved.where}: the record program of {names} takes"
                f" {size:,} bytes, over the {PROGRAM_SIZE:,} of its cell"
            )
    return ""


def check_definitions(texts: Sequence[str]) -> tuple[list[ProbeEvent], list[str]]:
    """Parse definitions without a guest: the events, and a note for each deletion
    (``-:``), which a new session has nothing to apply to. Raises the first
    :class:`~kprobevm.errors.ProbeSyntaxError`."""
    events: list[ProbeEvent] = []
    notes: list[str] = []
    for text in texts:
        parsed = parse_event(text)
        if isinstance(parsed, EventDeletion):
            notes.append(f"ignored {text!r}: a new session has no events to delete")
            continue
        events.append(parsed)
    return events, notes
