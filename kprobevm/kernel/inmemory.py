"""What the host learns of the guest kernel from its memory alone: no vmlinux, no SSH.

The image's read-only tables are read once (core kallsyms and ``.BTF``, between
``__start_BTF`` and ``__stop_BTF``); what changes while the guest runs (the module list)
is read again on each refresh, with the guest stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kprobevm.errors import SymbolError
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
    def decode(cls, image: KernelImage, data: bytes, base: int | None = None) -> KernelInMemory:
        """From ``data``: the image's memory from virtual ``base`` (``_text`` when None),
        which must hold the kallsyms tables and ``.BTF``."""
        base = image.text if base is None else base
        core, tables = kallsyms_from_image(data, image.text, base)
        btf = None
        start, stop = core.get("__start_BTF"), core.get("__stop_BTF")
        if start is not None and stop is not None and stop > start:
            if not base <= start < stop <= base + len(data):
                raise SymbolError(
                    f".BTF {start:#x}..{stop:#x} is not in the {len(data):#x} bytes read"
                    f" at {base:#x}"
                )
            btf = Btf(data[start - base : stop - base])
        return cls(image=image, tables=tables, core=core, btf=btf)

    def symbols(self, read: ReadFn) -> KernelSymbols:
        """Core and module symbols, the modules read now through ``read`` (guest virtual
        memory, the guest stopped); the core's alone when the kernel has no module list
        or no BTF to read it by (:attr:`modules_missing` says why)."""
        modules = self.core.get("modules")
        if modules is None or self.btf is None:
            return self.core
        layout = ModuleKallsymsLayout.from_btf(self.btf)
        found = module_kallsyms(read, modules, layout)
        if not found:
            return self.core
        # the core's columns in kallsyms order, then each module's as the file lists them
        addrs, types, names, mods = self.core.columns()
        return KernelSymbols.from_columns(
            addrs + [a for a, _, _, _ in found], types + [t for _, t, _, _ in found],
            names + [n for _, _, n, _ in found], mods + [m for _, _, _, m in found],
        )  # fmt: skip

    @property
    def modules_missing(self) -> str | None:
        """Why module symbols cannot be read from memory (None: they can)."""
        if self.btf is None and "modules" in self.core:
            return "the kernel has no BTF to read struct module by"
        return None
