"""An int3 that is gone from memory but still runs: drop QEMU's translation of it.

The #BP stub sends a vCPU whose int3 vanished between the trap and the lookup (a probe
removed, or the guest's own ``text_poke_bp`` done) back to re-execute the address, as
the kernel's own handler does. Under TCG the re-execution runs QEMU's translation of
that address, and QEMU 7.2 was seen holding one that still had the int3 in it, after
the guest had patched the byte back (a static key's NOP in ``__schedule`` on the 6.12
PREEMPT_RT guest, under host load): the vCPU then trapped, re-executed and trapped again
for ever, with interrupts off, and every other vCPU soon waited on it. A byte written
through the gdbstub drops translations only where QEMU still counts the page as
holding code, so a stale one may survive it; a software breakpoint put in and taken out
again flushes every translation (QEMU flushes on any breakpoint change). It costs a
re-translation of the guest's hot code, tens of milliseconds, once per vanished int3.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kprobevm.gdbstub.packet import BreakpointKind

if TYPE_CHECKING:
    from kprobevm.gdbstub.transport import GdbTransport
    from kprobevm.kernel.kallsyms import KernelSymbols

__all__ = ["retranslate"]

log = logging.getLogger(__name__)


def retranslate(client: GdbTransport, addr: int, symbols: KernelSymbols) -> None:
    """Make QEMU translate ``addr`` anew from memory before a vCPU runs it (VM stopped)."""
    client.insert_breakpoint(BreakpointKind.SOFTWARE, addr, 1)
    client.remove_breakpoint(BreakpointKind.SOFTWARE, addr, 1)
    log.info("an int3 at %s went away under a vCPU: QEMU's translations flushed",
             symbols.describe(addr))  # fmt: skip
