"""Placing a parsed event against the guest's symbols, with the kernel's registration checks.

What ``register_trace_kprobe`` and ``register_kprobe`` check once the symbols are known
(kernel/trace/trace_kprobe.c, kernel/kprobes.c): the probe point exists, is unique, is a
function's entry for a return probe; each ``@SYM`` argument names a symbol. The parser
runs the same checks in the kernel's order when it is given the symbols.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

from kprobevm.errors import AmbiguousSymbol
from kprobevm.tracing.errors import ProbeLog
from kprobevm.tracing.events import ProbeEvent, ResolvedEvent, SymbolTable
from kprobevm.tracing.fetch import Deref, FetchSource, SymbolAddress
from kprobevm.tracing.kernel_text import from_kernel_text, kernel_words, to_kernel_text
from kprobevm.x86.constants import MASK64

__all__ = ["EntryAdjust", "check_unique", "lookup_symbol", "on_func_entry", "resolve_event"]

_DESCRIBE_RE = re.compile(
    r"^(?P<name>\S+)\+0x(?P<off>[0-9a-f]+)/0x(?P<size>[0-9a-f]+)(?: \[\S+\])?$"
)


def _describe(symbols: SymbolTable, address: int) -> tuple[str, int, int] | None:
    """The symbol ``address`` falls in: (name, offset, size); None outside every symbol."""
    match = _DESCRIBE_RE.match(symbols.describe(address))
    if match is None:
        return None
    return match["name"], int(match["off"], 16), int(match["size"], 16)


def lookup_symbol(symbols: SymbolTable, name: str) -> int | None:
    """kallsyms_lookup_name(): the first of several same-named symbols."""
    try:
        return symbols[name]
    except AmbiguousSymbol as exc:
        return exc.addresses[0] if exc.addresses else None
    except KeyError:
        return None


EntryAdjust = Callable[[int, int], tuple[int, bool]]
"""The kernel's ``arch_adjust_kprobe_addr()``: (function start, offset in it) -> (the
probe's offset, whether that is the function's entry). None: x86 without IBT, where the
entry is offset 0 and nothing moves."""


def _adjust(adjust: EntryAdjust | None, start: int, offset: int) -> tuple[int, bool]:
    if adjust is None:
        return offset, offset == 0
    return adjust(start, offset)


def on_func_entry(
    symbols: SymbolTable, symbol: str, offset: int, adjust: EntryAdjust | None = None
) -> Literal["entry", "not_entry", "enoent"]:
    """kprobe_on_func_entry(): is SYM+OFFS the entry of the symbol it falls in (offset
    0, or 0 and 4 behind an ``endbr64`` on an IBT kernel)?"""
    base = lookup_symbol(symbols, from_kernel_text(symbol))
    if base is None:
        return "enoent"
    where = _describe(symbols, base + offset)
    if where is None:
        return "enoent"
    _, entry = _adjust(adjust, base + offset - where[1], where[1])
    return "entry" if entry else "not_entry"


def check_unique(log: ProbeLog, symbols: SymbolTable, symbol: str) -> None:
    """The probe point's symbol (kernel text) names exactly one symbol, or the kernel's
    NON_UNIQ_SYMBOL (several) or BAD_PROBE_ADDR (none) is raised through ``log``."""
    try:
        symbols[from_kernel_text(symbol)]
    except AmbiguousSymbol:
        log.fail("NON_UNIQ_SYMBOL", 0)
    except KeyError:
        log.fail("BAD_PROBE_ADDR", 0)


def resolve_event(
    event: ProbeEvent,
    symbols: SymbolTable,
    *,
    is_insn_boundary: Callable[[int], bool] | None = None,
    adjust: EntryAdjust | None = None,
) -> ResolvedEvent:
    """Place ``event`` against the guest's symbols with the kernel's registration checks.

    ``symbols`` answers for the guest's kallsyms; ``is_insn_boundary``, when given, says
    whether an address starts an instruction (unchecked without it); ``adjust`` moves an
    entry probe past an ``endbr64`` on an IBT kernel (see :data:`EntryAdjust`). Returns the event
    with its address, containing function and ``@SYM`` arguments filled in. Raises
    :class:`~kprobevm.errors.ProbeSyntaxError` with BAD_RETPROBE, NON_UNIQ_SYMBOL,
    BAD_PROBE_ADDR, BAD_INSN_BNDRY or FAIL_REG_PROBE, its caret at the probe point as the
    kernel's ``error_log`` puts it.
    """
    log = ProbeLog(kernel_words(event.command))
    log.index = 1
    name = event.symbol_name
    if name is not None:
        kname = to_kernel_text(name)
        entry = on_func_entry(symbols, kname, event.offset, adjust)
        if entry == "not_entry" and event.is_return:
            log.fail("BAD_RETPROBE", 0)
        if event.module is None:
            check_unique(log, symbols, kname)
        base = lookup_symbol(symbols, name)
        if base is None:
            # A module that is not loaded: the kernel would wait for it; we cannot.
            log.fail("BAD_PROBE_ADDR", 0, "module not loaded")
        address = base + event.offset
    else:
        assert event.address is not None
        address = event.address

    # register_trace_kprobe(): first the @SYM arguments (traceprobe_update_arg) ...
    args = []
    for arg in event.args:
        try:
            args.append(replace(arg, source=_resolve_source(arg.source, symbols)))
        except _Unresolved as exc:
            log.fail(exc.code, 0, exc.detail)
    # ... then register_kprobe(): the address must be inside a symbol, on an
    # instruction boundary, and a kretprobe's at a function entry.
    where = _describe(symbols, address)
    if where is None:
        log.fail("BAD_PROBE_ADDR", 0, f"0x{address:x} is in no symbol")
    offset, on_entry = _adjust(adjust, address - where[1], where[1])
    address += offset - where[1]
    where = (where[0], offset, where[2])
    if event.is_return and not on_entry:
        log.fail("FAIL_REG_PROBE", 0, "a kretprobe must be at a function entry")
    if is_insn_boundary is not None and not is_insn_boundary(address):
        log.fail("BAD_INSN_BNDRY", 0)
    return ResolvedEvent(
        event=event,
        address=address,
        function=where[0],
        function_offset=where[1],
        function_size=where[2],
        args=tuple(args),
        on_entry=on_entry,
    )


class _Unresolved(Exception):
    """An ``@SYM`` argument that names no symbol: the kernel's error code and why."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _resolve_source(src: FetchSource, symbols: SymbolTable) -> FetchSource:
    """``src`` with each ``@SYM`` in it given its address (traceprobe_update_arg)."""
    if isinstance(src, Deref):
        return replace(src, inner=_resolve_source(src.inner, symbols))
    if isinstance(src, SymbolAddress):
        if src.name is None:
            # traceprobe_update_arg() fails with -EINVAL: logged as FAIL_REG_PROBE.
            raise _Unresolved("FAIL_REG_PROBE", f"bad offset in @{src.expr}")
        base = lookup_symbol(symbols, src.name)
        if base is None:
            raise _Unresolved("BAD_PROBE_ADDR", f"no symbol {src.name!r} for @{src.expr}")
        return replace(src, address=(base + src.offset) & MASK64)
    return src
