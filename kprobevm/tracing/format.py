"""One kprobe hit as a line of ``/sys/kernel/tracing/trace``, or as a JSON object.

The line is trace_print_context() (kernel/trace/trace_output.c) with the default trace
options, then print_kprobe_event() / print_kretprobe_event() (trace_kprobe.c)::

                 cat-1234    [001] ..Zff    12.345678: myprobe: (do_sys_openat2+0x0/0x170) dfd=-100
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from kprobevm.tracing.fetch import ArgValue, FetchArg, FetchContext, Symbolic, format_value

__all__ = [
    "FTRACE_CONTEXT_FLAGS",
    "INT3_CONTEXT_FLAGS",
    "EventHit",
    "fetch_args",
    "format_event_line",
    "format_stack_header",
    "format_timestamp",
    "json_value",
    "without_offset",
]

# The latency column (irqs-off, need-resched, hardirq/softirq, preempt depth,
# migrate-disable) as the 6.1 guest kernel shows it (measured against its tracefs):
# a kprobe taken through int3 runs inside irqentry_nmi_enter(), NMI and hard IRQ ('Z'),
# its depths shown as 'ff'; a kprobe run from ftrace (a function's ftrace call site), a
# jump-optimized one and a return probe's handler run in plain task context. need-resched
# is unknown to us and shown as '.'.
INT3_CONTEXT_FLAGS = "..Zff"
FTRACE_CONTEXT_FLAGS = "....."

TASK_COMM_LEN = 16

_OFFSET_RE = re.compile(r"\+0x[0-9a-f]+/0x[0-9a-f]+")


def without_offset(where: str) -> str:
    """``sym+0x10/0x80 [mod]`` -> ``sym [mod]``: how a kretprobe line names the function."""
    return _OFFSET_RE.sub("", where, count=1)


def format_timestamp(timestamp_ns: int) -> str:
    """trace_print_time(): ns2usecs() rounds to the microsecond, printed ``%5lu.%06lu``."""
    usecs = (timestamp_ns + 500) // 1000
    secs, rem = divmod(usecs, 1_000_000)
    return f"{secs:5d}.{rem:06d}"


def fetch_args(
    args: Iterable[FetchArg], ctx: FetchContext
) -> tuple[tuple[FetchArg, ArgValue], ...]:
    """Every argument's value at this hit, in order (store_trace_args)."""
    return tuple((arg, arg.fetch(ctx)) for arg in args)


def json_value(value: ArgValue) -> object:
    """A fetched value for JSON: numbers stay numbers, strings text, faults ``null``."""
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, Symbolic):
        return value.text
    return value


@dataclass(frozen=True)
class EventHit:
    """What one hit recorded: the trace entry header, the probe point, the argument values.

    ``where`` is the probe address as ``%pS`` prints it (``do_sys_openat2+0x0/0x170``); for
    a return probe it is the return address, and ``function`` names the probed function.
    """

    event: str
    group: str
    comm: str
    pid: int
    cpu: int
    timestamp_ns: int
    where: str
    args: tuple[tuple[FetchArg, ArgValue], ...] = ()
    function: str | None = None  # set for return probes
    flags: str = INT3_CONTEXT_FLAGS
    stack: tuple[str, ...] | None = None
    """With ``--stacktrace``: the kernel stack at the hit, innermost first, each entry as
    ``%pS`` prints it (``__x64_sys_openat+0x6a/0xa0``)."""
    stack_cut: str | None = None
    """Why the stack ends before the stack's end (a recorded copy too short, a frame the
    walk could not read); None when it is whole."""

    @property
    def is_return(self) -> bool:
        """Whether this is a kretprobe hit (``(ret <- func)``)."""
        return self.function is not None

    def line(self) -> str:
        """The hit as ``cat trace`` prints it (no newline)."""
        return format_event_line(self)

    def lines(self) -> list[str]:
        """The hit's line, then its stack as ``options/stacktrace`` (with ``sym-offset``)
        prints it: a ``<stack trace>`` entry and one `` => `` line per frame."""
        if self.stack is None:
            return [format_event_line(self)]
        cut = [] if self.stack_cut is None else [f" => <stack cut: {self.stack_cut}>"]
        return [format_event_line(self), format_stack_header(self),
                *(f" => {entry}" for entry in self.stack), *cut]  # fmt: skip

    def to_json(self) -> dict[str, object]:
        """Stable field names for ``--json`` (one object per hit)."""
        out: dict[str, object] = {
            "event": self.event,
            "group": self.group,
            "probe": self.where,
            "comm": self.comm[: TASK_COMM_LEN - 1],
            "pid": self.pid,
            "cpu": self.cpu,
            "timestamp": format_timestamp(self.timestamp_ns).strip(),
            "timestamp_ns": self.timestamp_ns,
            "args": {arg.name: json_value(value) for arg, value in self.args},
        }
        if self.function is not None:
            out["function"] = without_offset(self.function)
        if self.stack is not None:
            out["stack"] = list(self.stack)
            out["stack_cut"] = self.stack_cut
        return out


def _context(hit: EventHit) -> str:
    comm = hit.comm[: TASK_COMM_LEN - 1]
    return (
        f"{comm:>16}-{hit.pid:<7d} [{hit.cpu:03d}] {hit.flags} "
        f"{format_timestamp(hit.timestamp_ns)}: "
    )


def format_stack_header(hit: EventHit) -> str:
    """The stack entry's own line (the kernel stamps it just after the event's)."""
    return _context(hit) + "<stack trace>"


def format_event_line(hit: EventHit) -> str:
    """``hit`` in the ftrace format, exactly as the kernel's ``trace`` file shows it."""
    head = _context(hit) + f"{hit.event}: "
    if hit.function is None:
        where = f"({hit.where})"
    else:
        where = f"({hit.where} <- {without_offset(hit.function)})"
    args = "".join(f" {arg.name}={format_value(arg.type, value)}" for arg, value in hit.args)
    return head + where + args
