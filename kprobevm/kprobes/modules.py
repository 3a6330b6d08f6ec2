"""Probes in modules, and their end when the module goes (the kernel's
``kprobes_module_callback``).

The kernel removes a module's probes from a module notifier, before the module's memory
is freed. The host gets no notifier, so it keeps a probe of its own on the guest's
``free_module`` while any probe sits in a module: at that hit (VM stopped) the module's
text is still mapped, so each of its probes gets its original byte back and its slot
freed, and is marked gone; it stays registered, as in the kernel, until unregistered.
The module's symbols leave the symbol table with it, so that nothing is placed in freed
memory by a stale name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from kprobevm.errors import ProbeRefused

if TYPE_CHECKING:
    from kprobevm.gdbstub.memory import GuestMemory
    from kprobevm.kernel.modules import ModuleLayout
    from kprobevm.kprobes.core import Kprobe
    from kprobevm.x86.ptregs import PtRegs

__all__ = ["WATCHED_FUNCTION", "ModuleWatch"]

WATCHED_FUNCTION = "free_module"
"""Called on every unload after the module's exit and its GOING notifiers, with the
``struct module *`` as its first argument, before its memory is freed."""


class ModuleWatch:
    """The internal probe on ``free_module`` and what it needs to name the module."""

    def __init__(
        self,
        memory: GuestMemory,
        layout: Callable[[], ModuleLayout | None],
        on_going: Callable[[str], None],
    ) -> None:
        """``layout`` gives ``struct module``'s name offset (None without the kernel's
        BTF); ``on_going(name)`` runs at the hit, on the trap thread, VM stopped."""
        self.memory = memory
        self._layout = layout
        self._on_going = on_going
        self.probe: Kprobe | None = None
        """The internal probe while it is registered."""
        self.unloads = 0

    def handler(self, module: str, where: str) -> Callable[[Kprobe, PtRegs], None]:
        """The pre_handler of the probe on :data:`WATCHED_FUNCTION`, placed before the first
        probe in ``module`` (at ``where``)."""
        layout = self._layout()
        if layout is None:
            raise ProbeRefused(
                "EOPNOTSUPP",
                f"{where} is in module {module}: removing its probes when the module is"
                " unloaded needs the kernel's BTF (boot with the image's vmlinux, or"
                " attach with vmlinux=)",
                symbol=where,
            )

        def going(kp: Kprobe, regs: PtRegs) -> None:
            self.unloads += 1
            self._on_going(layout.name_of(self.memory, regs.di))

        return going
