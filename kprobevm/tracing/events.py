"""The values of the kprobe_events language: a parsed definition, a deletion, a placed event.

:func:`~kprobevm.tracing.parse.parse_event` makes a :class:`ProbeEvent` or an
:class:`EventDeletion`; :func:`~kprobevm.tracing.resolve.resolve_event` places a
:class:`ProbeEvent` against a :class:`SymbolTable` as a :class:`ResolvedEvent`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from kprobevm.tracing.fetch import FetchArg

__all__ = ["EventDeletion", "ProbeEvent", "ResolvedEvent", "SymbolTable"]


@dataclass(frozen=True)
class ProbeEvent:
    """A parsed ``p``/``r`` definition: where to probe, the event's name, what to record."""

    kind: Literal["p", "r"]
    group: str
    event: str
    symbol: str | None  # without module prefix, offset or %return
    offset: int
    address: int | None  # for a MEMADDR definition
    module: str | None
    maxactive: int  # 0: the kernel's default
    args: tuple[FetchArg, ...]
    command: str  # the definition as the kernel rebuilds it (words joined by spaces)
    fentry: bool = False  # judged at function entry: $argN allowed

    @property
    def is_return(self) -> bool:
        """A kretprobe (``r``, or ``p`` with ``%return``)."""
        return self.kind == "r"

    @property
    def symbol_name(self) -> str | None:
        """The name kallsyms is asked for: ``MOD:SYM`` or ``SYM``."""
        if self.symbol is None:
            return None
        return f"{self.module}:{self.symbol}" if self.module is not None else self.symbol

    @property
    def place(self) -> str:
        """The probe point as kprobe_events prints it (``vfs_read+16``, ``0xffff...``)."""
        if self.symbol_name is None:
            return f"0x{self.address or 0:016x}"
        return f"{self.symbol_name}+{self.offset}" if self.offset else self.symbol_name

    def definition(self, default_maxactive: int = 0) -> str:
        """The line ``cat kprobe_events`` shows for this event (trace_kprobe_show); a
        registered return probe without a maxactive shows ``default_maxactive``, the
        kernel's own (register_kretprobe's, from the number of possible CPUs)."""
        maxactive = self.maxactive or default_maxactive
        head = self.kind + (str(maxactive) if self.is_return and maxactive else "")
        words = [f"{head}:{self.group}/{self.event}", self.place]
        words += [f"{a.name}={a.comm}" for a in self.args]
        return " ".join(words)

    def __str__(self) -> str:
        return self.definition()


@dataclass(frozen=True)
class EventDeletion:
    """``-:[GRP/]EVENT [place args...]``: remove the events that match."""

    group: str | None  # None: any group
    event: str | None  # None: every event of ``group``
    match: tuple[str, ...] = ()  # if given, the probe point and arguments must match too
    command: str = ""

    def matches(self, event: ProbeEvent) -> bool:
        """trace_kprobe_match(): name, group, and the optional command head."""
        if self.event is not None and event.event != self.event:
            return False
        if self.group is not None and event.group != self.group:
            return False
        if not self.match:
            return True
        if self.match[0] != event.place:
            return False
        wanted = self.match[1:]
        have = [f"{a.name}={a.comm}" for a in event.args]
        # trace_probe_match_command_args: each given word must equal the argument there.
        return len(wanted) <= len(have) and all(
            w == h or w == a.comm for w, h, a in zip(wanted, have, event.args, strict=False)
        )


class SymbolTable(Protocol):
    """The guest's kernel symbols as placing an event needs them."""

    def __getitem__(self, name: str) -> int:
        """Address of ``name``; ``KeyError`` if none, ``AmbiguousSymbol`` if several."""
        ...

    def __contains__(self, name: object) -> bool: ...

    def describe(self, address: int) -> str:
        """``sym+0xoff/0xsize`` (``%pS``), or a bare hex number outside every symbol."""
        ...


@dataclass(frozen=True)
class ResolvedEvent:
    """An event placed against the guest's symbols: its address and resolved arguments."""

    event: ProbeEvent
    address: int  # where the probe goes
    function: str  # the containing symbol's name
    function_offset: int
    function_size: int
    args: tuple[FetchArg, ...]  # @SYM addresses filled in
    on_entry: bool = False
    """At its function's entry: offset 0, or past an ``endbr64`` on an IBT kernel."""

    @property
    def where(self) -> str:
        """``sym+0xoff/0xsize`` as the kernel prints the probe address."""
        return f"{self.function}+0x{self.function_offset:x}/0x{self.function_size:x}"
