"""The kprobe_events language: definitions, fetch arguments, ftrace-format output.

``parse_event("p:myprobe do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring")`` parses
a definition as the 6.1 kernel's tracefs does (same errors, same caret positions);
:func:`resolve_event` places it against the guest's symbols; each argument's
:meth:`FetchArg.fetch` reads it at a hit; :func:`format_event_line` prints the hit as
``/sys/kernel/tracing/trace`` would.
"""

from kprobevm.tracing.events import EventDeletion, ProbeEvent, ResolvedEvent, SymbolTable
from kprobevm.tracing.fetch import (
    FETCH_TYPES,
    ArgValue,
    Bitfield,
    FetchArg,
    FetchContext,
    FetchType,
    Symbolic,
    format_value,
)
from kprobevm.tracing.format import EventHit, format_event_line
from kprobevm.tracing.parse import parse_event, parse_events
from kprobevm.tracing.registry import EventRegistry
from kprobevm.tracing.resolve import resolve_event

__all__ = [
    "FETCH_TYPES",
    "ArgValue",
    "Bitfield",
    "EventDeletion",
    "EventHit",
    "EventRegistry",
    "FetchArg",
    "FetchContext",
    "FetchType",
    "ProbeEvent",
    "ResolvedEvent",
    "SymbolTable",
    "Symbolic",
    "format_event_line",
    "format_value",
    "parse_event",
    "parse_events",
    "resolve_event",
]
