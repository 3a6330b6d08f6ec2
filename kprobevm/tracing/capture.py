"""Fetch arguments as reads the guest makes at a hit: the capture plan of a recorded event.

A recorded event (:mod:`kprobevm.kprobes.recorder`) is evaluated on the host after the hit, by
the same :class:`~kprobevm.tracing.fetch.FetchArg` code as a stopped one, against the
record instead of the live guest. So the guest must read, at the hit, every address that
evaluation will ask for. :func:`record_spec` walks each argument's fetch tree the way
``_compile_source`` does and lists those reads, each based on a register of the
snapshot, on an earlier read (nested dereferences) or on a constant. What cannot be
read ahead this way raises :class:`Unrecordable`, and the event stops the guest instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.tracing import fetch
from kprobevm.tracing.fetch import X86_64_ARG_REGS, Comm, Deref, FetchArg, FetchSource, ImmString
from kprobevm.x86.constants import MASK64
from kprobevm.x86.record import SNAPSHOT_REGS, Capture

__all__ = ["DEFAULT_STRING_SIZE", "MODES", "Unrecordable", "record_spec"]

MODES = ("auto", "record", "stop")
"""How a trace session places its events: recorded by the guest (no stop per hit),
stopping the guest at each hit, or recorded when every event can be (auto, the default)."""
DEFAULT_STRING_SIZE = 256
"""Bytes a recorded string keeps, its NUL included (the kernel keeps up to 4,096)."""


class Unrecordable(Exception):
    """This argument cannot be read ahead by the guest (the reason is the message)."""


@dataclass(frozen=True)
class _Base:
    """Where a value is at the hit: a snapshot register, an earlier read, or a constant."""

    reg: str | None = None
    capture: int | None = None
    const: int = 0

    def at(
        self, offset: int, size: int, *, string: bool = False, user: bool = False,
        mixed: bool = False,
    ) -> Capture:
        return Capture(
            offset=(self.const + offset) & MASK64, size=size, reg=self.reg,
            from_capture=self.capture, string=string, user=user, mixed=mixed and not user,
        )  # fmt: skip


class _Planner:
    def __init__(self, string_size: int, at_return: bool = False) -> None:
        self.captures: list[Capture] = []
        self.string_size = string_size
        self.at_return = at_return  # a return probe's: $retval is the returned %ax
        self.mixed = False  # the argument being planned reads mixed (FetchArg.mixed)

    def read(self, capture: Capture) -> _Base:
        self.captures.append(capture)
        return _Base(capture=len(self.captures) - 1)

    def base(self, src: FetchSource) -> _Base:
        """The value ``src`` evaluates to, as the record program can find it."""
        match src:
            case fetch.Reg(name):
                if name == "orig_ax":
                    return _Base(const=MASK64)  # the int3 entry's -1, as HitContext says
                if name not in SNAPSHOT_REGS:
                    raise Unrecordable(f"%{name} is not in the record's registers")
                return _Base(reg=name)
            case fetch.StackPointer():
                return _Base(reg="sp")
            case fetch.Stack(n):
                return self.read(_Base(reg="sp").at(8 * n, 8))
            case fetch.Arg(n):
                if n <= len(X86_64_ARG_REGS):
                    return _Base(reg=X86_64_ARG_REGS[n - 1])
                return self.base(fetch.Stack(n - len(X86_64_ARG_REGS)))
            case fetch.Imm(value):
                return _Base(const=value & MASK64)
            case fetch.SymbolAddress(expr, _, _, address):
                if address is None:
                    raise Unrecordable(f"@{expr} is not resolved to an address")
                return _Base(const=address & MASK64)
            case fetch.Deref(offset, inner, user):
                return self.read(self.base(inner).at(offset, 8, user=user, mixed=self.mixed))
            case fetch.Retval():
                if self.at_return:
                    return _Base(reg="ax")
                raise Unrecordable("$retval is known at the return only")
            case fetch.EntryArg(n):
                raise Unrecordable(f"$arg{n} at a return is saved at the function's entry,"
                                   " which recorded return probes do not do")
            case fetch.Comm() | fetch.ImmString():
                raise Unrecordable(f"{src!r} has no numeric value")
        raise Unrecordable(f"unknown fetch source {src!r}")

    def argument(self, arg: FetchArg) -> None:
        ftype, src = arg.type, arg.source
        self.mixed = arg.mixed
        if arg.count:
            if ftype.is_string:
                raise Unrecordable(f"{arg.name}: arrays of strings are read on a stop")
            assert isinstance(src, Deref)
            base = self.base(src.inner)
            for i in range(arg.count):
                self.read(base.at(src.offset + i * ftype.size, ftype.size, mixed=arg.mixed))
            return
        if ftype.kind in ("string", "ustring"):
            user_type = ftype.kind == "ustring"
            if isinstance(src, Comm | ImmString):
                return  # the record's comm, or a constant
            if isinstance(src, Deref):
                where, offset, user = self.base(src.inner), src.offset, src.user or user_type
            else:
                where, offset, user = self.base(src), 0, user_type
            self.read(
                where.at(offset, self.string_size, string=True, user=user, mixed=arg.mixed)
            )
            return
        if ftype.kind != "symstr" and isinstance(src, Deref):
            # the last dereference reads the type's size (ST_MEM)
            self.read(
                self.base(src.inner).at(src.offset, ftype.size, user=src.user, mixed=arg.mixed)
            )
            return
        self.base(src)


def record_spec(
    args: Sequence[FetchArg], *, string_size: int = DEFAULT_STRING_SIZE, at_return: bool = False
) -> RecordSpec:
    """The reads a recorded event's arguments need, in the order they are evaluated
    (``at_return``: a return probe's, read at the return)."""
    planner = _Planner(string_size, at_return)
    for arg in args:
        planner.argument(arg)
    return RecordSpec(captures=tuple(planner.captures), at_return=at_return)
