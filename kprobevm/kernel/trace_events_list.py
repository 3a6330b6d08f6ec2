"""The guest's trace events read from its memory: what tracefs ``events/GROUP/EVENT`` lists.

Every event, tracepoint or dynamic (kprobe, uprobe, ...), is a ``struct trace_event_call``
on the kernel's ``ftrace_events`` list; its group is its class's ``system`` and its name
is ``tp->name`` for a tracepoint (``TRACE_EVENT_FL_TRACEPOINT`` in ``flags``), else
``name``, as the kernel's ``trace_event_name()`` reads it. Layouts and the flag's value
come from the kernel's BTF. With no SSH this stands in for a look at tracefs.
"""

from __future__ import annotations

from collections.abc import Callable

from kprobevm.kernel.btf import Btf
from kprobevm.kernel.module_kallsyms import list_for_each

__all__ = ["trace_event_names"]

_NAME_MAX = 256
_BLOCK = 64


def trace_event_names(
    read: Callable[[int, int], bytes], head: int, btf: Btf
) -> set[tuple[str, str]]:
    """``(group, event)`` of every trace event on the list at ``head`` (``ftrace_events``)."""
    off = btf.struct_member_offset
    node_at = off("trace_event_call", "list")
    class_at = off("trace_event_call", "class")
    name_at = off("trace_event_call", "name")  # a union with ``tp``
    flags_at = off("trace_event_call", "flags")
    system_at = off("trace_event_class", "system")
    tp_name_at = off("tracepoint", "name")
    tracepoint = btf.enumerator("TRACE_EVENT_FL_TRACEPOINT")
    strings: dict[int, str] = {}

    def u64(addr: int) -> int:
        return int.from_bytes(read(addr, 8), "little")

    def cstring(addr: int) -> str:
        if addr not in strings:
            raw = b""
            while b"\0" not in raw and len(raw) < _NAME_MAX:
                at = addr + len(raw)
                raw += read(at, _BLOCK - at % _BLOCK)  # never past an aligned block
            strings[addr] = raw.split(b"\0", 1)[0].decode(errors="replace")
        return strings[addr]

    out: set[tuple[str, str]] = set()
    for node in list_for_each(read, head, "ftrace_events"):
        call = node - node_at
        flags = int.from_bytes(read(call + flags_at, 4), "little")
        name = u64(call + name_at)
        if flags & tracepoint:
            name = u64(name + tp_name_at)
        system = u64(u64(call + class_at) + system_at)
        out.add((cstring(system), cstring(name)))
    return out
