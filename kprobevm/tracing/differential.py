"""Side by side with the guest's own tracefs: the same definitions, the same workload.

The guest kernel is the oracle. :func:`run_tracefs` places definitions through the
guest's ``kprobe_events``, runs a workload and reads ``trace`` and debugfs
``kprobes/list``; :func:`run_kprobevm` places the same definitions with a
:class:`~kprobevm.tracing.session.TraceSession` on the same guest and runs the same
workload. Each side's lines are parsed into fields (:class:`TraceLine`) and
:func:`compare_lines` pairs them up, pid and timestamp aside. :func:`tracefs_errors` and
:func:`kprobevm_errors` do the same for definitions the guest rejects, as ``error_log``
entries. The two sides never share a run: each removes its probes before the other starts.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError, ProbeSyntaxError
from kprobevm.tracing.errors import ERROR_MESSAGES, UNLOGGED
from kprobevm.tracing.events import EventDeletion, ProbeEvent
from kprobevm.tracing.kernel_rules import LATEST, KernelRules, kernel_rules
from kprobevm.tracing.parse import parse_event

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

__all__ = [
    "COMPARED_FIELDS",
    "KERNEL_ONLY_FLAGS",
    "KPROBES_LIST",
    "TRACEFS",
    "Comparison",
    "DifferentialError",
    "ErrorLogEntry",
    "Mismatch",
    "Registration",
    "SideRun",
    "TraceLine",
    "compare_lines",
    "default_maxactive",
    "error_log_entry",
    "expand",
    "kprobevm_errors",
    "parse_error_log",
    "parse_kprobes_list",
    "parse_trace",
    "parse_trace_line",
    "run_kprobevm",
    "run_tracefs",
    "tracefs_errors",
]

TRACEFS = "/sys/kernel/tracing"
KPROBES_LIST = "/sys/kernel/debug/kprobes/list"

COMPARED_FIELDS = ("comm", "cpu", "event", "where", "args", "stack")
"""What two lines must share to be the same line: the task, the event, the probe point,
every argument's text and the stack trace after it (with ``options/stacktrace``). Not
the pid and timestamp (another run), nor the latency flags: the kernel's depend on how
it placed the probe (ftrace, int3, a jump once its optimizer got to it) and on
need-resched at that moment; they are counted apart."""

_LINE_RE = re.compile(
    r"^(?P<comm>.*?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<flags>\S+)\s+"
    r"(?P<ts>\d+\.\d+): (?P<event>[^:\s]+): \((?P<where>[^)]*)\)(?P<args>.*)$"
)


class DifferentialError(KprobeVMError):
    """A side of a differential run could not be run (the guest said why)."""


@dataclass(frozen=True)
class TraceLine:
    """One line of ``trace`` as fields: who, where, which event, each argument's text."""

    comm: str
    pid: int
    cpu: int
    flags: str
    timestamp: str
    event: str
    where: str
    args: tuple[tuple[str, str], ...]
    text: str = field(compare=False)
    stack: tuple[str, ...] | None = None
    """The ``<stack trace>`` entry that followed the line (``options/stacktrace``), its
    `` => `` lines without the arrow; None when there was none."""

    def field(self, name: str) -> object:
        """The field ``name`` of :data:`COMPARED_FIELDS`."""
        value: object = getattr(self, name)
        return value


def _split_args(text: str, names: Sequence[str] | None) -> tuple[tuple[str, str], ...]:
    """`` a=1 b="x y"`` as ((a, 1), (b, "x y")): at the known names when given (a
    string may hold spaces), else at each `` NAME=``."""
    if names is None:
        return tuple(
            (m[1], m[2]) for m in re.finditer(r" ([A-Za-z_][A-Za-z0-9_]*)=(\S*)", text)
        )
    out: list[tuple[str, str]] = []
    pos = 0
    for i, name in enumerate(names):
        head = f" {name}="
        if not text.startswith(head, pos):
            out.append((name, "<missing>"))
            continue
        start = pos + len(head)
        end = len(text)
        if i + 1 < len(names):
            nxt = text.find(f" {names[i + 1]}=", start)
            end = nxt if nxt >= 0 else len(text)
        out.append((name, text[start:end]))
        pos = end
    if pos < len(text):
        out.append(("<rest>", text[pos:]))
    return tuple(out)


def parse_trace_line(
    text: str, arg_names: Mapping[str, Sequence[str]] | None = None
) -> TraceLine | None:
    """A ``trace`` line as fields, None for a comment or a line of another shape.

    ``arg_names`` maps an event name to its arguments' names, so that a string value
    holding spaces stays whole.
    """
    m = _LINE_RE.match(text)
    if m is None:
        return None
    event = m["event"]
    names = arg_names.get(event) if arg_names is not None else None
    return TraceLine(
        comm=m["comm"].strip(), pid=int(m["pid"]), cpu=int(m["cpu"]), flags=m["flags"],
        timestamp=m["ts"], event=event, where=m["where"],
        args=_split_args(m["args"], names), text=text,
    )  # fmt: skip


def parse_trace(
    text: str, arg_names: Mapping[str, Sequence[str]] | None = None
) -> list[TraceLine]:
    """Every event line of a ``trace`` file, in order (header comments skipped), each
    with the ``<stack trace>`` entry that follows it, if any."""
    out: list[TraceLine] = []
    stack: list[str] | None = None
    for raw in text.splitlines():
        if raw.endswith(": <stack trace>"):
            stack = []
            continue
        if raw.startswith(" => ") and stack is not None:
            stack.append(raw[4:])
            continue
        _attach_stack(out, stack)
        stack = None
        line = parse_trace_line(raw, arg_names)
        if line is not None:
            out.append(line)
    _attach_stack(out, stack)
    return out


def _attach_stack(lines: list[TraceLine], stack: list[str] | None) -> None:
    """The stack entry just read belongs to the event line before it."""
    if stack is not None and lines:
        lines[-1] = replace(lines[-1], stack=tuple(stack))


@dataclass(frozen=True)
class Mismatch:
    """Two lines paired up that differ (``fields`` names how), or a line one side lacks."""

    guest: TraceLine | None
    ours: TraceLine | None
    fields: tuple[str, ...]

    def describe(self) -> str:
        """Both lines, and which fields differ."""
        guest = self.guest.text if self.guest else "(none)"
        ours = self.ours.text if self.ours else "(none)"
        return f"differ in {', '.join(self.fields)}:\n  tracefs:  {guest}\n  kprobevm: {ours}"


@dataclass(frozen=True)
class Comparison:
    """The lines of both sides paired up: how many, how many were identical, the rest."""

    compared: int
    matched: int
    mismatches: tuple[Mismatch, ...]
    same_flags: int = 0
    """Of the matched lines, how many show the same latency flags too."""

    @property
    def identical(self) -> bool:
        """Every line of each side has an identical line on the other."""
        return not self.mismatches

    def describe(self, limit: int = 20) -> str:
        """A summary line and the first ``limit`` differences."""
        head = (
            f"{self.matched}/{self.compared} lines identical"
            f" ({self.same_flags} with the same flags)"
        )
        return "\n".join([head, *(m.describe() for m in self.mismatches[:limit])])


def _differing(a: TraceLine, b: TraceLine) -> tuple[str, ...]:
    return tuple(name for name in COMPARED_FIELDS if a.field(name) != b.field(name))


def compare_lines(guest: Sequence[TraceLine], ours: Sequence[TraceLine]) -> Comparison:
    """Pair the lines of both sides in order and compare them field by field.

    The two sequences are aligned on their events (a line one side lacks does not shift
    every later pair); each aligned pair counts as matched when all of
    :data:`COMPARED_FIELDS` agree.
    """
    keys_a = [(line.event, line.comm) for line in guest]
    keys_b = [(line.event, line.comm) for line in ours]
    matcher = difflib.SequenceMatcher(a=keys_a, b=keys_b, autojunk=False)
    mismatches: list[Mismatch] = []
    matched = compared = same_flags = 0
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        pairs = list(zip(range(a0, a1), range(b0, b1), strict=False))
        for i, j in pairs:
            compared += 1
            fields = _differing(guest[i], ours[j])
            if fields:
                mismatches.append(Mismatch(guest[i], ours[j], fields))
            else:
                matched += 1
                same_flags += guest[i].flags == ours[j].flags
        if op in ("delete", "replace", "insert"):
            for i in range(a0 + len(pairs), a1):
                compared += 1
                mismatches.append(Mismatch(guest[i], None, ("missing in kprobevm",)))
            for j in range(b0 + len(pairs), b1):
                compared += 1
                mismatches.append(Mismatch(None, ours[j], ("missing in tracefs",)))
    return Comparison(compared, matched, tuple(mismatches), same_flags)


# --- error_log ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorLogEntry:
    """One ``error_log`` entry: the message, the command and the caret's column in it."""

    message: str
    command: str
    caret: int

    def text(self) -> str:
        """The entry as tracefs prints it, timestamp aside."""
        pad = " " * (len("  Command: ") + self.caret)
        return f"trace_kprobe: error: {self.message}\n  Command: {self.command}\n{pad}^"


_ERROR_HEAD_RE = re.compile(r"^\[\s*\d+\.\d+\] trace_kprobe: error: (?P<message>.*)$")
_COMMAND_HEAD = "  Command: "


def parse_error_log(text: str) -> list[ErrorLogEntry]:
    """The ``trace_kprobe`` entries of an ``error_log`` file, oldest first."""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _ERROR_HEAD_RE.match(line)
        if m is None:
            continue
        command = lines[i + 1][len(_COMMAND_HEAD) :] if i + 1 < len(lines) else ""
        caret_line = lines[i + 2] if i + 2 < len(lines) else ""
        caret = caret_line.find("^") - len(_COMMAND_HEAD)
        out.append(ErrorLogEntry(m["message"], command, caret))
    return out


def error_log_entry(exc: ProbeSyntaxError, rules: KernelRules = LATEST) -> ErrorLogEntry | None:
    """What a kernel with ``rules`` writes to ``error_log`` for ``exc`` (None when it
    writes nothing)."""
    logged = exc.code == "NEED_STRING_TYPE" and rules.comm_type_logged
    if exc.code in UNLOGGED and not logged:
        return None
    return ErrorLogEntry(ERROR_MESSAGES[exc.code], exc.text, exc.position)


# --- running each side -------------------------------------------------------------------


@dataclass(frozen=True)
class SideRun:
    """What one side printed for a workload: its lines (all tasks), and the probes it
    listed in the debugfs ``kprobes/list`` format while they were placed."""

    lines: tuple[TraceLine, ...]
    kprobes_list: tuple[str, ...]
    record_refused: str | None = None
    """kprobevm's side in ``auto`` mode: why its events stopped the guest instead of
    being recorded (None: recorded, or the guest's side)."""

    def of(self, comm: str) -> list[TraceLine]:
        """The lines of the tasks named ``comm`` (the workload's own)."""
        return [line for line in self.lines if line.comm == comm]


_PLACEHOLDER_RE = re.compile(r"\{(insn|addr|dup):?([^}:]*)(?::(\d+))?\}")


def expand(definition: str, vm: VM) -> str:
    """``definition`` with its guest-dependent parts filled in from ``vm``'s kernel, so
    that one corpus serves every kernel: ``{insn:SYM:N}`` the offset of SYM's N-th
    instruction (0-based), ``{addr:SYM}`` SYM's address in hex, ``{dup}`` a function
    name that several symbols share."""
    from kprobevm.x86.insn import MAX_INSN_SIZE, decode

    def fill(m: re.Match[str]) -> str:
        kind, name, count = m[1], m[2], int(m[3] or 0)
        if kind == "addr":
            return f"0x{vm.symbols[name]:x}"
        if kind == "dup":
            return _shared_name(vm)
        base = offset = vm.symbols[name]
        for _ in range(count):
            offset += len(decode(vm.original_text(offset, MAX_INSN_SIZE), offset).bytes)
        return str(offset - base)

    return _PLACEHOLDER_RE.sub(fill, definition)


def _shared_name(vm: VM) -> str:
    """The first text symbol name of the core kernel that two symbols share."""
    seen: set[str] = set()
    for sym in vm.symbols:
        if sym.module is None and sym.type in "tT":
            if sym.name in seen:
                return sym.name
            seen.add(sym.name)
    raise DifferentialError("no function name is shared by two symbols")


def _events(definitions: Sequence[str], vm: VM) -> list[ProbeEvent]:
    """The definitions parsed as ``vm``'s kernel parses them."""
    from kprobevm.tracing.plan import guest_kernel

    guest = guest_kernel(vm)
    events = []
    for text in definitions:
        parsed = parse_event(text, kernel=guest)
        if isinstance(parsed, EventDeletion):
            raise DifferentialError(f"{text!r} deletes; a differential run only places")
        events.append(parsed)
    return events


def arg_names(definitions: Sequence[str], vm: VM) -> dict[str, tuple[str, ...]]:
    """Each event's argument names, from its definitions as ``vm``'s kernel names them
    (to split its lines' values)."""
    return {e.event: tuple(a.name for a in e.args) for e in _events(definitions, vm)}


KERNEL_ONLY_FLAGS = ("[OPTIMIZED]", "[FTRACE]")
"""``kprobes/list`` flags of the kernel's own ways of placing a probe (a jump, ftrace),
which kprobevm's probes never have: left out of the comparison."""


def parse_kprobes_list(text: str) -> tuple[str, ...]:
    """The lines of a debugfs ``kprobes/list``, sorted (the kernel lists them in the
    order of its hash table, which says nothing about the probes), without
    :data:`KERNEL_ONLY_FLAGS`."""
    lines = []
    for line in text.splitlines():
        if line.strip():
            for flag in KERNEL_ONLY_FLAGS:
                line = line.replace(flag, "")
            lines.append(line)
    return tuple(sorted(lines))


def _quoted_writes(definitions: Sequence[str], path: str) -> str:
    """Shell lines appending each definition to ``path`` in its own write, as a user
    types them one by one (a rejected one does not stop the others)."""
    return "\n".join(f"printf '%s\\n' {shlex.quote(d)} >> {path}" for d in definitions)


def _clear_tracefs(vm: VM) -> None:
    vm.run(
        f"echo 0 > {TRACEFS}/events/enable; echo > {TRACEFS}/kprobe_events;"
        f" echo > {TRACEFS}/trace; echo > {TRACEFS}/error_log;"
        f" echo 0 > {TRACEFS}/options/stacktrace; echo 0 > {TRACEFS}/options/sym-offset; true"
    )


def run_tracefs(
    vm: VM, definitions: Sequence[str], workload: str, *, stacktrace: bool = False
) -> SideRun:
    """Place ``definitions`` through the guest's tracefs, run ``workload``, read ``trace``.

    Every definition must be accepted (raises :class:`DifferentialError` with the
    guest's ``error_log`` otherwise). The events are enabled for the workload only and
    removed at the end. ``stacktrace`` turns on ``options/stacktrace`` (and
    ``sym-offset``, as kprobevm prints the entries) for the workload.
    """
    events = _events(definitions, vm)
    _clear_tracefs(vm)
    if stacktrace:
        vm.run(f"echo 1 > {TRACEFS}/options/sym-offset; echo 1 > {TRACEFS}/options/stacktrace")
    try:
        placed = vm.run(_quoted_writes(definitions, f"{TRACEFS}/kprobe_events"))
        if placed.returncode:
            log = vm.read_file(f"{TRACEFS}/error_log")
            raise DifferentialError(f"the guest's tracefs refused a definition:\n{log}")
        groups = sorted({e.group for e in events})
        enable = "; ".join(f"echo 1 > {TRACEFS}/events/{g}/enable" for g in groups)
        disable = "; ".join(f"echo 0 > {TRACEFS}/events/{g}/enable" for g in groups)
        listed = vm.run(
            f"{enable}\n{workload}\n"
            f"while IFS= read -r l; do echo \"$l\"; done < {KPROBES_LIST}\n{disable}"
        ).stdout  # fmt: skip
        trace = vm.read_file(f"{TRACEFS}/trace")
    finally:
        _clear_tracefs(vm)
    names = arg_names(definitions, vm)
    return SideRun(tuple(parse_trace(trace, names)), parse_kprobes_list(listed))


def run_kprobevm(
    vm: VM, definitions: Sequence[str], workload: str, *, mode: str = "auto",
    stacktrace: bool = False,
) -> SideRun:
    """Place ``definitions`` with a trace session (``mode`` as ``trace --mode``), run
    ``workload``, and return the lines kprobevm prints for it (``stacktrace``: each
    followed by its stack, as ``trace --stacktrace``)."""
    from kprobevm.tracing.session import TraceSession, plan_events

    events = _events(definitions, vm)
    session = TraceSession(vm, plan_events(vm, events), mode=mode, stacktrace=stacktrace)
    with session:
        if mode in ("record", "stop") and session.recorded != (mode == "record"):
            raise DifferentialError(f"the session did not run in {mode} mode")
        listed = vm.list_kprobes()
        vm.run(workload)
    errors = session.handler_errors()
    if errors:
        raise DifferentialError("kprobevm's handlers raised:\n" + "\n".join(errors))
    names = arg_names(definitions, vm)
    text = "\n".join(line for hit in session.drain() for line in hit.lines())
    return SideRun(
        tuple(parse_trace(text, names)), parse_kprobes_list(listed), session.record_refused
    )


@dataclass(frozen=True)
class Registration:
    """Definitions written one by one: what ``error_log`` then holds, and the
    ``kprobe_events`` lines of those accepted."""

    errors: tuple[ErrorLogEntry, ...]
    accepted: tuple[str, ...]


def tracefs_errors(vm: VM, definitions: Sequence[str]) -> Registration:
    """Write ``definitions`` one by one into the guest's ``kprobe_events`` (the accepted
    ones stay for the next); what ``error_log`` and ``kprobe_events`` then hold."""
    _clear_tracefs(vm)
    try:
        vm.run(_quoted_writes(definitions, f"{TRACEFS}/kprobe_events"))
        errors = parse_error_log(vm.read_file(f"{TRACEFS}/error_log"))
        events = vm.read_file(f"{TRACEFS}/kprobe_events").splitlines()
        return Registration(tuple(errors), tuple(line for line in events if line))
    finally:
        _clear_tracefs(vm)


def kprobevm_errors(vm: VM, definitions: Sequence[str]) -> Registration:
    """What kprobevm says the kernel makes of ``definitions`` written one by one (each
    accepted one placed, on paper, before the next): ``error_log`` entries, and the
    ``kprobe_events`` lines of the accepted ones."""
    from kprobevm.tracing.plan import guest_kernel, plan_events

    guest = guest_kernel(vm)
    accepted: list[ProbeEvent] = []
    out: list[ErrorLogEntry] = []
    for text in definitions:
        try:
            parsed = parse_event(text, kernel=guest)
            if isinstance(parsed, EventDeletion):
                raise DifferentialError(f"{text!r} deletes; only placing is compared")
            plan_events(vm, [*accepted, parsed])
        except ProbeSyntaxError as exc:
            entry = error_log_entry(exc, kernel_rules(vm))
            if entry is not None:
                out.append(entry)
            continue
        accepted.append(parsed)
    default = default_maxactive(vm) if any(e.is_return for e in accepted) else 0
    return Registration(tuple(out), tuple(e.definition(default) for e in accepted))


def default_maxactive(vm: VM) -> int:
    """register_kretprobe()'s maxactive for a return probe given none: 10, or two per
    possible CPU of the guest when that is more."""
    possible = vm.run("cat /sys/devices/system/cpu/possible").stdout.strip()
    cpus = 0
    for part in possible.split(","):
        first, _, last = part.partition("-")
        cpus += int(last or first) - int(first) + 1
    return max(10, 2 * cpus)
