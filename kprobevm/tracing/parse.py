"""kprobe_events definitions, parsed exactly as the 6.1 kernel's tracefs parses them.

Follows ``__trace_kprobe_create`` (kernel/trace/trace_kprobe.c) and
``traceprobe_parse_probe_arg`` (kernel/trace/trace_probe.c): the same accepted syntax,
the same error names, the same caret positions in ``error_log``. Checks that need the
guest's symbols run in :func:`resolve_event` (or inside :func:`parse_event` when it is
given ``symbols``, which then reports errors in the kernel's exact order).

The kernel works on bytes; so do we: text is taken as UTF-8 and each position counts
bytes of the command as the kernel rebuilds it (its words joined by single spaces).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal, NoReturn, Protocol

from kprobevm.errors import AmbiguousSymbol
from kprobevm.tracing.errors import probe_error
from kprobevm.tracing.fetch import (
    DEFAULT_TYPE,
    FETCH_TYPES,
    X86_64_REGISTERS,
    Arg,
    Bitfield,
    Comm,
    Deref,
    FetchArg,
    FetchSource,
    FetchType,
    Imm,
    ImmString,
    Reg,
    Retval,
    Stack,
    StackPointer,
    SymbolAddress,
)
from kprobevm.x86.constants import MASK64

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
MAX_ARGSTR_LEN = 63
MAX_ARG_NAME_LEN = 32
MAX_ARRAY_LEN = 64
MAX_PROBE_EVENT_SIZE = 3072
FETCH_INSN_MAX = 16  # ops per argument; the last slot is FETCH_OP_END
PARAM_MAX_STACK = 16384 // 8  # THREAD_SIZE / sizeof(long) on x86_64
_UINT_MAX = (1 << 32) - 1
_LONG_MAX = (1 << 63) - 1

# Field names every event already has (reserved_field_names[] in trace_probe.c).
RESERVED_FIELD_NAMES = frozenset(
    {
        "common_type",
        "common_flags",
        "common_preempt_count",
        "common_pid",
        "common_tgid",
        "__probe_ip",
        "__probe_ret_ip",
        "__probe_func",
    }
)

# TPARG_FL_* bits
_FL_RETURN = 1
_FL_KERNEL = 2
_FL_FENTRY = 4


# --- The kernel's character classes and number parsers (lib/ctype.c, lib/kstrtox.c) -----

# isspace() in lib/ctype.c: the C whitespace plus Latin-1 NBSP (0xa0), which is why a
# UTF-8 byte 0xa0 splits a word in the kernel too.
_SPACE_RE = re.compile("[ \t\n\v\f\r\xa0]+")


def _isalpha(ch: str) -> bool:
    # Latin-1 letters count in the kernel's ctype table (0xc0-0xff less 0xd7 and 0xf7).
    o = ord(ch)
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z") or (0xC0 <= o <= 0xFF and o not in (0xD7, 0xF7))


def _isdigit(ch: str) -> bool:
    return "0" <= ch <= "9"


def _isxdigit(ch: str) -> bool:
    return _isdigit(ch) or "a" <= ch.lower() <= "f"


def _is_good_name(name: str, hash_ok: bool = False) -> bool:
    """is_good_name(): a C identifier (group names may also hold '-')."""
    if not name:
        return False
    first = name[0]
    if not (_isalpha(first) or first == "_" or (hash_ok and first == "-")):
        return False
    return all(_isalpha(c) or _isdigit(c) or c == "_" or (hash_ok and c == "-") for c in name[1:])


def _fixup_radix(s: str, base: int) -> tuple[str, int]:
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2].lower() == "x" and _isxdigit(s[2:3] or "g") else 8
        else:
            base = 10
    if base == 16 and s[:1] == "0" and s[1:2].lower() == "x":
        s = s[2:]
    return s, base


def _parse_digits(s: str, base: int) -> tuple[int, int, bool]:
    """_parse_integer(): (value mod 2**64, digits used, overflowed)."""
    value, used, overflow = 0, 0, False
    for ch in s:
        if _isdigit(ch):
            d = ord(ch) - 48
        elif "a" <= ch.lower() <= "f":
            d = ord(ch.lower()) - 87
        else:
            break
        if d >= base:
            break
        value = value * base + d
        if value > MASK64:
            overflow = True
            value &= MASK64
        used += 1
    return value, used, overflow


def _kstrtoull_raw(s: str, base: int) -> int | None:
    s, base = _fixup_radix(s, base)
    value, used, overflow = _parse_digits(s, base)
    if overflow or used == 0:
        return None
    rest = s[used:]
    if rest in ("", "\n"):
        return value
    return None


def kstrtoul(s: str, base: int = 0) -> int | None:
    """kstrtoul() on 64-bit: an unsigned long, or None where the kernel says -EINVAL/-ERANGE."""
    if s[:1] == "+":
        s = s[1:]
    return _kstrtoull_raw(s, base)


def kstrtouint(s: str, base: int = 0) -> int | None:
    """kstrtouint(): as :func:`kstrtoul` but at most UINT_MAX."""
    value = kstrtoul(s, base)
    return None if value is None or value > _UINT_MAX else value


def kstrtol(s: str, base: int = 0) -> int | None:
    """kstrtol(): a signed long (a leading '-' or '+'), or None."""
    if s[:1] == "-":
        value = _kstrtoull_raw(s[1:], base)
        if value is None or value > _LONG_MAX + 1:
            return None
        return -value
    value = kstrtoul(s, base)
    return None if value is None or value > _LONG_MAX else value


def _simple_strtoul(s: str) -> tuple[int, int]:
    """simple_strtoul(s, &end, 0): (value, index of the first unparsed character)."""
    rest, base = _fixup_radix(s, 0)
    value, used, _ = _parse_digits(rest, base)
    return value, len(s) - len(rest) + used


def _to_kernel_text(text: str) -> str:
    """One character per byte of the UTF-8 text, as the kernel sees it."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _from_kernel_text(text: str) -> str:
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


# --- Values ------------------------------------------------------------------------------


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
        return f"{self.module}:{self.symbol}" if self.module else self.symbol

    @property
    def place(self) -> str:
        """The probe point as kprobe_events prints it (``vfs_read+16``, ``0xffff...``)."""
        if self.symbol_name is None:
            return f"0x{self.address or 0:016x}"
        return f"{self.symbol_name}+{self.offset}" if self.offset else self.symbol_name

    def definition(self) -> str:
        """The line ``cat kprobe_events`` shows for this event (trace_kprobe_show)."""
        head = self.kind + (str(self.maxactive) if self.is_return and self.maxactive else "")
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

    @property
    def where(self) -> str:
        """``sym+0xoff/0xsize`` as the kernel prints the probe address."""
        return f"{self.function}+0x{self.function_offset:x}/0x{self.function_size:x}"


# --- Parsing ------------------------------------------------------------------------------


class _Log:
    """trace_probe_log: the command's words and the word errors are counted from."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.index = 0
        self.command = " ".join(argv)

    def fail(self, code: str, offset: int, detail: str = "") -> NoReturn:
        if self.index >= len(self.argv):
            position = len(self.command) + 1
        else:
            position = sum(len(w) + 1 for w in self.argv[: self.index]) + offset
        raise probe_error(code, position, _from_kernel_text(self.command), detail)


def _split_lines(text: str) -> Iterator[str]:
    # trace_parse_run_command(): one command per line, '#' starts a comment.
    for line in text.split("\n"):
        line = line.split("#", 1)[0]
        if _SPACE_RE.sub("", line):
            yield line


def parse_events(
    text: str, *, symbols: SymbolTable | None = None
) -> list[ProbeEvent | EventDeletion]:
    """Every definition in ``text`` (a kprobe_events file: one per line, ``#`` comments)."""
    return [parse_event(line, symbols=symbols) for line in _split_lines(text)]


def parse_event(text: str, *, symbols: SymbolTable | None = None) -> ProbeEvent | EventDeletion:
    """Parse one kprobe_events definition as the 6.1 kernel does.

    Without ``symbols`` only what needs no guest is checked (the kernel's syntax errors);
    with them the symbol checks run too, at the point and in the order the kernel runs
    them. Raises :class:`~kprobevm.errors.ProbeSyntaxError`.
    """
    lines = list(_split_lines(text))
    if len(lines) != 1:
        what = "no definition" if not lines else f"{len(lines)} definitions"
        raise probe_error("EINVAL", 0, text, f"{what}; use parse_events for a file")
    argv = [w for w in _SPACE_RE.split(_to_kernel_text(lines[0])) if w]
    if argv[0][0] == "-":
        return _parse_deletion(argv)
    return _parse_probe(argv, symbols)


def _parse_deletion(argv: list[str]) -> EventDeletion:
    # dyn_event_release(): "-:[GRP/]EVENT"; errors here are a bare -EINVAL.
    command = _from_kernel_text(" ".join(argv))
    head = argv[0]
    if head[1:2] != ":":
        raise probe_error("EINVAL", 0, command, "a deletion is written -:[GRP/]EVENT")
    event, group = head[2:], None
    if "/" in event:
        group, event = event.split("/", 1)
    if group is None and not event:
        raise probe_error("EINVAL", 0, command, "no event to delete")
    return EventDeletion(
        group=_from_kernel_text(group) if group is not None else None,
        event=_from_kernel_text(event) if event else None,
        match=tuple(_from_kernel_text(w) for w in argv[1:]),
        command=command,
    )


def _parse_probe(argv: list[str], symbols: SymbolTable | None) -> ProbeEvent:
    command = " ".join(argv)
    head = argv[0]
    if head[0] not in "pr":
        raise probe_error("EINVAL", 0, _from_kernel_text(command), "not a kprobe definition")
    if len(argv) < 2:
        raise probe_error("EINVAL", 0, _from_kernel_text(command), "no probe point given")
    log = _Log(argv)
    is_return = head[0] == "r"
    colon = head.find(":", 1)
    event: str | None = head[colon + 1 :] if colon >= 0 else None

    maxactive = 0
    if _isdigit(head[1:2]):
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
    flags = _FL_KERNEL
    if address is None:
        log.index = 1
        if "/" in place and ":" in place:
            raise probe_error("EINVAL", 0, _from_kernel_text(command), "a uprobe definition")
        symbol = place
        pct = symbol.find("%")
        if pct >= 0:
            if symbol[pct:] != "%return":
                log.fail("BAD_ADDR_SUFFIX", pct)
            symbol = symbol[:pct]
            is_return = True
        split = _split_symbol_offset(symbol)
        if split is None or not 0 <= split[1] <= _UINT_MAX:
            log.fail("BAD_PROBE_ADDR", 0)
        symbol, offset = split
        if not symbol:  # "%return" alone: the kernel's lookup of "" fails (-ENOENT)
            log.fail("BAD_PROBE_ADDR", 0)
        if is_return:
            flags |= _FL_RETURN
        if symbols is None:
            # Assume the symbol exists: the kernel then judges entry by the offset alone
            # (x86 without IBT, as the Debian 6.1 kernels are built).
            if offset == 0:
                flags |= _FL_FENTRY
        else:
            entry = _on_func_entry(symbols, symbol, offset)
            if entry == "entry":
                flags |= _FL_FENTRY
            elif entry == "not_entry" and is_return:
                log.fail("BAD_RETPROBE", 0)
            if ":" not in symbol:
                _check_unique(log, symbols, symbol)
    elif is_return:
        flags |= _FL_RETURN

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
        arg, size = _parse_probe_arg(log, word, i, flags, args, size)
        args.append(arg)

    module: str | None = None
    if symbol is not None and ":" in symbol:
        module, symbol = symbol.split(":", 1)
    probe = ProbeEvent(
        kind="r" if is_return else "p",
        group=_from_kernel_text(group),
        event=_from_kernel_text(event),
        symbol=_from_kernel_text(symbol) if symbol is not None else None,
        offset=offset,
        address=address,
        module=_from_kernel_text(module) if module is not None else None,
        maxactive=maxactive,
        args=tuple(args),
        command=_from_kernel_text(command),
        fentry=bool(flags & _FL_FENTRY),
    )
    if symbols is not None:
        _register_checks(probe, symbols, None)
    return probe


def _split_symbol_offset(expr: str) -> tuple[str, int] | None:
    """traceprobe_split_symbol_offset(): split at the first '+' or '-'."""
    for i, ch in enumerate(expr):
        if ch in "+-":
            value = kstrtol(expr[i:])
            return None if value is None else (expr[:i], value)
    return expr, 0


def _parse_event_name(log: _Log, text: str, offset: int, group: str) -> tuple[str, str | None]:
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
        if not _is_good_name(group, hash_ok=True):
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
    if not _is_good_name(event):
        log.fail("BAD_EVENT_NAME", offset)
    return group, event


def _parse_probe_arg(
    log: _Log, word: str, i: int, flags: int, previous: list[FetchArg], size: int
) -> tuple[FetchArg, int]:
    """traceprobe_parse_probe_arg(): ``[NAME=]FETCHARG[:TYPE]``; returns it and the new size."""
    eq = word.find("=")
    if eq >= 0:
        if eq > MAX_ARG_NAME_LEN:
            log.fail("ARG_NAME_TOO_LONG", 0)
        if eq == 0:
            log.fail("NO_ARG_NAME", 0)
        name, body, offset = word[:eq], word[eq + 1 :], eq + 1
    else:
        name, body, offset = f"arg{i + 1}", word, 0
    if not _is_good_name(name):
        log.fail("BAD_ARG_NAME", 0)
    if name in RESERVED_FIELD_NAMES or any(a.name == name for a in previous):
        log.fail("USED_ARG_NAME", 0)
    return _parse_arg_body(log, name, body, offset, flags, size)


def _find_fetch_type(t: str | None) -> FetchType | None:
    if t is None:
        return DEFAULT_TYPE
    if t[:1] == "b":
        # A bitfield takes the unsigned type of its container.
        slash = t.find("/")
        if slash < 0:
            return None
        bits = kstrtoul(t[slash + 1 :])
        return FETCH_TYPES.get(f"u{bits}") if bits in (8, 16, 32, 64) else None
    return FETCH_TYPES.get(t)


# fetch_insn ops as the kernel names them, for the checks that look at the last op.
def _top_op(src: FetchSource) -> str:
    match src:
        case Deref(user=True):
            return "UDEREF"
        case Deref():
            return "DEREF"
        case Reg():
            return "REG"
        case Stack():
            return "STACK"
        case StackPointer():
            return "STACKP"
        case Retval():
            return "RETVAL"
        case Arg():
            return "ARG"
        case Imm():
            return "IMM"
        case ImmString():
            return "DATA"
        case Comm():
            return "COMM"
    return "NOP"


def _parse_arg_body(
    log: _Log, name: str, body: str, offset: int, flags: int, size: int
) -> tuple[FetchArg, int]:
    """traceprobe_parse_probe_arg_body(): type, array, the fetch ops and their checks."""
    if len(body) > MAX_ARGSTR_LEN:
        log.fail("ARG_TOO_LONG", offset)
    if not body:
        log.fail("NO_ARG_BODY", offset)

    arg, t, tpos, count = body, None, 0, 0
    colon = body.find(":")
    if colon >= 0:
        arg, t, tpos = body[:colon], body[colon + 1 :], colon + 1
        bracket = t.find("[")
        if bracket >= 0:
            inside_pos = tpos + bracket + 1
            inside = t[bracket + 1 :]
            t = t[:bracket]
            close = inside.find("]")
            if close < 0:
                log.fail("ARRAY_NO_CLOSE", offset + inside_pos + len(inside))
            if inside[close + 1 :]:
                log.fail("BAD_ARRAY_SUFFIX", offset + inside_pos + close + 1)
            number = kstrtouint(inside[:close])
            if not number:
                log.fail("BAD_ARRAY_NUM", offset + inside_pos)
            if number > MAX_ARRAY_LEN:
                log.fail("ARRAY_TOO_BIG", offset + inside_pos)
            count = number

    type_pos = offset + (tpos if t is not None else 0)
    ftype: FetchType | None
    if arg in ("$comm", "$COMM") or arg.startswith('\\"'):
        # $comm and immediate strings are strings, never arrays. 6.1 refuses anything
        # else with a bare -EINVAL (later kernels log NEED_STRING_TYPE).
        if count or (t is not None and t != "string"):
            log.fail("NEED_STRING_TYPE", type_pos)
        ftype = FETCH_TYPES["string"]
    else:
        ftype = _find_fetch_type(t)
    if ftype is None:
        log.fail("BAD_TYPE", type_pos)
    size += ftype.size * (count or 1)
    if size > MAX_PROBE_EVENT_SIZE:
        log.fail("EVENT_TOO_BIG", offset)

    src, idx = _parse_fetch(log, arg, flags, offset, 0)
    top = _top_op(src)

    # The store op (FETCH_OP_ST_*), as traceprobe_parse_probe_arg_body() picks it.
    if ftype.is_string:
        if ftype.kind == "symstr":
            if top not in ("REG", "STACK", "RETVAL", "ARG", "DEREF"):
                log.fail("BAD_SYMSTRING", type_pos)
        elif top not in ("DEREF", "UDEREF", "IMM", "COMM", "DATA"):
            log.fail("BAD_STRING", type_pos)
        if ftype.kind == "symstr" or top in ("IMM", "COMM", "DATA") or count:
            idx += 1
            if idx == FETCH_INSN_MAX - 1:
                log.fail("TOO_MANY_OPS", offset)
        store = "ST_USTRING" if ftype.kind == "ustring" or top == "UDEREF" else "ST_STRING"
        if ftype.kind == "symstr":
            store = "ST_SYMSTR"
    elif top in ("DEREF", "UDEREF"):
        store = "ST_MEM" if top == "DEREF" else "ST_UMEM"
    else:
        idx += 1
        if idx == FETCH_INSN_MAX - 1:
            log.fail("TOO_MANY_OPS", offset)
        store = "ST_RAW"

    bitfield: Bitfield | None = None
    if t is not None and t[:1] == "b":
        bitfield = _parse_bitfield(t, ftype)
        idx += 1
        if bitfield is None or idx == FETCH_INSN_MAX - 1:
            log.fail("BAD_BITFIELD", type_pos)

    if count:
        if store not in ("ST_MEM", "ST_STRING", "ST_USTRING"):
            log.fail("BAD_STRING", type_pos)
        idx += 1
        if idx == FETCH_INSN_MAX - 1:
            log.fail("TOO_MANY_OPS", offset)

    fetch_arg = FetchArg(
        name=_from_kernel_text(name),
        comm=_from_kernel_text(body),
        source=src,
        type=ftype,
        count=count,
        bitfield=bitfield,
    )
    return fetch_arg, size


def _parse_bitfield(t: str, ftype: FetchType) -> Bitfield | None:
    """__parse_bitfield_probe_arg(): ``b<width>@<offset>/<size>``, None when invalid."""
    width, end = _simple_strtoul(t[1:])
    rest = t[1 + end :]
    if width == 0 or rest[:1] != "@":
        return None
    rest = rest[1:]
    bit_offset, end = _simple_strtoul(rest)
    if end == 0 or rest[end : end + 1] != "/":
        return None
    container = 8 * ftype.size
    if container < width + bit_offset:
        return None
    return Bitfield(width, bit_offset, container)


def _parse_fetch(log: _Log, arg: str, flags: int, offs: int, idx: int) -> tuple[FetchSource, int]:
    """parse_probe_arg(): one fetch expression; ``idx`` counts the kernel's op slots."""
    head = arg[:1]
    if head == "$":
        return _parse_var(log, arg[1:], flags, offs), idx
    if head == "%":
        if arg[1:] not in X86_64_REGISTERS:
            log.fail("BAD_REG_NAME", offs)
        return Reg(arg[1:]), idx
    if head == "@":
        if _isdigit(arg[1:2]):
            value = kstrtoul(arg[1:])
            if value is None:
                log.fail("BAD_MEM_ADDR", offs)
            inner: FetchSource = Imm(value)
        elif arg[1:2] == "+":
            log.fail("FILE_ON_KPROBE", offs)
        else:
            # The symbol is looked up when the event is registered.
            expr = arg[1:]
            split = _split_symbol_offset(expr)
            inner = SymbolAddress(
                expr=_from_kernel_text(expr),
                name=_from_kernel_text(split[0]) if split else None,
                offset=split[1] if split else 0,
            )
            idx += 1  # FETCH_NOP_SYMBOL, then FETCH_OP_IMM
            if idx == FETCH_INSN_MAX - 1:
                log.fail("TOO_MANY_OPS", offs)
        idx += 1
        if idx == FETCH_INSN_MAX - 1:
            log.fail("TOO_MANY_OPS", offs)
        return Deref(0, inner), idx
    if head in ("+", "-"):
        return _parse_deref(log, arg, flags, offs, idx)
    if head == "\\":
        if arg[1:2] == '"':
            text = arg[2:]
            if not text or text[-1] != '"':
                log.fail("IMMSTR_NO_CLOSE", offs + 2 + len(text))
            return ImmString(text[:-1].encode("latin-1")), idx
        value = _str_to_immediate(arg[1:])
        if value is None:
            log.fail("BAD_IMM", offs + 1)
        return Imm(value), idx
    log.fail("BAD_FETCH_ARG", offs)


def _str_to_immediate(s: str) -> int | None:
    if _isdigit(s[:1]):
        return kstrtoul(s)
    if s[:1] == "-":
        return kstrtol(s)
    if s[:1] == "+":
        return kstrtol(s[1:])
    return None


def _parse_deref(log: _Log, arg: str, flags: int, offs: int, idx: int) -> tuple[FetchSource, int]:
    """``+|-[u]OFFS(FETCHARG)``, with the kernel's own pointer walk (and its caret positions)."""
    user = arg[1:2] == "u"
    # The kernel overwrites the 'u' with the sign and steps over it, then steps over a '+'.
    s = arg[0] + arg[2:] if user else arg
    if s[0] == "+":
        s = s[1:]
    paren = s.find("(")
    if paren < 0:
        log.fail("DEREF_NEED_BRACE", offs)
    value = kstrtol(s[:paren])
    if value is None:
        log.fail("BAD_DEREF_OFFS", offs)
    # For "+u"/"-u" this lands one byte short of the '(' + 1: the kernel's arithmetic.
    offs += paren + 1 + (1 if s[:1] != "-" else 0)
    rest = s[paren + 1 :]
    close = rest.rfind(")")
    if close < 0:
        log.fail("DEREF_OPEN_BRACE", offs + len(rest))
    # Whatever follows the last ')' is dropped, as the kernel drops it.
    inner, idx = _parse_fetch(log, rest[:close], flags, offs, idx)
    if isinstance(inner, Comm | ImmString):
        log.fail("COMM_CANT_DEREF", offs)
    idx += 1
    if idx == FETCH_INSN_MAX - 1:
        log.fail("TOO_MANY_OPS", offs)
    return Deref(value, inner, user), idx


def _parse_var(log: _Log, var: str, flags: int, offs: int) -> FetchSource:
    """parse_probe_vars(): ``$retval``, ``$stack[N]``, ``$comm``, ``$argN``."""
    if var == "retval":
        if not flags & _FL_RETURN:
            log.fail("RETVAL_ON_PROBE", offs)
        return Retval()
    if var.startswith("stack"):
        rest = var[5:]
        if not rest:
            return StackPointer()
        if not _isdigit(rest[0]):
            log.fail("BAD_VAR", offs)
        n = kstrtoul(rest, 10)
        if n is None:
            log.fail("BAD_VAR", offs)
        if n > PARAM_MAX_STACK:
            log.fail("BAD_STACK_NUM", offs)
        return Stack(n)
    if var in ("comm", "COMM"):
        return Comm()
    if flags == _FL_KERNEL | _FL_FENTRY and var.startswith("arg"):
        # Only at a function's entry of a kprobe (not a kretprobe) in 6.1.
        n = kstrtoul(var[3:], 10)
        if n is None:
            log.fail("BAD_VAR", offs)
        if not n or n > PARAM_MAX_STACK:
            log.fail("BAD_ARG_NUM", offs)
        return Arg(n)
    log.fail("BAD_VAR", offs)


# --- Placing against the guest's symbols ------------------------------------------------

_DESCRIBE_RE = re.compile(
    r"^(?P<name>\S+)\+0x(?P<off>[0-9a-f]+)/0x(?P<size>[0-9a-f]+)(?: \[\S+\])?$"
)


def _describe(symbols: SymbolTable, address: int) -> tuple[str, int, int] | None:
    match = _DESCRIBE_RE.match(symbols.describe(address))
    if match is None:
        return None
    return match["name"], int(match["off"], 16), int(match["size"], 16)


def _lookup(symbols: SymbolTable, name: str) -> int | None:
    """kallsyms_lookup_name(): the first of several same-named symbols."""
    try:
        return symbols[name]
    except AmbiguousSymbol as exc:
        return exc.addresses[0] if exc.addresses else None
    except KeyError:
        return None


def _on_func_entry(
    symbols: SymbolTable, symbol: str, offset: int
) -> Literal["entry", "not_entry", "enoent"]:
    """kprobe_on_func_entry(): is SYM+OFFS the start of the symbol it falls in?"""
    base = _lookup(symbols, _from_kernel_text(symbol))
    if base is None:
        return "enoent"
    where = _describe(symbols, base + offset)
    if where is None:
        return "enoent"
    # x86 without IBT: the entry is offset 0 of the containing symbol.
    return "entry" if where[1] == 0 else "not_entry"


def _check_unique(log: _Log, symbols: SymbolTable, symbol: str) -> None:
    try:
        symbols[_from_kernel_text(symbol)]
    except AmbiguousSymbol:
        log.fail("NON_UNIQ_SYMBOL", 0)
    except KeyError:
        log.fail("BAD_PROBE_ADDR", 0)


def resolve_event(
    event: ProbeEvent,
    symbols: SymbolTable,
    *,
    is_insn_boundary: Callable[[int], bool] | None = None,
) -> ResolvedEvent:
    """Place ``event`` against the guest's symbols with the kernel's registration checks.

    Raises ``ProbeSyntaxError`` with BAD_RETPROBE, NON_UNIQ_SYMBOL, BAD_PROBE_ADDR,
    BAD_INSN_BNDRY or FAIL_REG_PROBE at the position the kernel marks (the probe point).
    """
    return _register_checks(event, symbols, is_insn_boundary)


def _register_checks(
    event: ProbeEvent,
    symbols: SymbolTable,
    is_insn_boundary: Callable[[int], bool] | None,
) -> ResolvedEvent:
    argv = [w for w in _SPACE_RE.split(_to_kernel_text(event.command)) if w]
    log = _Log(argv)
    log.index = 1
    name = event.symbol_name
    if name is not None:
        kname = _to_kernel_text(name)
        entry = _on_func_entry(symbols, kname, event.offset)
        if entry == "not_entry" and event.is_return:
            log.fail("BAD_RETPROBE", 0)
        if event.module is None:
            _check_unique(log, symbols, kname)
        base = _lookup(symbols, name)
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
    if event.is_return and where[1] != 0:
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
    )


class _Unresolved(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _resolve_source(src: FetchSource, symbols: SymbolTable) -> FetchSource:
    if isinstance(src, Deref):
        return replace(src, inner=_resolve_source(src.inner, symbols))
    if isinstance(src, SymbolAddress):
        if src.name is None:
            # traceprobe_update_arg() fails with -EINVAL: logged as FAIL_REG_PROBE.
            raise _Unresolved("FAIL_REG_PROBE", f"bad offset in @{src.expr}")
        base = _lookup(symbols, src.name)
        if base is None:
            raise _Unresolved("BAD_PROBE_ADDR", f"no symbol {src.name!r} for @{src.expr}")
        return replace(src, address=(base + src.offset) & MASK64)
    return src
