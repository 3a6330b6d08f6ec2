"""Btf: the kernel's own type information (the vmlinux ``.BTF`` section), read on the host.

Format: Documentation/bpf/btf.rst (a header, then a type section of variable-length
``struct btf_type`` records numbered from 1, then a string section). Used for struct member
offsets (``task_struct.comm``), type sizes and per-CPU variables (``DATASEC .data..percpu``),
so that kprobevm can read the current task's name and pid with no debug info.

Records are indexed in one pass (offset of each type id); members and names are decoded
on demand.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import VmlinuxError

if TYPE_CHECKING:
    from kprobevm.kernel.kallsyms import KernelSymbols
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = [
    "BTF_MAGIC",
    "Btf",
    "BtfError",
    "BtfKind",
    "BtfMember",
    "BtfType",
    "BtfVar",
    "CurrentTaskLocation",
    "cpu_number_location",
    "current_task_location",
    "percpu_location",
    "top_of_stack_location",
]

BTF_MAGIC = 0xEB9F


class BtfError(VmlinuxError):
    """The ``.BTF`` data is malformed, or has no type/member of the asked name."""


class BtfKind(enum.IntEnum):
    """``BTF_KIND_*``: the kind of a type record (bits 24-28 of ``info``)."""

    UNKN = 0
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


# Bytes that follow the 12-byte struct btf_type, per kind: (fixed, per vlen item).
_TRAILER: dict[int, tuple[int, int]] = {
    BtfKind.INT: (4, 0),
    BtfKind.ARRAY: (12, 0),
    BtfKind.STRUCT: (0, 12),
    BtfKind.UNION: (0, 12),
    BtfKind.ENUM: (0, 8),
    BtfKind.FUNC_PROTO: (0, 8),
    BtfKind.VAR: (4, 0),
    BtfKind.DATASEC: (0, 12),
    BtfKind.DECL_TAG: (4, 0),
    BtfKind.ENUM64: (0, 12),
}
# Kinds whose third word is a type id rather than a size.
_REFERS = frozenset(
    {
        BtfKind.PTR,
        BtfKind.TYPEDEF,
        BtfKind.VOLATILE,
        BtfKind.CONST,
        BtfKind.RESTRICT,
        BtfKind.FUNC,
        BtfKind.VAR,
        BtfKind.DECL_TAG,
        BtfKind.TYPE_TAG,
        BtfKind.FUNC_PROTO,  # the return type
    }
)
_MODIFIERS = frozenset(
    {BtfKind.TYPEDEF, BtfKind.VOLATILE, BtfKind.CONST, BtfKind.RESTRICT, BtfKind.TYPE_TAG}
)
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_TRIPLE = struct.Struct("<III")


@dataclass(frozen=True)
class BtfType:
    """One type record: id, kind, name ('' when anonymous), size or referenced type, vlen."""

    id: int
    kind: BtfKind
    name: str
    size_or_type: int
    vlen: int
    kind_flag: bool


@dataclass(frozen=True)
class BtfMember:
    """A struct/union member: name ('' for an anonymous struct/union), type id, bit offset.

    ``bitfield_size`` is 0 for an ordinary member.
    """

    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int

    @property
    def offset(self) -> int:
        """Byte offset (the containing byte for a bitfield)."""
        return self.bit_offset // 8


@dataclass(frozen=True)
class BtfVar:
    """A variable in a ``DATASEC``: its section, offset in it, size and type id."""

    name: str
    type_id: int
    section: str
    offset: int
    size: int


class Btf:
    """Parsed ``.BTF``: look types up by name, resolve member offsets and sizes."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError(f".BTF is {len(data)} bytes: shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(
            data, 0
        )
        if magic != BTF_MAGIC:
            hint = " (big-endian BTF is not supported)" if magic == 0x9FEB else ""
            raise BtfError(f"bad BTF magic {magic:#06x}{hint}")
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        types_at = hdr_len + type_off
        strs_at = hdr_len + str_off
        if types_at + type_len > len(data) or strs_at + str_len > len(data):
            raise BtfError(
                f"BTF sections overrun the data: types {types_at:#x}+{type_len:#x}, "
                f"strings {strs_at:#x}+{str_len:#x}, data {len(data):#x}"
            )
        self._data = data
        self._strings = data[strs_at : strs_at + str_len]
        self._offsets = self._index_types(types_at, types_at + type_len)
        self._by_name: dict[str, list[int]] | None = None

    @classmethod
    def from_vmlinux(cls, vmlinux: Vmlinux) -> Btf:
        """The BTF of a vmlinux ELF (its ``.BTF`` section)."""
        if not vmlinux.has_section(".BTF"):
            raise BtfError(
                f"{vmlinux.path} has no .BTF section (kernel built without DEBUG_INFO_BTF)"
            )
        return cls(vmlinux.read_section(".BTF"))

    def _index_types(self, start: int, end: int) -> list[int]:
        """File offset of each type record; index 0 stands for ``void``."""
        data = self._data
        offsets = [0]
        pos = start
        unpack = _TYPE.unpack_from
        trailer = _TRAILER
        while pos < end:
            if pos + 12 > end:
                raise BtfError(f"truncated type record at {pos:#x}")
            _name, info, _size = unpack(data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind > BtfKind.ENUM64:
                raise BtfError(f"unknown BTF kind {kind} in type {len(offsets)} at {pos:#x}")
            offsets.append(pos)
            fixed, per = trailer.get(kind, (0, 0))
            pos += 12 + fixed + per * vlen
        if pos != end:
            raise BtfError(f"last type record overruns the type section ({pos:#x} > {end:#x})")
        return offsets

    # -- records -----------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of type ids, ``void`` (0) included."""
        return len(self._offsets)

    def _string(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        if end < 0:
            raise BtfError(f"string at {off:#x} is not terminated")
        return self._strings[off:end].decode()

    def type(self, type_id: int) -> BtfType:
        """The record of ``type_id`` (0 is ``void``: kind UNKN, size 0)."""
        if type_id == 0:
            return BtfType(0, BtfKind.UNKN, "void", 0, 0, False)
        if not 0 < type_id < len(self._offsets):
            raise BtfError(f"no BTF type id {type_id} (there are {len(self._offsets) - 1})")
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, self._offsets[type_id])
        return BtfType(
            id=type_id,
            kind=BtfKind((info >> 24) & 0x1F),
            name=self._string(name_off),
            size_or_type=size_or_type,
            vlen=info & 0xFFFF,
            kind_flag=bool(info >> 31),
        )

    def _names(self) -> dict[str, list[int]]:
        if self._by_name is None:
            by_name: dict[str, list[int]] = {}
            strings = self._strings
            for tid in range(1, len(self._offsets)):
                name_off = _TYPE.unpack_from(self._data, self._offsets[tid])[0]
                if name_off:
                    end = strings.find(b"\0", name_off)
                    by_name.setdefault(strings[name_off:end].decode(), []).append(tid)
            self._by_name = by_name
        return self._by_name

    def enumerator(self, name: str) -> int:
        """The value of the enum constant ``name`` (say ``TRACE_EVENT_FL_TRACEPOINT``)."""
        data, strings = self._data, self._strings
        want = name.encode() + b"\0"
        for tid in range(1, len(self._offsets)):
            pos = self._offsets[tid]
            _name, info, _size = _TYPE.unpack_from(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if kind not in (BtfKind.ENUM, BtfKind.ENUM64):
                continue
            step = 8 if kind == BtfKind.ENUM else 12
            for k in range(vlen):
                at = pos + 12 + step * k
                name_off = int.from_bytes(data[at : at + 4], "little")
                if strings[name_off : name_off + len(want)] == want:
                    if kind == BtfKind.ENUM:
                        signed = bool(info >> 31)
                        return int.from_bytes(data[at + 4 : at + 8], "little", signed=signed)
                    return int.from_bytes(data[at + 4 : at + 12], "little")
        raise BtfError(f"no BTF enum constant {name!r}")

    def find(self, name: str, kind: BtfKind | None = None) -> BtfType:
        """The type called ``name`` (of ``kind`` when given); a complete one before a FWD."""
        ids = self._names().get(name, [])
        found = [t for t in (self.type(i) for i in ids) if kind is None or t.kind == kind]
        if not found:
            what = f"{kind.name} " if kind is not None else ""
            raise BtfError(f"no BTF type {what}{name!r}")
        complete = [t for t in found if t.kind != BtfKind.FWD]
        return (complete or found)[0]

    def find_struct(self, name: str) -> BtfType:
        """``struct name`` (or ``union name``)."""
        try:
            return self.find(name, BtfKind.STRUCT)
        except BtfError:
            return self.find(name, BtfKind.UNION)

    def members(self, type_id: int) -> list[BtfMember]:
        """Members of a struct or union, in declaration order."""
        t = self.type(type_id)
        if t.kind not in (BtfKind.STRUCT, BtfKind.UNION):
            raise BtfError(f"type {t.id} ({t.kind.name} {t.name!r}) has no members")
        base = self._offsets[type_id] + 12
        out = []
        for i in range(t.vlen):
            name_off, mtype, offset = _TRIPLE.unpack_from(self._data, base + 12 * i)
            if t.kind_flag:
                # kind_flag set: the offset word is (bitfield_size << 24) | bit_offset.
                bits, bit_offset = offset >> 24, offset & 0xFFFFFF
            else:
                bits, bit_offset = 0, offset
            out.append(BtfMember(self._string(name_off), mtype, bit_offset, bits))
        return out

    def resolve(self, type_id: int) -> BtfType:
        """Follow typedefs and qualifiers (const, volatile, restrict, type tags)."""
        t = self.type(type_id)
        for _ in range(64):
            if t.kind not in _MODIFIERS:
                return t
            t = self.type(t.size_or_type)
        raise BtfError(f"type {type_id}: modifier chain longer than 64 (a loop?)")

    def type_size(self, type_or_name: int | str) -> int:
        """Size in bytes of a type id or a struct/union/typedef name."""
        t = self.resolve(
            type_or_name if isinstance(type_or_name, int) else self._named(type_or_name).id
        )
        if t.kind in (
            BtfKind.INT,
            BtfKind.STRUCT,
            BtfKind.UNION,
            BtfKind.ENUM,
            BtfKind.ENUM64,
            BtfKind.FLOAT,
            BtfKind.DATASEC,
        ):
            return t.size_or_type
        if t.kind == BtfKind.PTR:
            return 8
        if t.kind == BtfKind.ARRAY:
            elem, _index, nelems = _TRIPLE.unpack_from(self._data, self._offsets[t.id] + 12)
            return int(nelems) * self.type_size(int(elem))
        raise BtfError(f"type {t.id} ({t.kind.name} {t.name!r}) has no size")

    def _named(self, name: str) -> BtfType:
        for kind in (
            BtfKind.STRUCT,
            BtfKind.UNION,
            BtfKind.TYPEDEF,
            BtfKind.INT,
            BtfKind.ENUM,
            BtfKind.ENUM64,
            BtfKind.FLOAT,
        ):
            try:
                return self.find(name, kind)
            except BtfError:
                continue
        raise BtfError(f"no BTF type named {name!r}")

    def array_info(self, type_id: int) -> tuple[int, int]:
        """``(element type id, number of elements)`` of an array type."""
        t = self.resolve(type_id)
        if t.kind != BtfKind.ARRAY:
            raise BtfError(f"type {t.id} ({t.kind.name}) is not an array")
        elem, _index, nelems = _TRIPLE.unpack_from(self._data, self._offsets[t.id] + 12)
        return elem, nelems

    # -- members by path ---------------------------------------------------------------

    def member(self, struct_name: str, path: str) -> BtfMember:
        """Member ``path`` (``a.b.c``) of ``struct struct_name``, offset from the struct start.

        Members of anonymous structs and unions are found as if they were direct members (C's
        rule), so ``task_struct.pid`` works wherever the kernel nests it.
        """
        tid = self.find_struct(struct_name).id
        total = 0
        member: BtfMember | None = None
        for part in path.split("."):
            found = self._find_member(tid, part)
            if found is None:
                t = self.resolve(tid)
                raise BtfError(
                    f"{t.kind.name.lower()} {t.name or '(anonymous)'} has no member {part!r}"
                )
            member = BtfMember(
                found.name, found.type_id, total + found.bit_offset, found.bitfield_size
            )
            total = member.bit_offset
            tid = found.type_id
        assert member is not None
        return member

    def _find_member(self, type_id: int, name: str) -> BtfMember | None:
        t = self.resolve(type_id)
        if t.kind not in (BtfKind.STRUCT, BtfKind.UNION):
            return None
        for m in self.members(t.id):
            if m.name == name:
                return m
            if not m.name:
                inner = self._find_member(m.type_id, name)
                if inner is not None:
                    return BtfMember(
                        inner.name,
                        inner.type_id,
                        m.bit_offset + inner.bit_offset,
                        inner.bitfield_size,
                    )
        return None

    def enum_value(self, enum_name: str, member: str) -> int:
        """The value of ``member`` in ``enum enum_name`` (``pageflags``, ``PG_reserved``)."""
        t = self.find(enum_name, BtfKind.ENUM)
        at = self._offsets[t.id] + 12
        for i in range(t.vlen):
            name_off, value = struct.unpack_from("<Ii", self._data, at + 8 * i)
            if self._string(name_off) == member:
                return int(value)
        raise BtfError(f"enum {enum_name} has no {member}")

    def struct_member_offset(self, struct_name: str, path: str) -> int:
        """Byte offset of ``struct_name.path`` (``task_struct``, ``comm``) -> e.g. 3008."""
        m = self.member(struct_name, path)
        if m.bitfield_size:
            raise BtfError(
                f"{struct_name}.{path} is a {m.bitfield_size}-bit bitfield: no byte offset"
            )
        if m.bit_offset % 8:
            raise BtfError(f"{struct_name}.{path} is at bit {m.bit_offset}, not on a byte")
        return m.bit_offset // 8

    def member_type(self, struct_name: str, path: str) -> BtfType:
        """The (unresolved) type of ``struct_name.path``."""
        return self.type(self.member(struct_name, path).type_id)

    def type_name(self, type_id: int) -> str:
        """A C-like spelling of a type (``struct task_struct *``, ``char[16]``)."""
        t = self.type(type_id)
        if t.kind == BtfKind.PTR:
            return self.type_name(t.size_or_type) + " *"
        if t.kind == BtfKind.ARRAY:
            elem, n = self.array_info(type_id)
            return f"{self.type_name(elem)}[{n}]"
        if t.kind in (BtfKind.CONST, BtfKind.VOLATILE, BtfKind.RESTRICT):
            return f"{t.kind.name.lower()} {self.type_name(t.size_or_type)}"
        if t.kind == BtfKind.TYPE_TAG:
            return self.type_name(t.size_or_type)
        prefix = {
            BtfKind.STRUCT: "struct ",
            BtfKind.UNION: "union ",
            BtfKind.ENUM: "enum ",
            BtfKind.ENUM64: "enum ",
            BtfKind.FWD: "struct ",
        }.get(t.kind, "")
        if t.kind == BtfKind.FUNC_PROTO:
            return "function"
        return prefix + (t.name or "(anonymous)")

    def int_encoding(self, type_id: int) -> tuple[bool, int]:
        """(signed, bits) of an INT type: what ``BTF_INT_ENCODING`` and ``BTF_INT_BITS`` say."""
        t = self.type(type_id)
        if t.kind != BtfKind.INT:
            raise BtfError(f"type {t.id} ({t.kind.name} {t.name!r}) is not an integer")
        (word,) = struct.unpack_from("<I", self._data, self._offsets[type_id] + 12)
        return bool((word >> 24) & 1), word & 0xFF

    def func_proto(self, name: str) -> tuple[int, list[tuple[str, int]]] | None:
        """The prototype of function ``name`` (the first FUNC of that name): its return
        type id (0 for ``void``) and each parameter's (name, type id); None when BTF has
        no such function."""
        ids = [i for i in self._names().get(name, []) if self.type(i).kind == BtfKind.FUNC]
        if not ids:
            return None
        proto = self.type(self.type(ids[0]).size_or_type)
        if proto.kind != BtfKind.FUNC_PROTO:
            return None
        base = self._offsets[proto.id] + 12
        params = []
        for i in range(proto.vlen):
            name_off, ptype = struct.unpack_from("<II", self._data, base + 8 * i)
            params.append((self._string(name_off), ptype))
        return proto.size_or_type, params

    # -- variables ---------------------------------------------------------------------

    def find_var(self, name: str) -> BtfVar:
        """A variable that BTF records (vmlinux BTF holds the per-CPU ones), with its section."""
        ids = [i for i in self._names().get(name, []) if self.type(i).kind == BtfKind.VAR]
        if not ids:
            raise BtfError(f"no BTF variable {name!r}")
        var_id = ids[0]
        for sec in self.datasecs():
            base = self._offsets[sec.id] + 12
            for i in range(sec.vlen):
                vtype, offset, size = _TRIPLE.unpack_from(self._data, base + 12 * i)
                if vtype == var_id:
                    return BtfVar(name, self.type(var_id).size_or_type, sec.name, offset, size)
        raise BtfError(f"BTF variable {name!r} (id {var_id}) is in no DATASEC")

    def datasecs(self) -> list[BtfType]:
        """The DATASEC records (``.data..percpu`` on vmlinux)."""
        return [
            t
            for t in (self.type(i) for i in range(1, len(self._offsets)))
            if t.kind == BtfKind.DATASEC
        ]


@dataclass(frozen=True)
class CurrentTaskLocation:
    """Where a vCPU's current ``task_struct *`` lives, from the per-CPU base (GS base).

    Read it as ``read_u64(gs_base + percpu_offset + member_offset)`` with the vCPU in kernel
    mode (``gs_base`` from the ``g`` packet; in user mode the kernel's value is in
    ``k_gs_base`` after ``swapgs``). ``variable`` names what was found: ``pcpu_hot`` (6.2+,
    and backports) or ``current_task`` (older kernels).
    """

    variable: str
    percpu_offset: int
    member_offset: int

    @property
    def offset(self) -> int:
        """Offset from the per-CPU base to the ``task_struct *``."""
        return self.percpu_offset + self.member_offset


def current_task_location(syms: KernelSymbols | None, btf: Btf) -> CurrentTaskLocation:
    """Find the per-CPU slot holding ``current`` (``pcpu_hot.current_task`` or ``current_task``).

    The per-CPU offset comes from kallsyms when given (x86-64 links ``.data..percpu`` at 0, so
    the symbol's 'address' is the offset), else from BTF's ``.data..percpu`` DATASEC; both
    agree on a stock kernel.
    """
    return percpu_location(syms, btf, (("pcpu_hot", "current_task"), ("current_task", None)))


def cpu_number_location(syms: KernelSymbols | None, btf: Btf) -> CurrentTaskLocation:
    """The per-CPU slot holding this CPU's number: ``pcpu_hot.cpu_number`` (6.2 moved it
    there, as 6.12 has it) or the ``cpu_number`` variable (6.1)."""
    return percpu_location(syms, btf, (("pcpu_hot", "cpu_number"), ("cpu_number", None)))


def top_of_stack_location(syms: KernelSymbols | None, btf: Btf) -> CurrentTaskLocation:
    """The per-CPU slot holding the end of ``current``'s entry ``pt_regs`` (its stack top
    less the kernel's padding): ``pcpu_hot.top_of_stack`` (6.2+) or the
    ``cpu_current_top_of_stack`` variable (6.1)."""
    return percpu_location(
        syms, btf, (("pcpu_hot", "top_of_stack"), ("cpu_current_top_of_stack", None))
    )


def percpu_location(
    syms: KernelSymbols | None, btf: Btf, candidates: tuple[tuple[str, str | None], ...]
) -> CurrentTaskLocation:
    """The first of ``candidates`` (a per-CPU variable, and a member of it or None) this
    kernel has, as an offset from the per-CPU base."""
    for var, member in candidates:
        offset: int | None = None
        if syms is not None and var in syms:
            offset = syms[var]
        else:
            try:
                offset = btf.find_var(var).offset
            except BtfError:
                offset = None
        if offset is None:
            continue
        if offset >= 1 << 32:
            raise BtfError(
                f"per-CPU variable {var} is at {offset:#x}: not an offset from 0 (a kernel that "
                "does not link .data..percpu at 0 is not supported)"
            )
        try:
            member_offset = 0 if member is None else btf.struct_member_offset(var, member)
        except BtfError:
            continue  # a struct of that name without the member: try the next
        return CurrentTaskLocation(var, offset, member_offset)
    names = " or ".join(f"{v}.{m}" if m else v for v, m in candidates)
    raise BtfError(f"neither {names} is a per-CPU variable of this kernel")
