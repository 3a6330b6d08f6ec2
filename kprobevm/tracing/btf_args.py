"""What a kernel with BTF arguments (the btf_args rule) knows of a probed function.

Such a kernel looks the probed function's prototype up in its BTF: an argument named
after a parameter (``count``) fetches that parameter, a bare ``$argN`` becomes the Nth
parameter's name, and an argument given without a type (``$retval`` included) takes the
type the BTF gives it. :func:`function_prototype` reads that from the guest's BTF into
plain values the parser uses (:class:`FunctionPrototype`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kprobevm.kernel.btf import Btf, BtfError, BtfKind

__all__ = ["BtfValue", "FunctionPrototype", "btf_value", "function_prototype"]


@dataclass(frozen=True)
class BtfValue:
    """How the kernel treats a value of one BTF type in a fetch argument."""

    fetch_type: str | None
    """The type an untyped argument takes (None: the default, x64)."""
    char_pointer: bool = False
    """A ``:string``/``:ustring`` fetch of it reads through it first (the kernel's
    char-pointer test passes)."""
    char_array: bool = False
    """A ``:string`` fetch reads it in place."""


@dataclass(frozen=True)
class FunctionPrototype:
    """A function's return value (None: ``void``) and its parameters, by name."""

    returns: BtfValue | None
    params: tuple[tuple[str, BtfValue], ...]

    def param(self, name: str) -> tuple[int, BtfValue] | None:
        """The 0-based index and value of parameter ``name`` (None: no such parameter)."""
        for i, (pname, value) in enumerate(self.params):
            if pname == name:
                return i, value
        return None


def _unsigned_byte(btf: Btf, type_id: int) -> bool:
    """Whether ``type_id`` (past typedefs and qualifiers) is an unsigned 8-bit integer."""
    try:
        t = btf.resolve(type_id)
        if t.kind != BtfKind.INT:
            return False
        signed, bits = btf.int_encoding(t.id)
    except BtfError:
        return False
    return not signed and bits == 8


def _fetch_type(btf: Btf, type_id: int) -> str | None:
    """The fetch type the kernel picks for a value of ``type_id`` (already resolved)."""
    t = btf.type(type_id)
    if t.kind == BtfKind.ENUM:
        return "s32"
    if t.kind == BtfKind.ENUM64:
        return "s64"
    if t.kind == BtfKind.PTR:
        return "x64"
    if t.kind == BtfKind.INT:
        signed, bits = btf.int_encoding(t.id)
        if bits in (8, 16, 32, 64):
            return f"{'s' if signed else 'u'}{bits}"
        # a signed integer of another width has no type of its own; an unsigned one is
        # read as a u64 (the kernel then masks it as a bitfield, which we do not)
        return None if signed else "u64"
    return None


def btf_value(btf: Btf, type_id: int) -> BtfValue:
    """How the kernel treats a value of BTF type ``type_id``."""
    t = btf.resolve(type_id)
    # The kernel's char-pointer test follows the type's third word whatever its kind (for
    # an integer that word is its size): copied as it behaves, so that a `:string` of a
    # value whose size names an unsigned byte type is read through as the kernel does.
    pointer = t.id != 0 and _unsigned_byte(btf, t.size_or_type)
    array = t.kind == BtfKind.ARRAY and _unsigned_byte(btf, btf.array_info(t.id)[0])
    return BtfValue(_fetch_type(btf, t.id), char_pointer=pointer, char_array=array)


def function_prototype(btf: Btf, name: str) -> FunctionPrototype | None:
    """The prototype of function ``name`` as the kernel's BTF arguments see it (None:
    not in BTF)."""
    proto = btf.func_proto(name)
    if proto is None:
        return None
    returns, params = proto
    return FunctionPrototype(
        returns=btf_value(btf, returns) if returns else None,
        params=tuple((pname, btf_value(btf, ptype)) for pname, ptype in params),
    )
