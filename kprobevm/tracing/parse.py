"""kprobe_events definitions, parsed exactly as the 6.1 kernel's tracefs parses them.

Follows ``__trace_kprobe_create`` (kernel/trace/trace_kprobe.c): the same accepted
syntax, the same error names, the same caret positions in ``error_log``. Each argument
is parsed by :mod:`kprobevm.tracing.parse_arg` (``traceprobeparse_probe_arg``). Checks
that need the guest's symbols run in :func:`~kprobevm.tracing.resolve.resolve_event` (or
inside :func:`parse_event` when it is given ``symbols``, which then reports errors in the
kernel's exact order).

The kernel works on bytes; so do we: text is taken as UTF-8 and each position counts
bytes of the command as the kernel rebuilds it (its words joined by single spaces).
"""

from __future__ import annotations

from collections.abc import Iterator

from kprobevm.tracing.errors import ProbeLog, probe_error
from kprobevm.tracing.events import EventDeletion, ProbeEvent, ResolvedEvent, SymbolTable
from kprobevm.tracing.fetch import FetchArg
from kprobevm.tracing.kernel_text import (
    SPACE_RE,
    UINT_MAX,
    from_kernel_text,
    is_good_name,
    isdigit,
    kernel_words,
    kstrtol,
    kstrtouint,
    kstrtoul,
)
from kprobevm.tracing.parse_arg import (
    FL_FENTRY,
    FL_KERNEL,
    FL_RETURN,
    parse_probe_arg,
    split_symbol_offset,
)
from kprobevm.tracing.resolve import check_unique, on_func_entry, resolve_event

# The values and placing live in their own modules; these names stay importable here.
__all__ = [
    "EventDeletion",
    "ProbeEvent",
    "ResolvedEvent",
    "SymbolTable",
    "kstrtol",
    "kstrtoul",
    "parse_event",
    "parse_events",
    "resolve_event",
]

KPROBE_EVENT_SYSTEM = "kprobes"
MAX_EVENT_NAME_LEN = 64
KRETPROBE_MAXACTIVE_MAX = 4096
MAX_TRACE_ARGS = 128  # 6.1 silently ignores arguments past this many


def _split_lines(text: str) -> Iterator[str]:
    """trace_parse_run_command(): one command per line, '#' starts a comment."""
    for line in text.split("\n"):
        line = line.split("#", 1)[0]
        if SPACE_RE.sub("", line):
            yield line


def parse_events(
    text: str, *, symbols: SymbolTable | None = None
) -> list[ProbeEvent | EventDeletion]:
    """Every definition in ``text``, a kprobe_events file: one per line, ``#`` comments.

    ``symbols`` is as for :func:`parse_event`. Returns the definitions in file order, an
    empty list for a file with none. Raises the first definition's
    :class:`~kprobevm.errors.ProbeSyntaxError`, as the kernel stops at the first bad line.
    """
    return [parse_event(line, symbols=symbols) for line in _split_lines(text)]


def parse_event(text: str, *, symbols: SymbolTable | None = None) -> ProbeEvent | EventDeletion:
    """Parse one kprobe_events definition as the 6.1 kernel does.

    ``text`` is one line as written to tracefs (a ``#`` comment may follow). Without
    ``symbols`` only what needs no guest is checked (the kernel's syntax errors); with the
    guest's symbols the symbol checks run too, at the point and in the order the kernel
    runs them. Returns a :class:`ProbeEvent` for ``p``/``r``, an :class:`EventDeletion`
    for ``-:``. Raises :class:`~kprobevm.errors.ProbeSyntaxError` with the kernel's error
    name and caret position, or EINVAL for no definition or more than one line.
    """
    lines = list(_split_lines(text))
    if len(lines) != 1:
        what = "no definition" if not lines else f"{len(lines)} definitions"
        raise probe_error("EINVAL", 0, text, f"{what}; use parse_events for a file")
    argv = kernel_words(lines[0])
    if argv[0][0] == "-":
        return _parse_deletion(argv)
    return _parse_probe(argv, symbols)


def _parse_deletion(argv: list[str]) -> EventDeletion:
    """dyn_event_release(): ``-:[GRP/]EVENT [place args...]``; errors are a bare -EINVAL."""
    command = from_kernel_text(" ".join(argv))
    head = argv[0]
    if head[1:2] != ":":
        raise probe_error("EINVAL", 0, command, "a deletion is written -:[GRP/]EVENT")
    event, group = head[2:], None
    if "/" in event:
        group, event = event.split("/", 1)
    if group is None and not event:
        raise probe_error("EINVAL", 0, command, "no event to delete")
    return EventDeletion(
        group=from_kernel_text(group) if group is not None else None,
        event=from_kernel_text(event) if event else None,
        match=tuple(from_kernel_text(w) for w in argv[1:]),
        command=command,
    )


def _parse_probe(argv: list[str], symbols: SymbolTable | None) -> ProbeEvent:
    """__trace_kprobe_create(): a ``p``/``r`` definition from its words (kernel text)."""
    command = " ".join(argv)
    head = argv[0]
    if head[0] not in "pr":
        raise probe_error("EINVAL", 0, from_kernel_text(command), "not a kprobe definition")
    if len(argv) < 2:
        raise probe_error("EINVAL", 0, from_kernel_text(command), "no probe point given")
    log = ProbeLog(argv)
    is_return = head[0] == "r"
    colon = head.find(":", 1)
    event: str | None = head[colon + 1 :] if colon >= 0 else None

    maxactive = 0
    if isdigit(head[1:2]):
        if not is_return:
            log.fail("MAXACT_NO_KPROBE", 1)
        digits = head[1:colon] if colon >= 0 else head[1:]
        if len(digits) > MAX_EVENT_NAME_LEN - 1:
            log.fail("BAD_MAXACT", 1)
        value = kstrtouint(digits)
        if not value:
            log.fail("BAD_MAXACT", 1)
        if value > KRETPROBE_MAXACTIVE_MAX:
            log.fail("MAXACT_TOO_BIG", 1)
        maxactive = value

    place = argv[1]
    address = kstrtoul(place)
    symbol: str | None = None
    offset = 0
    flags = FL_KERNEL
    if address is None:
        log.index = 1
        if "/" in place and ":" in place:
            raise probe_error("EINVAL", 0, from_kernel_text(command), "a uprobe definition")
        symbol = place
        pct = symbol.find("%")
        if pct >= 0:
            if symbol[pct:] != "%return":
                log.fail("BAD_ADDR_SUFFIX", pct)
            symbol = symbol[:pct]
            is_return = True
        split = split_symbol_offset(symbol)
        if split is None or not 0 <= split[1] <= UINT_MAX:
            log.fail("BAD_PROBE_ADDR", 0)
        symbol, offset = split
        if not symbol:  # "%return" alone: the kernel's lookup of "" fails (-ENOENT)
            log.fail("BAD_PROBE_ADDR", 0)
        if is_return:
            flags |= FL_RETURN
        if symbols is None:
            # Assume the symbol exists: the kernel then judges entry by the offset alone
            # (x86 without IBT, as the Debian 6.1 kernels are built).
            if offset == 0:
                flags |= FL_FENTRY
        else:
            entry = on_func_entry(symbols, symbol, offset)
            if entry == "entry":
                flags |= FL_FENTRY
            elif entry == "not_entry" and is_return:
                log.fail("BAD_RETPROBE", 0)
            if ":" not in symbol:
                check_unique(log, symbols, symbol)
    elif is_return:
        flags |= FL_RETURN

    log.index = 0
    group = KPROBE_EVENT_SYSTEM
    if event is not None:
        group, event = _parse_event_name(log, event, colon + 1, group)
    if event is None:
        if symbol is not None:
            name = f"{'r' if is_return else 'p'}_{symbol}_{offset}"
        else:
            name = f"{'r' if is_return else 'p'}_0x{address:016x}"
        # snprintf into a 64-byte buffer, then sanitize_event_name (not the first byte).
        name = name[: MAX_EVENT_NAME_LEN - 1]
        event = name[0] + name[1:].replace(":", "_").replace(".", "_")

    args: list[FetchArg] = []
    size = 0
    for i, word in enumerate(argv[2 : 2 + MAX_TRACE_ARGS]):
        log.index = i + 2
        arg, size = parse_probe_arg(log, word, i, flags, args, size)
        args.append(arg)

    module: str | None = None
    if symbol is not None and ":" in symbol:
        module, symbol = symbol.split(":", 1)
    probe = ProbeEvent(
        kind="r" if is_return else "p",
        group=from_kernel_text(group),
        event=from_kernel_text(event),
        symbol=from_kernel_text(symbol) if symbol is not None else None,
        offset=offset,
        address=address,
        module=from_kernel_text(module) if module is not None else None,
        maxactive=maxactive,
        args=tuple(args),
        command=from_kernel_text(command),
        fentry=bool(flags & FL_FENTRY),
    )
    if symbols is not None:
        resolve_event(probe, symbols)
    return probe


def _parse_event_name(log: ProbeLog, text: str, offset: int, group: str) -> tuple[str, str | None]:
    """traceprobe_parse_event_name(): ``[GRP/]EVENT``; '.' separates too when '/' is absent."""
    event: str | None = text
    slash = text.find("/")
    if slash < 0:
        slash = text.find(".")
    if slash >= 0:
        if slash == 0:
            log.fail("NO_GROUP_NAME", offset)
        if slash + 1 > MAX_EVENT_NAME_LEN:
            log.fail("GROUP_TOO_LONG", offset)
        group = text[:slash]
        if not is_good_name(group, hash_ok=True):
            log.fail("BAD_GROUP_NAME", offset)
        offset += slash + 1
        event = text[slash + 1 :]
    assert event is not None
    if not event:
        if slash >= 0:
            return group, None  # "GRP/" alone: the event name is made up
        log.fail("NO_EVENT_NAME", offset)
    if len(event) >= MAX_EVENT_NAME_LEN:
        log.fail("EVENT_TOO_LONG", offset)
    if not is_good_name(event):
        log.fail("BAD_EVENT_NAME", offset)
    return group, event
