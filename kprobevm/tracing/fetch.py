"""Fetch arguments: what a kprobe event records at each hit, and how it is read.

The kernel compiles each argument into ``fetch_insn`` ops (kernel/trace/trace_probe.c)
and runs them per hit (``process_fetch_insn``). Here an argument is a small tree
(:data:`FetchSource`) plus a type, compiled once into a chain of closures, evaluated
against a :class:`FetchContext` (registers and memory of the stopped guest).

Values (see :meth:`FetchArg.fetch`): ``int`` for number types (signed ones already
signed), ``bytes`` for strings, :class:`Symbolic` for ``symbol``, ``str`` for ``symstr``,
``None`` for a read that faulted, a ``tuple`` of those for arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kprobevm.errors import GuestFaultError
from kprobevm.x86.addrspace import FOUR_LEVEL, AddressSpace
from kprobevm.x86.constants import MASK64, PAGE_SIZE
from kprobevm.x86.ptregs import ARG_REGS

__all__ = [
    "DEFAULT_TYPE",
    "FETCH_TYPES",
    "MAX_STRING_SIZE",
    "THREAD_SIZE",
    "X86_64_ARG_REGS",
    "X86_64_REGISTERS",
    "Arg",
    "ArgValue",
    "Bitfield",
    "Comm",
    "Deref",
    "EntryArg",
    "FetchArg",
    "FetchContext",
    "FetchSource",
    "FetchType",
    "Imm",
    "ImmString",
    "Reg",
    "Retval",
    "Stack",
    "StackPointer",
    "SymbolAddress",
    "Symbolic",
    "describe_source",
    "entry_arg_numbers",
    "format_value",
    "kernel_read_allowed",
    "read_arg",
    "user_read_allowed",
]

# regoffset_table in arch/x86/kernel/ptrace.c: the only names %REG accepts on x86_64
# (so "%ax" works and "%rax" is BAD_REG_NAME).
X86_64_REGISTERS = frozenset(
    {
        "r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8",
        "bx", "cx", "dx", "si", "di", "bp", "ax",
        "orig_ax", "ip", "cs", "flags", "sp", "ss",
    }
)  # fmt: skip

# regs_get_kernel_argument(): the SysV ABI registers, then the stack above the return address.
X86_64_ARG_REGS = ARG_REGS

# x86_64 without KASAN: a kernel stack, aligned to its size (regs_within_kernel_stack
# masks with it).
THREAD_SIZE = 16384
MAX_STRING_SIZE = 4096  # PATH_MAX: a fetched string keeps at most 4095 bytes
def kernel_read_allowed(address: int, space: AddressSpace = FOUR_LEVEL) -> bool:
    """Whether x86-64 6.1 lets a probe read kernel memory at ``address`` (else it faults):
    ``space`` is the guest's paging mode's split (:class:`AddressSpace`)."""
    return space.kernel_read_allowed(address)


def user_read_allowed(address: int, size: int, space: AddressSpace = FOUR_LEVEL) -> bool:
    """Whether ``access_ok`` passes a user read of ``size`` bytes at ``address``."""
    return space.user_read_allowed(address, size)


# The address space a read goes to: the kernel's, the user's, or (a kernel read on a
# kernel with the ``mixed_reads`` rule, :mod:`kprobevm.tracing.kernel_rules`) the
# user's below TASK_SIZE and the kernel's above.
KERNEL, USER, MIXED = 0, 1, 2


@dataclass(frozen=True)
class _Space:
    """Where one read goes (KERNEL, USER or MIXED) and the guest's user/kernel split."""

    kind: int
    split: AddressSpace


def _space(user: bool, mixed: bool, split: AddressSpace) -> _Space:
    return _Space(USER if user else MIXED if mixed else KERNEL, split)


class FetchContext(Protocol):
    """The stopped guest as fetch arguments see it (one hit, one vCPU)."""

    def reg(self, name: str) -> int:
        """A pt_regs field by its kernel name (``ax``, ``si``, ``ip``, ``flags``...)."""
        ...

    def read(self, address: int, size: int) -> bytes:
        """Kernel memory; raises :class:`~kprobevm.errors.GuestFaultError` when unmapped."""
        ...

    def read_user(self, address: int, size: int) -> bytes:
        """User memory of the current task; raises ``GuestFaultError`` when unmapped."""
        ...

    def symbol_address(self, name: str) -> int:
        """The address of a kernel symbol (``KeyError`` when unknown)."""
        ...

    def describe(self, address: int) -> str:
        """``address`` as the kernel's ``%pS`` prints it (``sym+0x10/0x80 [mod]`` or ``0x...``)."""
        ...

    def comm(self) -> str:
        """``current->comm``."""
        ...

    def retval(self) -> int:
        """The return value at a return probe (``regs->ax``)."""
        ...

    def stack(self, n: int) -> int:
        """The n-th word above the stack pointer, 0 outside the task's stack (as the kernel)."""
        ...

    def entry_arg(self, n: int) -> int:
        """At a return probe: the function's ``n``-th argument (1-based) as it was at its
        entry (the kernel's entry data)."""
        ...


@dataclass(frozen=True)
class FetchType:
    """One of the kernel's fetch types (``probe_fetch_types[]``)."""

    name: str
    size: int  # bytes stored in the event record (strings store a 4-byte data_loc)
    signed: bool = False
    kind: str = "int"  # int | hex | string | ustring | symstr | symbol

    @property
    def is_string(self) -> bool:
        """string, ustring and symstr are stored as dynamic data."""
        return self.kind in ("string", "ustring", "symstr")


FETCH_TYPES: dict[str, FetchType] = {
    t.name: t
    for t in [
        FetchType("string", 4, True, "string"),
        FetchType("ustring", 4, True, "ustring"),
        FetchType("symstr", 4, True, "symstr"),
        FetchType("u8", 1),
        FetchType("u16", 2),
        FetchType("u32", 4),
        FetchType("u64", 8),
        FetchType("s8", 1, True),
        FetchType("s16", 2, True),
        FetchType("s32", 4, True),
        FetchType("s64", 8, True),
        FetchType("x8", 1, False, "hex"),
        FetchType("x16", 2, False, "hex"),
        FetchType("x32", 4, False, "hex"),
        FetchType("x64", 8, False, "hex"),
        FetchType("symbol", 8, False, "symbol"),
    ]
}
DEFAULT_TYPE = FETCH_TYPES["x64"]  # DEFAULT_FETCH_TYPE is x##BITS_PER_LONG


@dataclass(frozen=True)
class Bitfield:
    """``b<width>@<offset>/<container>``: keep ``width`` bits from ``offset`` of the container."""

    width: int
    offset: int
    container: int  # bits: 8, 16, 32 or 64

    def apply(self, value: int) -> int:
        """The kernel's shift-left-then-right inside the container (FETCH_OP_MOD_BF)."""
        mask = (1 << self.container) - 1
        lshift = self.container - (self.width + self.offset)
        rshift = self.container - self.width
        return ((value << lshift) & mask) >> rshift

    def __str__(self) -> str:
        return f"b{self.width}@{self.offset}/{self.container}"


@dataclass(frozen=True)
class Symbolic:
    """A ``symbol``-typed value: the address and how ``%pS`` printed it."""

    address: int
    text: str

    def __str__(self) -> str:
        return self.text


ArgValue = int | bytes | str | Symbolic | None | tuple["ArgValue", ...]


# --- The fetch tree -------------------------------------------------------------------


@dataclass(frozen=True)
class Reg:
    """``%REG``: a pt_regs field."""

    name: str


@dataclass(frozen=True)
class Stack:
    """``$stackN``: the N-th word on the stack."""

    n: int


@dataclass(frozen=True)
class StackPointer:
    """``$stack``: the stack pointer itself."""


@dataclass(frozen=True)
class Retval:
    """``$retval`` (return probes only)."""


@dataclass(frozen=True)
class Comm:
    """``$comm``: the current task's name (a string)."""


@dataclass(frozen=True)
class Arg:
    """``$argN`` (1-based), through the x86-64 calling convention."""

    n: int


@dataclass(frozen=True)
class EntryArg:
    """``$argN`` (or a parameter's name) in a return probe: the argument saved at the
    function's entry for its return (the kernel's ``FETCH_OP_EDATA``)."""

    n: int


@dataclass(frozen=True)
class Imm:
    """``\\IMM`` or ``@ADDR``'s address: a constant."""

    value: int


@dataclass(frozen=True)
class ImmString:
    """``\\"text"``: a constant string."""

    data: bytes


@dataclass(frozen=True)
class SymbolAddress:
    """The address of ``@SYM[+|-offs]``, resolved when the event is placed."""

    expr: str  # as written after '@', e.g. "jiffies+8"
    name: str | None  # expr split at its first '+'/'-' (None: the offset does not parse)
    offset: int = 0
    address: int | None = None  # name's address + offset, once resolved


@dataclass(frozen=True)
class Deref:
    """``+|-[u]OFFS(inner)`` and the load of ``@ADDR``: read a word at ``inner + offset``."""

    offset: int
    inner: FetchSource
    user: bool = False


FetchSource = (
    Reg | Stack | StackPointer | Retval | Comm | Arg | EntryArg | Imm | ImmString | SymbolAddress
    | Deref
)  # fmt: skip

_Getter = Callable[[FetchContext], int]
_Fetcher = Callable[[FetchContext], ArgValue]


class _Fault(Exception):
    """A read failed: the argument's value is ``None`` (printed ``(fault)``)."""


def _read_word(ctx: FetchContext, address: int, space: _Space) -> int:
    return int.from_bytes(_read(ctx, address, 8, space), "little")


def _read(ctx: FetchContext, address: int, size: int, space: _Space) -> bytes:
    address &= MASK64
    kind, split = space.kind, space.split
    if kind == MIXED:
        kind = USER if address < split.task_size_max else KERNEL
    try:
        if kind == USER:
            if not split.user_read_allowed(address, size):
                raise _Fault
            data = ctx.read_user(address, size)
        else:
            if not split.kernel_read_allowed(address):
                raise _Fault
            data = ctx.read(address, size)
    except GuestFaultError as exc:
        raise _Fault from exc
    if len(data) != size:
        raise _Fault
    return data


def _read_string(ctx: FetchContext, address: int, space: _Space) -> bytes:
    """A NUL-terminated string, at most 4095 bytes; faults anywhere before the NUL fault it."""
    out = bytearray()
    address &= MASK64
    while len(out) < MAX_STRING_SIZE:
        # Read up to the page end at most: a fault past the NUL must not count.
        chunk = min(256, PAGE_SIZE - (address % PAGE_SIZE), MAX_STRING_SIZE - len(out))
        data = _read(ctx, address, chunk, space)
        nul = data.find(b"\0")
        if nul >= 0:
            out += data[:nul]
            return bytes(out)
        out += data
        address = (address + chunk) & MASK64
    return bytes(out[: MAX_STRING_SIZE - 1])


def _compile_source(src: FetchSource, mixed: bool, split: AddressSpace) -> _Getter:
    """Stage 1 and 2 of process_fetch_insn: the value before it is stored (``mixed``:
    kernel reads below TASK_SIZE read user memory; ``split``: where TASK_SIZE is)."""
    match src:
        case Reg(name):
            return lambda ctx: ctx.reg(name) & MASK64
        case Stack(n):
            return lambda ctx: ctx.stack(n) & MASK64
        case StackPointer():
            return lambda ctx: ctx.reg("sp") & MASK64
        case Retval():
            return lambda ctx: ctx.retval() & MASK64
        case Arg(n):
            if n <= len(X86_64_ARG_REGS):
                reg = X86_64_ARG_REGS[n - 1]
                return lambda ctx: ctx.reg(reg) & MASK64
            # Argument 7 is the first word above the return address: $stack1.
            slot = n - len(X86_64_ARG_REGS)
            return lambda ctx: ctx.stack(slot) & MASK64
        case EntryArg(n):
            return lambda ctx: ctx.entry_arg(n) & MASK64
        case Imm(value):
            imm = value & MASK64
            return lambda ctx: imm
        case SymbolAddress(_, sym, sym_offset, address):
            if address is not None:
                resolved = address & MASK64
                return lambda ctx: resolved
            return lambda ctx: _lookup_symbol(ctx, sym, sym_offset)
        case Deref(offset, inner, user):
            get, space = _compile_source(inner, mixed, split), _space(user, mixed, split)
            return lambda ctx: _read_word(ctx, get(ctx) + offset, space)
        case Comm() | ImmString():
            raise TypeError(f"{src!r} is a string and has no numeric value")
    raise TypeError(f"unknown fetch source {src!r}")


def entry_arg_numbers(args: tuple[FetchArg, ...]) -> tuple[int, ...]:
    """The arguments (1-based, ascending) a return probe's ``args`` read as they were at
    the function's entry: what its entry handler must save."""
    found: set[int] = set()
    for arg in args:
        src = arg.source
        while isinstance(src, Deref):
            src = src.inner
        if isinstance(src, EntryArg):
            found.add(src.n)
    return tuple(sorted(found))


def read_arg(ctx: FetchContext, n: int) -> int:
    """``$argN`` read from ``ctx`` at a function's entry (registers, then the stack)."""
    return _compile_source(Arg(n), False, FOUR_LEVEL)(ctx)


def _lookup_symbol(ctx: FetchContext, name: str | None, offset: int) -> int:
    if name is None:
        raise _Fault
    try:
        return (ctx.symbol_address(name) + offset) & MASK64
    except KeyError as exc:
        raise _Fault from exc


def _to_int(data: bytes, ftype: FetchType) -> int:
    return int.from_bytes(data, "little", signed=ftype.signed)


def _store_number(value: int, ftype: FetchType, bitfield: Bitfield | None) -> int:
    value &= (1 << (8 * ftype.size)) - 1
    if bitfield is not None:
        value = bitfield.apply(value)
    if ftype.signed and value >= 1 << (8 * ftype.size - 1):
        value -= 1 << (8 * ftype.size)
    return value


@dataclass(frozen=True)
class FetchArg:
    """One ``NAME=FETCHARG[:TYPE]`` of an event, parsed; :meth:`fetch` reads it at a hit."""

    name: str
    comm: str  # the argument as written after NAME= (kprobe_events shows it)
    source: FetchSource
    type: FetchType = DEFAULT_TYPE
    count: int = 0  # array length, 0 for a scalar
    bitfield: Bitfield | None = None
    mixed: bool = False
    """Kernel reads of user addresses read user memory (the guest kernel's
    ``mixed_reads`` rule, set when the event is planned)."""
    split: AddressSpace = FOUR_LEVEL
    """Where the guest's user space ends and its kernel half begins (its paging mode,
    set when the event is planned)."""
    _compiled: list[_Fetcher] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def type_name(self) -> str:
        """The type as written (``u32``, ``b4@4/32``, ``string[2]``)."""
        base = str(self.bitfield) if self.bitfield else self.type.name
        return f"{base}[{self.count}]" if self.count else base

    def fetch(self, ctx: FetchContext) -> ArgValue:
        """This argument's value at the current hit; faults give ``None``."""
        if not self._compiled:
            self._compiled.append(self._compile())
        return self._compiled[0](ctx)

    def format(self, value: ArgValue) -> str:
        """``value`` as the kernel prints this argument (``0x1f``, ``"name"``, ``{1,2}``)."""
        return format_value(self.type, value)

    def _compile(self) -> _Fetcher:
        one = self._compile_element()
        if not self.count:
            return one
        return self._compile_array()

    def _compile_element(self) -> _Fetcher:
        ftype, src, bitfield = self.type, self.source, self.bitfield
        if ftype.kind in ("string", "ustring"):
            return _guard(self._string_fetcher())
        mixed, split = self.mixed, self.split
        if ftype.kind == "symstr":
            get = _compile_source(src, mixed, split)
            return _guard(lambda ctx: ctx.describe(get(ctx)))
        if isinstance(src, Deref):
            # The last dereference becomes the store itself: read type.size bytes (ST_MEM).
            inner = _compile_source(src.inner, mixed, split)
            off, space, size = src.offset, _space(src.user, mixed, split), ftype.size

            def load(ctx: FetchContext) -> int:
                return _to_int(_read(ctx, inner(ctx) + off, size, space), ftype)

            number: _Getter = load
        else:
            number = _compile_source(src, mixed, split)
        if ftype.kind == "symbol":
            return _guard(lambda ctx: _symbolic(ctx, number(ctx)))
        return _guard(lambda ctx: _store_number(number(ctx), ftype, bitfield))

    def _string_fetcher(self) -> _Fetcher:
        user_type, mixed, split = self.type.kind == "ustring", self.mixed, self.split
        src = self.source
        if isinstance(src, Comm):
            return lambda ctx: ctx.comm().encode("utf-8", "surrogateescape")[:15]
        if isinstance(src, ImmString):
            data = src.data
            return lambda ctx: data
        if isinstance(src, Deref):
            inner = _compile_source(src.inner, mixed, split)
            off, space = src.offset, _space(src.user or user_type, mixed, split)
            return lambda ctx: _read_string(ctx, inner(ctx) + off, space)
        # An immediate (\IMM, never dereferenced) is the string's address.
        addr, space = _compile_source(src, mixed, split), _space(user_type, mixed, split)
        return lambda ctx: _read_string(ctx, addr(ctx), space)

    def _compile_array(self) -> _Fetcher:
        count, ftype, src, bitfield = self.count, self.type, self.source, self.bitfield
        mixed, split = self.mixed, self.split
        if ftype.is_string:
            # An array of char pointers: element i is the string at *(base + off + 8*i).
            if not isinstance(src, Deref):
                first = self._compile_element()
                return lambda ctx: (first(ctx),) + (None,) * (count - 1)
            base = _compile_source(src.inner, mixed, split)
            off, space = src.offset, _space(src.user, mixed, split)
            str_space = _space(src.user or ftype.kind == "ustring", mixed, split)

            def strings(ctx: FetchContext) -> ArgValue:
                try:
                    start = base(ctx)
                except _Fault:
                    return (None,) * count
                out: list[ArgValue] = []
                for i in range(count):
                    try:
                        ptr = _read_word(ctx, start + 8 * i + off, space)
                        out.append(_read_string(ctx, ptr, str_space))
                    except _Fault:
                        out.append(None)
                return tuple(out)

            return strings
        assert isinstance(src, Deref)  # the parser allows arrays of memory only
        base = _compile_source(src.inner, mixed, split)
        off, size, space = src.offset, ftype.size, _space(False, mixed, split)

        def numbers(ctx: FetchContext) -> ArgValue:
            try:
                start = base(ctx) + off
            except _Fault:
                return (None,) * count
            out: list[ArgValue] = []
            for i in range(count):
                try:
                    raw = _to_int(_read(ctx, start + i * size, size, space), ftype)
                except _Fault:
                    out.append(None)
                    continue
                if ftype.kind == "symbol":
                    out.append(_symbolic(ctx, raw))
                else:
                    out.append(_store_number(raw, ftype, bitfield))
            return tuple(out)

        return numbers


def _symbolic(ctx: FetchContext, value: int) -> Symbolic:
    value &= MASK64
    return Symbolic(value, ctx.describe(value))


def _guard(fetch: Callable[[FetchContext], ArgValue]) -> _Fetcher:
    def guarded(ctx: FetchContext) -> ArgValue:
        try:
            return fetch(ctx)
        except _Fault:
            return None

    return guarded


FAULT_TEXT = "(fault)"


def format_value(ftype: FetchType, value: ArgValue) -> str:
    """A value as print_probe_args() prints it for ``ftype``."""
    if isinstance(value, tuple):
        return "{" + ",".join(format_value(ftype, v) for v in value) + "}"
    if value is None:
        # Strings print (fault) in the kernel; for numbers the kernel leaves the ring
        # buffer's old bytes (undefined), and we say fault instead of inventing a number.
        return FAULT_TEXT
    return _formatter(ftype.name)(value)


@functools.cache
def _formatter(name: str) -> Callable[[ArgValue], str]:
    ftype = FETCH_TYPES[name]
    if ftype.kind in ("string", "ustring", "symstr"):

        def string(value: ArgValue) -> str:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "backslashreplace")
            return f'"{value}"'

        return string
    if ftype.kind == "symbol":
        return str
    if ftype.kind == "hex":
        return lambda value: f"0x{value:x}"  # type: ignore[str-bytes-safe]
    return str


def describe_source(src: FetchSource) -> str:
    """How a fetch source is read, innermost first (the kernel's fetch_insn chain)."""
    match src:
        case Reg(name):
            return f"reg {name}"
        case Stack(n):
            return f"stack word {n}"
        case StackPointer():
            return "reg sp"
        case Retval():
            return "reg ax at return"
        case Comm():
            return "current->comm"
        case Arg(n):
            regs = X86_64_ARG_REGS
            return f"reg {regs[n - 1]}" if n <= len(regs) else f"stack word {n - len(regs)}"
        case EntryArg(n):
            return f"{describe_source(Arg(n))} saved at entry"
        case Imm(value):
            return f"imm {value:#x}"
        case ImmString(data):
            return f"imm string {data!r}"
        case SymbolAddress(expr, _, _, address):
            where = f"{address:#x}" if address is not None else "unresolved"
            return f"address of {expr} ({where})"
        case Deref(offset, inner, user):
            space = "user" if user else "kernel"
            return f"{describe_source(inner)} -> {space} load at {offset:+#x}"
    return repr(src)
