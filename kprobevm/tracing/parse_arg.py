"""One argument of a kprobe_events definition, parsed as the 6.1 kernel parses it.

Follows ``traceprobe_parse_probe_arg`` and what it calls (kernel/trace/trace_probe.c):
``[NAME=]FETCHARG[:TYPE]``, the fetch expression compiled into the kernel's ops (counted,
since the kernel refuses more than it has room for), the type and array rules and the
store op they pick, with the kernel's error names and caret positions. Where a later
kernel parses otherwise (BTF arguments, error positions), :class:`Dialect` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from kprobevm.tracing.btf_args import BtfValue, FunctionPrototype
from kprobevm.tracing.errors import ProbeLog
from kprobevm.tracing.fetch import (
    DEFAULT_TYPE,
    FETCH_TYPES,
    THREAD_SIZE,
    X86_64_REGISTERS,
    Arg,
    Bitfield,
    Comm,
    Deref,
    EntryArg,
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
from kprobevm.tracing.kernel_text import (
    from_kernel_text,
    is_good_name,
    isdigit,
    kstrtol,
    kstrtouint,
    kstrtoul,
    simple_strtoul,
)

__all__ = [
    "FL_FENTRY",
    "FL_KERNEL",
    "FL_RETURN",
    "Dialect",
    "parse_probe_arg",
    "split_symbol_offset",
]

MAX_ARGSTR_LEN = 63
MAX_ARG_NAME_LEN = 32
MAX_ARRAY_LEN = 64
MAX_PROBE_EVENT_SIZE = 3072
FETCH_INSN_MAX = 16  # ops per argument; the last slot is FETCH_OP_END
PARAM_MAX_STACK = THREAD_SIZE // 8  # the words of a kernel stack

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
FL_RETURN = 1
FL_KERNEL = 2
FL_FENTRY = 4


@dataclass(frozen=True)
class Dialect:
    """How the guest kernel parses arguments where kernels differ (the parsing rules of
    :data:`~kprobevm.tracing.kernel_rules.RULES`); the default is 6.1's."""

    btf_args: bool = False
    """Arguments may name the probed function's parameters and take their BTF types."""
    sticky_deref_offset: bool = False
    """An error after a ``+OFF(...)`` in the same argument has its caret past ``+OFF(``."""
    entry_args_at_return: bool = False
    """A return probe may fetch the function's arguments: saved at its entry."""
    function: FunctionPrototype | None = None
    """The probed function's prototype from the guest's BTF (None: not known)."""


def _next_op(log: ProbeLog, idx: int, offset: int) -> int:
    """One more fetch op in the kernel's array, or TOO_MANY_OPS when it is full."""
    idx += 1
    if idx == FETCH_INSN_MAX - 1:
        log.fail("TOO_MANY_OPS", offset)
    return idx


def split_symbol_offset(expr: str) -> tuple[str, int] | None:
    """traceprobe_split_symbol_offset(): split at the first '+' or '-'."""
    for i, ch in enumerate(expr):
        if ch in "+-":
            value = kstrtol(expr[i:])
            return None if value is None else (expr[:i], value)
    return expr, 0


def parse_probe_arg(
    log: ProbeLog,
    word: str,
    i: int,
    flags: int,
    previous: list[FetchArg],
    size: int,
    dialect: Dialect = Dialect(),
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
        if dialect.btf_args and is_good_name(word.split(":", 1)[0]):
            name = word.split(":", 1)[0]  # a parameter's name names its argument
    if not is_good_name(name):
        log.fail("BAD_ARG_NAME", 0)
    if name in RESERVED_FIELD_NAMES or any(a.name == name for a in previous):
        log.fail("USED_ARG_NAME", 0)
    return _parse_arg_body(log, name, body, offset, flags, size, dialect)


def _find_fetch_type(t: str | None) -> FetchType | None:
    """find_fetch_type(): the type a ``:TYPE`` names (x64 when none), None if unknown."""
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


def _top_op(src: FetchSource) -> str:
    """The fetch_insn op ``src`` ends in, as the kernel names it (the checks look at it)."""
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
        case EntryArg():
            return "EDATA"
        case Imm():
            return "IMM"
        case ImmString():
            return "DATA"
        case Comm():
            return "COMM"
    return "NOP"


def _parse_arg_body(
    log: ProbeLog, name: str, body: str, offset: int, flags: int, size: int, dialect: Dialect
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

    src, idx = _parse_fetch(log, arg, flags, offset, 0, dialect)
    # Errors after the fetch: a kernel with the sticky offset counts them from past the
    # outermost +OFF( it parsed.
    late = offset + ((_deref_lead(arg) or 0) if dialect.sticky_deref_offset else 0)
    type_pos += late - offset
    btf = _btf_value(arg, flags, dialect)
    if btf is not None:
        if t is None:
            ftype = FETCH_TYPES[btf.fetch_type or "x64"]
        elif "string" in t and not btf.char_array:
            if not btf.char_pointer:
                log.fail("BAD_TYPE4STR", late)
            idx = _next_op(log, idx, late)  # read through the char pointer first
            src = Deref(0, src, user=t[:1] == "u")
    size += ftype.size * (count or 1)
    if size > MAX_PROBE_EVENT_SIZE:
        log.fail("EVENT_TOO_BIG", offset)
    top = _top_op(src)

    # The store op (FETCH_OP_ST_*), as traceprobe_parse_probe_arg_body() picks it.
    if ftype.is_string:
        if ftype.kind == "symstr":
            if top not in ("REG", "STACK", "RETVAL", "ARG", "DEREF"):
                log.fail("BAD_SYMSTRING", type_pos)
        elif top not in ("DEREF", "UDEREF", "IMM", "COMM", "DATA"):
            log.fail("BAD_STRING", type_pos)
        if ftype.kind == "symstr" or top in ("IMM", "COMM", "DATA") or count:
            idx = _next_op(log, idx, late)
        store = "ST_USTRING" if ftype.kind == "ustring" or top == "UDEREF" else "ST_STRING"
        if ftype.kind == "symstr":
            store = "ST_SYMSTR"
    elif top in ("DEREF", "UDEREF"):
        store = "ST_MEM" if top == "DEREF" else "ST_UMEM"
    else:
        idx = _next_op(log, idx, late)
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
        idx = _next_op(log, idx, late)

    fetch_arg = FetchArg(
        name=from_kernel_text(name),
        comm=from_kernel_text(body),
        source=src,
        type=ftype,
        count=count,
        bitfield=bitfield,
    )
    return fetch_arg, size


def _btf_value(arg: str, flags: int, dialect: Dialect) -> BtfValue | None:
    """What the guest's BTF says of the value ``arg`` fetches: ``$retval`` in a return
    probe, or a parameter named at the entry (None: no BTF type, or a 6.1 dialect)."""
    function = dialect.function
    if not dialect.btf_args or function is None:
        return None
    if arg == "$retval":
        return function.returns if flags & FL_RETURN else None
    found = function.param(arg) if is_good_name(arg) else None
    return found[1] if found is not None else None


def _deref_lead(arg: str) -> int | None:
    """How far ``+|-[u]OFFS(`` moves the kernel's error position: to just inside the
    brace, one byte short for ``+u``/``-u`` (the kernel's own arithmetic); None when
    ``arg`` is no such dereference."""
    if arg[:1] not in ("+", "-"):
        return None
    s = arg[0] + arg[2:] if arg[1:2] == "u" else arg
    if s[0] == "+":
        s = s[1:]
    paren = s.find("(")
    if paren < 0:
        return None
    return paren + 1 + (1 if s[:1] != "-" else 0)


def _parse_bitfield(t: str, ftype: FetchType) -> Bitfield | None:
    """__parse_bitfield_probe_arg(): ``b<width>@<offset>/<size>``, None when invalid."""
    width, end = simple_strtoul(t[1:])
    rest = t[1 + end :]
    if width == 0 or rest[:1] != "@":
        return None
    rest = rest[1:]
    bit_offset, end = simple_strtoul(rest)
    if end == 0 or rest[end : end + 1] != "/":
        return None
    container = 8 * ftype.size
    if container < width + bit_offset:
        return None
    return Bitfield(width, bit_offset, container)


def _parse_fetch(
    log: ProbeLog, arg: str, flags: int, offs: int, idx: int, dialect: Dialect
) -> tuple[FetchSource, int]:
    """parse_probe_arg(): one fetch expression; ``idx`` counts the kernel's op slots."""
    head = arg[:1]
    if head == "$":
        return _parse_var(log, arg[1:], flags, offs, dialect), idx
    if head == "%":
        if arg[1:] not in X86_64_REGISTERS:
            log.fail("BAD_REG_NAME", offs)
        return Reg(arg[1:]), idx
    if head == "@":
        if isdigit(arg[1:2]):
            value = kstrtoul(arg[1:])
            if value is None:
                log.fail("BAD_MEM_ADDR", offs)
            inner: FetchSource = Imm(value)
        elif arg[1:2] == "+":
            log.fail("FILE_ON_KPROBE", offs)
        else:
            # The symbol is looked up when the event is registered.
            expr = arg[1:]
            split = split_symbol_offset(expr)
            inner = SymbolAddress(
                expr=from_kernel_text(expr),
                name=from_kernel_text(split[0]) if split else None,
                offset=split[1] if split else 0,
            )
            idx = _next_op(log, idx, offs)  # FETCH_NOP_SYMBOL, then FETCH_OP_IMM
        idx = _next_op(log, idx, offs)
        return Deref(0, inner), idx
    if head in ("+", "-"):
        return _parse_deref(log, arg, flags, offs, idx, dialect)
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
    if dialect.btf_args and (head.isalpha() or head == "_") and head.isascii():
        return _parse_btf_param(log, arg, flags, offs, dialect), idx
    log.fail("BAD_FETCH_ARG", offs)


def _parse_btf_param(
    log: ProbeLog, arg: str, flags: int, offs: int, dialect: Dialect
) -> Arg | EntryArg:
    """parse_btf_arg(): a parameter of the probed function, by name."""
    entry = flags == FL_KERNEL | FL_FENTRY
    at_return = flags == FL_KERNEL | FL_RETURN and dialect.entry_args_at_return
    if not entry and not at_return:
        log.fail("NOSUP_BTFARG", offs)
    if "." in arg or "-" in arg:
        log.fail("UNSUPPORTED", offs, "BTF field access (->, .)")
    function = dialect.function
    if function is None or not function.params:
        log.fail("NO_BTF_ENTRY", offs)
    found = function.param(arg)
    if found is None:
        log.fail("NO_BTFARG", offs)
    return Arg(found[0] + 1) if entry else EntryArg(found[0] + 1)


def _str_to_immediate(s: str) -> int | None:
    """str_to_immediate(): ``\\IMM``'s number, unsigned or with a sign; None if invalid."""
    if isdigit(s[:1]):
        return kstrtoul(s)
    if s[:1] == "-":
        return kstrtol(s)
    if s[:1] == "+":
        return kstrtol(s[1:])
    return None


def _parse_deref(
    log: ProbeLog, arg: str, flags: int, offs: int, idx: int, dialect: Dialect
) -> tuple[FetchSource, int]:
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
    inner, idx = _parse_fetch(log, rest[:close], flags, offs, idx, dialect)
    if isinstance(inner, Comm | ImmString):
        log.fail("COMM_CANT_DEREF", offs)
    idx = _next_op(log, idx, offs)
    return Deref(value, inner, user), idx


def _parse_var(log: ProbeLog, var: str, flags: int, offs: int, dialect: Dialect) -> FetchSource:
    """parse_probe_vars(): ``$retval``, ``$stack[N]``, ``$comm``, ``$argN``."""
    if var == "retval" or (dialect.btf_args and var.startswith("retval")):
        if not flags & FL_RETURN:
            log.fail("RETVAL_ON_PROBE", offs)
        function = dialect.function
        if dialect.btf_args and var != "retval":  # taken for a parameter's name
            log.fail("NO_BTFARG" if function and function.params else "NO_BTF_ENTRY", offs)
        if dialect.btf_args and function is not None and function.returns is None:
            log.fail("NO_RETVAL", offs)
        return Retval()
    if var.startswith("stack"):
        rest = var[5:]
        if not rest:
            return StackPointer()
        if not isdigit(rest[0]):
            log.fail("BAD_VAR", offs)
        n = kstrtoul(rest, 10)
        if n is None:
            log.fail("BAD_VAR", offs)
        if n > PARAM_MAX_STACK:
            log.fail("BAD_STACK_NUM", offs)
        return Stack(n)
    if var in ("comm", "COMM"):
        return Comm()
    entry = flags == FL_KERNEL | FL_FENTRY
    if (entry or dialect.entry_args_at_return) and var.startswith("arg"):
        # At a function's entry of a kprobe; since 6.11 also in a return probe, which
        # reads the value its entry saved, and anywhere else NOFENTRY_ARGS (6.1: BAD_VAR).
        n = kstrtoul(var[3:], 10)
        if n is None:
            log.fail("BAD_VAR", offs)
        if not n or n > PARAM_MAX_STACK:
            log.fail("BAD_ARG_NUM", offs)
        if entry:
            return Arg(n)
        if flags != FL_KERNEL | FL_RETURN:
            log.fail("NOFENTRY_ARGS", offs)
        return EntryArg(n)
    log.fail("BAD_VAR", offs)
