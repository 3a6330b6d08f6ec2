"""bpftrace-style maps over kprobe_events definitions: place, and print as bpftrace does.

``count --by comm vfs_read`` is bpftrace's ``kprobe:vfs_read { @[comm] = count(); }``
and ``hist 'p:rd vfs_read count=%dx:u64' --field count`` its ``@ = hist(arg2)``: the
definition is checked and placed as ``trace`` places it (:mod:`kprobevm.tracing.plan`),
and its probe folds each hit into a map in the guest
(:mod:`kprobevm.kprobes.aggregations`). :func:`format_map` prints a snapshot as bpftrace
prints its maps at exit (``@[key]: value`` lines ascending; ``hist()`` bars with
``[lo, hi)`` buckets), :func:`map_json` as JSON.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.kprobes.aggregations import (
    DEFAULT_DEPTH,
    STACK_ENTRIES,
    AggregateProbe,
    Aggregation,
    Bucket,
    MapSnapshot,
    StackKey,
)
from kprobevm.kprobes.core import Kprobe
from kprobevm.tracing import fetch
from kprobevm.tracing.events import ProbeEvent
from kprobevm.tracing.fetch import X86_64_ARG_REGS, FetchArg
from kprobevm.x86.aggregate import AggregateField, Key
from kprobevm.x86.orc_walk import CUT_OUTSIDE

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kernel.kallsyms import KernelSymbols

__all__ = [
    "BY_KEYS",
    "aggregate_field",
    "format_map",
    "map_json",
    "place_map",
    "stack_frames",
    "stack_lines",
]

BY_KEYS: tuple[Key, ...] = ("comm", "pid", "cpu", "stack")
"""What ``count --by`` takes."""
_BAR = 52  # bpftrace's bar width


def _register_of(src: fetch.FetchSource) -> str | None:
    match src:
        case fetch.Reg(name):
            return name
        case fetch.Arg(n) if n <= len(X86_64_ARG_REGS):
            return X86_64_ARG_REGS[n - 1]
        case fetch.StackPointer():
            return "sp"
    return None


def aggregate_field(arg: FetchArg) -> AggregateField:
    """The guest's reading of ``arg``: a register, or one read at an offset from one,
    as a number of its type's size. Anything else is refused (EINVAL) with the reason."""
    why = None
    if arg.type.is_string or arg.type.kind == "symbol" or arg.count or arg.bitfield:
        why = f"its type {arg.type_name} is not a plain number"
    reg = _register_of(arg.source)
    deref, offset, user = False, 0, False
    if isinstance(arg.source, fetch.Deref):
        reg = _register_of(arg.source.inner)
        deref, offset, user = True, arg.source.offset, arg.source.user
    if why is None and reg is None:
        why = "the guest reads a register or one word at an offset from one, not more"
    if why is None and reg in ("ip", "cs", "ss", "flags", "orig_ax"):
        why = f"%{reg} is not a value to count"
    if why is not None:
        raise ProbeRefused("EINVAL", f"field {arg.name}={arg.comm}: {why}")
    assert reg is not None
    return AggregateField(reg, size=arg.type.size, signed=arg.type.signed, deref=deref,
                          offset=offset, user=user, mixed=deref and arg.mixed)  # fmt: skip


def place_map(
    vm: VM,
    definition: str,
    *,
    by: Key = "none",
    field: str | None = None,
    linear: tuple[int, int, int] | None = None,
    depth: int = DEFAULT_DEPTH,
) -> AggregateProbe:
    """Place ``definition`` (a kprobe_events ``p`` line, or a bare symbol) as a probe that
    counts its hits by ``by`` (a ``stack`` of at most ``depth`` frames), or makes a
    histogram of its argument ``field``."""
    from kprobevm.tracing.session import check_definitions, plan_events

    text = definition.strip()
    if " " not in text and ":" not in text:
        text = f"p {text}"
    events, notes = check_definitions([text])
    if notes or len(events) != 1:
        raise ProbeRefused("EINVAL", f"{definition!r}: " + ("; ".join(notes) or "not one probe"))
    event = events[0]
    if event.is_return:
        raise ProbeRefused("EOPNOTSUPP", "a map is updated at entry probes only (p, not r)",
                           symbol=event.symbol_name)  # fmt: skip
    (planned,) = plan_events(vm, [event])
    agg_field = None
    if field is not None:
        args = {a.name: a for a in planned.resolved.args}
        if field not in args:
            have = ", ".join(args) or "none"
            raise ProbeRefused("EINVAL", f"{event.event} has no argument {field!r} (it has:"
                               f" {have})", symbol=event.symbol_name)  # fmt: skip
        agg_field = aggregate_field(args[field])
    aggregation = (_stack_aggregation(vm, depth) if by == "stack"
                   else Aggregation(by=by, field=agg_field, linear=linear))  # fmt: skip
    return AggregateProbe(vm, Kprobe(addr=planned.resolved.address), aggregation)


def _stack_aggregation(vm: VM, depth: int) -> Aggregation:
    """A count by stack: the guest walks its stack with the kernel's ORC tables."""
    from kprobevm.kernel.orc_memory import orc_walk_tables
    from kprobevm.kernel.tasks import kernel_thread_size

    thread_size = kernel_thread_size(vm.symbols)
    if thread_size is None:
        raise KprobeError("a count by stack needs the kernel's stack size (kallsyms bounds"
                          " no init task stack)")  # fmt: skip
    tables = orc_walk_tables(vm.symbols, vm.btf, vm.task_layout, thread_size, vm.read)
    return Aggregation(by="stack", depth=depth, walk=tables, entries=STACK_ENTRIES)


def stack_frames(key: StackKey, symbols: KernelSymbols) -> tuple[list[str], str | None]:
    """A stack key's frames as bpftrace prints ``kstack`` (``func+off``, decimal), and
    why the walk stopped early (None: it reached the stack's end). A last frame outside
    the vmlinux's text is a module's (kept: its frames are not walked) or no text at all
    (dropped: the kernel's walk ends there too)."""
    frames = list(key.frames)
    cut: str | None = key.reason if key.cut else None
    if key.cut == CUT_OUTSIDE and frames:
        sym = symbols.lookup(frames[-1])
        if sym is None or not sym.is_text:
            frames.pop()
            cut = None
        else:
            cut = f"module {sym.module}: its frames are not walked"
    return [_frame(addr, symbols) for addr in frames], cut


def _frame(addr: int, symbols: KernelSymbols) -> str:
    sym = symbols.lookup(addr)
    if sym is None:
        return f"0x{addr:x}"
    return f"{sym.name}+{addr - sym.address}"


def stack_lines(key: StackKey, count: int, symbols: KernelSymbols) -> list[str]:
    """One stack's ``@[...]: N`` as bpftrace prints a map keyed by ``kstack``; a cut walk
    ends with a ``[stack cut: why]`` line."""
    frames, cut = stack_frames(key, symbols)
    lines = ["@["] + [f"        {f}" for f in frames]
    if cut is not None:
        lines.append(f"        [stack cut: {cut}]")
    return [*lines, f"]: {count}"]


def event_name(definition: str) -> str:
    """The map's name as printed: the event's name, or the bare symbol given."""
    from kprobevm.tracing import parse_event

    text = definition.strip()
    if " " not in text and ":" not in text:
        return text
    event = parse_event(text)
    return event.event if isinstance(event, ProbeEvent) else text


def _size(n: int) -> str:
    """A power of two as bpftrace writes a bucket bound (1K, 4M, ...)."""
    for shift, suffix in ((60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def _bucket_label(b: Bucket, log2: bool) -> str:
    text = _size if log2 else str
    if b.lo is None:
        return f"(..., {text(b.hi or 0)})"
    if b.hi is None:
        return f"[{text(b.lo)}, ...)"
    if log2 and b.hi - b.lo == 1:
        return f"[{text(b.lo)}]"
    return f"[{text(b.lo)}, {text(b.hi)})"


def _bar(n: int, top: int) -> str:
    width = n * _BAR // top if top else 0
    return "@" * width + " " * (_BAR - width)


def format_map(name: str, snap: MapSnapshot) -> str:
    """The snapshot as bpftrace prints a map at exit, named ``@name``; what was
    dropped (a full table) or could not be read is said after it."""
    lines: list[str] = []
    if snap.kind == "count":
        for key, n in snap.counts:
            lines.append(f"@{name}: {n}" if key is None else f"@{name}[{key}]: {n}")
    else:
        used = [i for i, b in enumerate(snap.buckets) if b.count]
        lines.append(f"@{name}:")
        if used:
            top = max(b.count for b in snap.buckets)
            for b in snap.buckets[used[0] : used[-1] + 1]:
                label = _bucket_label(b, snap.kind == "hist")
                lines.append(f"{label:<16}{b.count:>8} |{_bar(b.count, top)}|")
    if snap.dropped:
        lines.append(f"@{name}: {snap.dropped} hit(s) dropped: a CPU's table was full"
                     f" ({snap.capacity} keys)")  # fmt: skip
    if snap.faults:
        lines.append(f"@{name}: {snap.faults} hit(s) whose field could not be read")
    return "\n".join(lines) + "\n"


def _json_key(key: object) -> object:
    """A key as JSON: a stack as its addresses (hex, innermost first) and why it was cut."""
    if isinstance(key, StackKey):
        return {"stack": [f"0x{f:x}" for f in key.frames], "cut": key.reason or None}
    return key


def map_json(name: str, snap: MapSnapshot) -> dict[str, Any]:
    """The snapshot as one JSON object (stable field names)."""
    out: dict[str, Any] = {"map": name, "kind": snap.kind, "by": snap.by}
    if snap.kind == "count":
        out["counts"] = [{"key": _json_key(k), "count": n} for k, n in snap.counts]
    else:
        out["buckets"] = [{"lo": b.lo, "hi": b.hi, "count": b.count}
                          for b in snap.buckets if b.count]  # fmt: skip
    out |= {"total": snap.total, "dropped": snap.dropped, "faults": snap.faults,
            "per_cpu": list(snap.per_cpu)}  # fmt: skip
    return out
