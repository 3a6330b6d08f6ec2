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

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kprobevm.tracing.btf_args import FunctionPrototype
from kprobevm.tracing.errors import ProbeLog, probe_error
from kprobevm.tracing.events import EventDeletion, ProbeEvent, ResolvedEvent, SymbolTable
from kprobevm.tracing.fetch import FetchArg
from kprobevm.tracing.kernel_rules import LATEST, KernelRules
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
    Dialect,
    parse_probe_arg,
    split_symbol_offset,
)
from kprobevm.tracing.resolve import EntryAdjust, check_unique, on_func_entry, resolve_event

# The values and placing live in their own modules; these names stay importable here.
__all__ = [
    "EventDeletion",
    "GuestKernel",
    "ProbeEvent",
    "ResolvedEvent",
    "SymbolTable",
    "kstrtol",
    "kstrtoul",
    "parse_event",
    "parse_events",
    "resolve_event",
]

ENDBR_SIZE = 4  # an IBT kernel's function entry is past its endbr64


@dataclass(frozen=True)
class GuestKernel:
    """What the parser needs of the guest to parse as its kernel does: its symbols, where
    its functions' entries are, its rules, and its functions' BTF prototypes."""

    symbols: SymbolTable
    rules: KernelRules = LATEST
    adjust: EntryAdjust | None = None
    """The kernel's ``arch_adjust_kprobe_addr()`` (None: x86 without IBT)."""
    prototype: Callable[[str], FunctionPrototype | None] | None = None
    """A function's prototype from the kernel's BTF (None: no BTF)."""

    def dialect(self, symbol: str | None) -> Dialect:
        """How this kernel parses the arguments of a probe on ``symbol``."""
        rules = self.rules
        function = None
        if rules.btf_args and symbol is not None and ":" not in symbol and self.prototype:
            function = self.prototype(from_kernel_text(symbol))
        return Dialect(
            btf_args=rules.btf_args, sticky_deref_offset=rules.sticky_deref_offset,
            entry_args_at_return=rules.entry_args_at_return, function=function,
        )  # fmt: skip


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


def parse_event(
    text: str, *, symbols: SymbolTable | None = None, kernel: GuestKernel | None = None
) -> ProbeEvent | EventDeletion:
    """Parse one kprobe_events definition as the 6.1 kernel does, or as ``kernel`` does.

    ``text`` is one line as written to tracefs (a ``#`` comment may follow). Without
    ``symbols`` or ``kernel`` only what needs no guest is checked (the kernel's syntax
    errors; a probe at ``SYM+4`` may be an IBT kernel's entry, and a 6.11 kernel takes a
    return probe's ``$argN``, so ``$argN`` is let through there); with the guest's
    symbols the symbol checks run too, at the point and in the order the kernel runs
    them; with ``kernel`` its rules and BTF decide as well.
    Returns a :class:`ProbeEvent` for ``p``/``r``, an :class:`EventDeletion` for ``-:``.
    Raises :class:`~kprobevm.errors.ProbeSyntaxError` with the kernel's error name and
    caret position, or EINVAL for no definition or more than one line.
    """
    lines = list(_split_lines(text))
    if len(lines) != 1:
        what = "no definition" if not lines else f"{len(lines)} definitions"
        raise probe_error("EINVAL", 0, text, f"{what}; use parse_events for a file")
    argv = kernel_words(lines[0])
    if argv[0][0] == "-":
        return _parse_deletion(argv)
    if kernel is None and symbols is not None:
        kernel = GuestKernel(symbols)
    return _parse_probe(argv, kernel)


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


def _parse_probe(argv: list[str], kernel: GuestKernel | None) -> ProbeEvent:
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
        if kernel is None:
            # Assume the symbol exists: the kernel then judges entry by the offset, 0 or
            # (an IBT kernel's entry, past endbr64) 4; the guest decides that one later.
            if offset in (0, ENDBR_SIZE) and not is_return:
                flags |= FL_FENTRY
        else:
            entry = on_func_entry(kernel.symbols, symbol, offset, kernel.adjust)
            if entry == "entry" and not is_return:
                flags |= FL_FENTRY
            elif entry == "not_entry" and is_return:
                log.fail("BAD_RETPROBE", 0)
            if ":" not in symbol:
                check_unique(log, kernel.symbols, symbol)
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

    # Without a guest, $argN in a return probe is let through for the guest to judge
    # (a kernel with the entry_args_at_return rule takes it).
    dialect = Dialect(entry_args_at_return=is_return)
    if kernel is not None:
        dialect = kernel.dialect(symbol)
    words = argv[2:]
    if dialect.btf_args:
        words = _expand_meta_args(log, words, flags, dialect)
    args: list[FetchArg] = []
    size = 0
    for i, word in enumerate(words[:MAX_TRACE_ARGS]):
        log.index = i + 2
        arg, size = parse_probe_arg(log, word, i, flags, args, size, dialect)
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
    if kernel is not None:
        resolve_event(probe, kernel.symbols, adjust=kernel.adjust)
    return probe


def _expand_meta_args(log: ProbeLog, words: list[str], flags: int, dialect: Dialect) -> list[str]:
    """traceprobe_expand_meta_args(): a bare ``$argN[:TYPE]`` becomes the Nth parameter's
    name (with the type), ``$arg*`` every parameter's, when BTF knows the function."""
    # a return probe's $arg since 6.11, which saves them at the entry
    entry_or_exit = flags == FL_KERNEL | FL_FENTRY or (
        flags == FL_KERNEL | FL_RETURN and dialect.entry_args_at_return
    )
    every = -1
    found = False
    for i, word in enumerate(words):
        if not word.startswith("$arg"):
            continue
        log.index = i + 2
        if not entry_or_exit:
            log.fail("NOFENTRY_ARGS", 0)
        if isdigit(word[4:5]):
            found = True
        elif word[4:5] != "*":
            log.fail("BAD_VAR", 0)
        elif every >= 0:
            log.fail("DOUBLE_ARGS", 0)
        else:
            found, every = True, i
    function = dialect.function
    if not found:
        return words
    if function is None or not function.params:
        if every >= 0:
            log.fail("NOSUP_BTFARG", 0)
        return words
    names = [name for name, _ in function.params]
    out: list[str] = []
    for i, word in enumerate(words):
        log.index = i + 2
        if i == every:
            out += names
        elif word.startswith("$arg"):
            digits = len(word[4:]) - len(word[4:].lstrip("0123456789"))
            rest = word[4 + digits :]
            if rest and rest[0] != ":":
                log.fail("BAD_VAR", 0)
            n = int(word[4 : 4 + digits])
            if not 0 < n <= len(names):
                log.fail("NO_BTFARG", 0)
            out.append(names[n - 1] + rest)
        else:
            out.append(word)
    return out


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
