"""Loaded modules as the host reads them: a ``struct module``'s name, from the kernel's BTF."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.kernel.btf import Btf

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.vmlinux import Vmlinux

__all__ = ["ModuleLayout"]


@dataclass(frozen=True)
class ModuleLayout:
    """Where ``struct module`` keeps the module's name."""

    name: int
    """Offset of ``name`` (``char[MODULE_NAME_LEN]``)."""
    name_len: int

    @classmethod
    def build(cls, vmlinux: Vmlinux) -> ModuleLayout:
        """From the kernel's own BTF (the ``.BTF`` section of vmlinux)."""
        return cls.from_btf(Btf.from_vmlinux(vmlinux))

    @classmethod
    def from_btf(cls, btf: Btf) -> ModuleLayout:
        """From the kernel's BTF however it was had (the vmlinux, or guest memory)."""
        member = btf.member("module", "name")
        return cls(name=member.offset, name_len=btf.type_size(member.type_id))

    def name_of(self, memory: GuestMemory, module: int) -> str:
        """The name of the module whose ``struct module`` is at ``module``."""
        raw = memory.read(module + self.name, self.name_len)
        return raw.split(b"\0", 1)[0].decode(errors="replace")
