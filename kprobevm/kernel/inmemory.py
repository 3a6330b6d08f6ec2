"""What the host learns of the guest kernel from its memory alone: no vmlinux, no SSH.

The image's read-only tables are read once (core kallsyms and ``.BTF``, between
``__start_BTF`` and ``__stop_BTF``); what changes while the guest runs (the module list)
is read again on each refresh, with the guest stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kprobevm.kernel.btf import Btf
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kernel.kallsyms_tables import KallsymsTables, KernelImage, kallsyms_from_image
from kprobevm.kernel.module_kallsyms import ModuleKallsymsLayout, module_kallsyms

__all__ = ["KernelInMemory"]

ReadFn = Callable[[int, int], bytes]


@dataclass(frozen=True)
class KernelInMemory:
    """The core kernel's kallsyms and BTF as decoded from its image in guest memory."""

    image: KernelImage
    tables: KallsymsTables
    core: KernelSymbols
    """The core kernel's symbols (``/proc/kallsyms`` without module lines)."""
    btf: Btf | None
    """None when the kernel has no ``.BTF`` (built without ``DEBUG_INFO_BTF``)."""

    @classmethod
    def decode(cls, image: KernelImage, data: bytes) -> KernelInMemory:
        """From ``data``, the whole image read from ``_text``."""
        core, tables = kallsyms_from_image(data, image.text)
        btf = None
        start, stop = core.get("__start_BTF"), core.get("__stop_BTF")
        if start is not None and stop is not None and image.contains(start) and stop > start:
            btf = Btf(data[start - image.text : stop - image.text])
        return cls(image=image, tables=tables, core=core, btf=btf)

    def symbols(self, read: ReadFn) -> KernelSymbols:
        """Core and module symbols, the modules read now through ``read`` (guest virtual
        memory, the guest stopped); the core's alone when the kernel has no module list
        or no BTF to read it by (:attr:`modules_missing` says why)."""
        entries: list[tuple[int, str, str, str | None]] = [
            (s.address, s.type, s.name, None) for s in self.core
        ]
        modules = self.core.get("modules")
        if modules is not None and self.btf is not None:
            layout = ModuleKallsymsLayout.from_btf(self.btf)
            entries += [(a, t, n, m) for a, t, n, m in module_kallsyms(read, modules, layout)]
        return KernelSymbols(entries)

    @property
    def modules_missing(self) -> str | None:
        """Why module symbols cannot be read from memory (None: they can)."""
        if self.btf is None and "modules" in self.core:
            return "the kernel has no BTF to read struct module by"
        return None
