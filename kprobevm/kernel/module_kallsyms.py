"""Loaded modules' symbols read from guest memory, as ``/proc/kallsyms`` lists them.

The kernel's ``module_get_kallsym()`` walks the ``modules`` list (``struct module``'s
``list``), skips a module still ``MODULE_STATE_UNFORMED``, and gives each entry of the
module's ``kallsyms`` (``struct mod_kallsyms``: ``symtab``, an ``Elf64_Sym`` array of
``num_symtab``, with names in ``strtab`` and type letters in ``typetab``); the file leaves
out entries with an empty name. Every offset comes from the kernel's own BTF.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from kprobevm.errors import GuestMemoryError, SymbolError
from kprobevm.kernel.btf import Btf
from kprobevm.x86.constants import PAGE_SIZE

__all__ = ["MODULE_STATE_UNFORMED", "ModuleKallsymsLayout", "list_for_each", "module_kallsyms"]

ReadFn = Callable[[int, int], bytes]
"""``read(address, length)`` of guest virtual memory."""

MODULE_STATE_UNFORMED = 3
"""``enum module_state``: LIVE, COMING, GOING, UNFORMED (a module still being set up)."""
_ELF64_SYM = struct.Struct("<IBBHQQ")
"""``Elf64_Sym``: st_name, st_info, st_other, st_shndx, st_value, st_size."""
_MAX_LIST = 1 << 16
_KSYM_NAME_LEN = 512

ModuleSymbol = tuple[int, str, str, str]
"""``(address, type, name, module)`` as a kallsyms line has them."""


@dataclass(frozen=True)
class ModuleKallsymsLayout:
    """Offsets of what the walk reads in ``struct module`` and ``struct mod_kallsyms``."""

    list: int
    state: int
    name: int
    name_len: int
    kallsyms: int
    symtab: int
    num_symtab: int
    strtab: int
    typetab: int

    @classmethod
    def from_btf(cls, btf: Btf) -> ModuleKallsymsLayout:
        """From the kernel's BTF; raises :class:`BtfError` when a member is missing."""
        name = btf.member("module", "name")

        def off(struct_name: str, member: str) -> int:
            return btf.struct_member_offset(struct_name, member)

        return cls(
            list=off("module", "list"), state=off("module", "state"), name=name.offset,
            name_len=btf.type_size(name.type_id), kallsyms=off("module", "kallsyms"),
            symtab=off("mod_kallsyms", "symtab"), num_symtab=off("mod_kallsyms", "num_symtab"),
            strtab=off("mod_kallsyms", "strtab"), typetab=off("mod_kallsyms", "typetab"),
        )  # fmt: skip


def _u64(read: ReadFn, addr: int) -> int:
    return int.from_bytes(read(addr, 8), "little")


def list_for_each(read: ReadFn, head: int, what: str) -> Iterator[int]:
    """The nodes of the kernel list at ``head`` (``struct list_head *``), in list order.
    Raises :class:`SymbolError` when the list does not come back to its head."""
    node = _u64(read, head)
    for _ in range(_MAX_LIST):
        if node == head:
            return
        yield node
        node = _u64(read, node)
    raise SymbolError(f"the {what} list at {head:#x} runs past {_MAX_LIST} entries")


def module_kallsyms(read: ReadFn, modules: int, layout: ModuleKallsymsLayout) -> list[ModuleSymbol]:
    """Every loaded module's symbols, in ``/proc/kallsyms`` order; ``modules`` is the
    address of the kernel's ``modules`` list head."""
    out: list[ModuleSymbol] = []
    for node in list_for_each(read, modules, "modules"):
        mod = node - layout.list
        if int.from_bytes(read(mod + layout.state, 4), "little") == MODULE_STATE_UNFORMED:
            continue
        raw_name = read(mod + layout.name, layout.name_len)
        name = raw_name.split(b"\0", 1)[0].decode(errors="replace")
        kallsyms = _u64(read, mod + layout.kallsyms)
        if not kallsyms:
            continue
        symtab = _u64(read, kallsyms + layout.symtab)
        count = int.from_bytes(read(kallsyms + layout.num_symtab, 4), "little")
        strtab = _u64(read, kallsyms + layout.strtab)
        typetab = _u64(read, kallsyms + layout.typetab)
        if not count:
            continue
        syms = list(_ELF64_SYM.iter_unpack(read(symtab, count * _ELF64_SYM.size)))
        types = read(typetab, count).decode("latin-1")
        strings = _strtab(read, strtab, max(s[0] for s in syms))
        for (st_name, _info, _other, _shndx, value, _size), typ in zip(syms, types, strict=True):
            sym_name = strings[st_name : strings.find(b"\0", st_name)].decode(errors="replace")
            if sym_name:
                out.append((value, typ, sym_name, name))
    return out


def _strtab(read: ReadFn, strtab: int, last: int) -> bytes:
    """The string table up to its last name: read at once, or name by name where the
    table ends closer than a full name length after that name's start."""
    try:
        return read(strtab, last + _KSYM_NAME_LEN)
    except GuestMemoryError:
        head = read(strtab, last)
        tail = b""
        while b"\0" not in tail and len(tail) < _KSYM_NAME_LEN:
            at = strtab + last + len(tail)
            tail += read(at, PAGE_SIZE - at % PAGE_SIZE)  # never past the page
        return head + tail
