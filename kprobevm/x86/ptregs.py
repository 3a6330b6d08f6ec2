"""PtRegs: a vCPU's registers as a kprobe handler sees them (the kernel's ``struct pt_regs``).

Names follow the kernel's x86-64 ``pt_regs`` (``ax``, ``di``, ``ip``, ``flags``, ...);
values come from the gdbstub's names (``rax``, ``rdi``, ``rip``, ``eflags``, ...). A
handler may assign to any of them; :meth:`PtRegs.changes` tells the engine which to
write back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kprobevm.errors import KprobeError
from kprobevm.x86.constants import MASK64

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.x86.unwind_orc import KernelStack

__all__ = ["ARG_REGS", "GDB_NAMES", "PtRegs", "to_gdb_names"]

# pt_regs name -> gdbstub register name (QEMU's i386-64bit.xml).
GDB_NAMES: dict[str, str] = {
    "ax": "rax", "bx": "rbx", "cx": "rcx", "dx": "rdx",
    "si": "rsi", "di": "rdi", "bp": "rbp", "sp": "rsp",
    "r8": "r8", "r9": "r9", "r10": "r10", "r11": "r11",
    "r12": "r12", "r13": "r13", "r14": "r14", "r15": "r15",
    "ip": "rip", "flags": "eflags", "cs": "cs", "ss": "ss",
    "ds": "ds", "es": "es", "fs": "fs", "gs": "gs",
    "fs_base": "fs_base", "gs_base": "gs_base",
}  # fmt: skip

ARG_REGS = ("di", "si", "dx", "cx", "r8", "r9")
"""The SysV ABI's integer argument registers, in order; later arguments are on the stack."""

ReadAlong = Callable[[Sequence[bytes]], tuple[dict[str, int], list[bytes]]]
"""Registers (gdb names) and the replies to other packets, in one round trip."""


def _expired(why: str) -> dict[str, int]:
    raise KprobeError(why)


def to_gdb_names(values: Mapping[str, int], *, skip: Collection[str] = ()) -> dict[str, int]:
    """pt_regs-named ``values`` by gdbstub register name, leaving out ``skip``."""
    return {GDB_NAMES[k]: v for k, v in values.items() if k in GDB_NAMES and k not in skip}


def _pt_names(gdb_values: dict[str, int]) -> dict[str, int]:
    return {name: gdb_values[g] for name, g in GDB_NAMES.items() if g in gdb_values}


class PtRegs:
    """Registers of one vCPU at a probe, plus the vCPU and the guest's memory.

    Built :meth:`lazy`, the registers are read from the vCPU on first use: a handler
    that reads none (a counter) costs the hit no ``g`` round trip.
    """

    __slots__ = ("_along", "_load", "_orig", "_values", "cpu", "memory", "stack")
    _values: dict[str, int]
    _orig: dict[str, int]
    _load: Callable[[], dict[str, int]] | None
    _along: ReadAlong | None
    cpu: int
    memory: GuestMemory | None
    stack: KernelStack | None
    """The kernel stack at the hit, for a probe made with ``stack=True`` (else None)."""

    def __init__(self, values: dict[str, int], *, cpu: int, memory: GuestMemory | None) -> None:
        # values are keyed by pt_regs name; _orig remembers them to find what changed
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_orig", dict(values))
        object.__setattr__(self, "_load", None)
        object.__setattr__(self, "_along", None)
        object.__setattr__(self, "cpu", cpu)
        object.__setattr__(self, "memory", memory)
        object.__setattr__(self, "stack", None)

    @classmethod
    def from_gdb(
        cls, gdb_values: dict[str, int], *, cpu: int, memory: GuestMemory | None = None
    ) -> PtRegs:
        """Build from a decoded ``g`` packet (gdb register names)."""
        return cls(_pt_names(gdb_values), cpu=cpu, memory=memory)

    @classmethod
    def lazy(
        cls,
        load: Callable[[], dict[str, int]],
        *,
        known: dict[str, int],
        cpu: int,
        memory: GuestMemory | None = None,
        along: ReadAlong | None = None,
    ) -> PtRegs:
        """Registers that ``load`` (a ``g`` read, gdb names) fetches on first use.

        ``known`` (pt_regs names, e.g. the probe's ``ip``) is served without a read and
        overrides what ``load`` returns. ``along`` does the same read with other packets
        in its round trip (:meth:`read_along`).
        """
        regs = cls(dict(known), cpu=cpu, memory=memory)
        object.__setattr__(regs, "_load", load)
        object.__setattr__(regs, "_along", along)
        return regs

    def read_along(self, packets: Sequence[bytes]) -> list[bytes] | None:
        """Read the registers now, with ``packets`` in the same round trip; their replies.

        None when that is not possible (the registers were read already, or they do not
        come from a vCPU read): the caller reads as usual.
        """
        along = self._along
        if along is None or self._load is None:
            return None
        values, replies = along(packets)
        object.__setattr__(self, "_load", lambda: values)
        self._materialise()
        return replies

    @property
    def loaded(self) -> bool:
        """False while the registers of a lazy PtRegs have not been read."""
        return self._load is None

    def _materialise(self) -> None:
        load = self._load
        if load is None:
            return
        values = _pt_names(load())
        values.update(self._values)
        object.__setattr__(self, "_load", None)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_orig", dict(values))

    def expire(self, why: str) -> None:
        """After the hit: an unread lazy PtRegs raises instead of reading a running vCPU."""
        if self._load is not None:
            # a partial, not a closure over self: no reference cycle for the GC per hit
            object.__setattr__(self, "_load", functools.partial(_expired, why))

    def __getattr__(self, name: str) -> int:
        try:
            value: int = self._values[name]
        except KeyError:
            if self._load is None:
                raise AttributeError(f"pt_regs has no register {name!r}") from None
            self._materialise()
            return self.__getattr__(name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("cpu", "memory", "stack"):
            object.__setattr__(self, name, value)
            return
        self._materialise()
        if name not in self._values:
            raise AttributeError(f"pt_regs has no register {name!r}")
        if not isinstance(value, int):
            raise TypeError(f"register {name} must be an int, not {type(value).__name__}")
        self._values[name] = value & MASK64

    def __getitem__(self, name: str) -> int:
        return self.__getattr__(name)

    def arg(self, n: int) -> int:
        """The n-th (1-based) integer argument at a function's entry (x86-64 SysV ABI)."""
        if 1 <= n <= len(ARG_REGS):
            return self.__getattr__(ARG_REGS[n - 1])
        if self.memory is None:
            raise ValueError(f"argument {n} is on the stack and no guest memory is attached")
        # the return address is at sp; stack arguments follow it
        return self.memory.u64(self.__getattr__("sp") + 8 * (n - len(ARG_REGS)))

    def as_dict(self) -> dict[str, int]:
        self._materialise()
        return dict(self._values)

    def place_at(self, ip: int) -> None:
        """Show the hit at ``ip``, as a fact and not a change (nothing is read or written
        back): a probe on an ftrace site sees its own address, not the int3's."""
        self._values["ip"] = ip
        self._orig["ip"] = ip

    def changes(self) -> dict[str, int]:
        """Registers a handler assigned a new value, by pt_regs name (none if unread)."""
        return {k: v for k, v in self._values.items() if self._orig.get(k) != v}

    def gdb_writes(self, *, rip: int | None) -> dict[str, int]:
        """The changed registers by gdbstub name, RIP set to ``rip`` (left out if None):
        what goes back to the vCPU when the hit resumes."""
        values = to_gdb_names(self.changes(), skip=("ip",))
        if rip is not None:
            values["rip"] = rip
        return values

    def __repr__(self) -> str:
        if self._load is not None:
            return f"<PtRegs cpu={self.cpu} (not read yet)>"
        body = " ".join(f"{k}={v:#x}" for k, v in self._values.items() if k in GDB_NAMES)
        return f"<PtRegs cpu={self.cpu} {body}>"
