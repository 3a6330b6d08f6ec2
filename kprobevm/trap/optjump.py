"""An optimized probe's ``jmp`` written over its int3, and taken out again, in an order
the guest can run through at every step with no host (the kernel's ``text_poke_bp``
order: the int3 first, then the displacement, then the opcode byte).

Before :func:`arm_jump` the site's int3 is in and its slot already copies every
instruction the jump covers (so an int3 hit goes on after all of them), and nothing can
be inside the covered bytes past the first (the optimizer waited for that). Writing the
displacement behind the int3 is then invisible: nobody runs those bytes. The opcode byte
goes last and turns the int3 into the jump. :func:`disarm_jump` undoes it the other way
round, leaving the int3. Each write is journaled first, so ``kprobevm recover`` restores
the text whatever moment a SIGKILL chose (kill points ``optimize_kprobe`` and
``unoptimize_kprobe``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kprobevm import faults
from kprobevm.errors import ProbeTextChanged
from kprobevm.x86 import asm
from kprobevm.x86.asm import INT3
from kprobevm.x86.opt import JMP32_SIZE

if TYPE_CHECKING:
    from kprobevm.kprobes.core import ProbeSite
    from kprobevm.trap.channel import ChannelContext

__all__ = ["arm_jump", "disarm_jump"]

_INT3 = bytes([INT3])


def arm_jump(ctx: ChannelContext, site: ProbeSite, target: int) -> None:
    """Turn the armed int3 at ``site`` into ``jmp target`` (VM stopped)."""
    region = site.opt
    assert region is not None and site.armed and not site.optimized
    memory, journal = ctx.memory, ctx.journal
    where = ctx.symbols.describe(site.addr)
    jump = asm.jmp_rel32(site.addr, target)
    expected = _INT3 + region.original[1:JMP32_SIZE]
    current = memory.read(site.addr, JMP32_SIZE)
    if current != expected:
        raise ProbeTextChanged(site.addr, expected, current)
    tail = journal.record("virt", site.addr + 1, expected[1:], jump[1:],
                          f"optimized jump's displacement at {where}")  # fmt: skip
    memory.write(site.addr + 1, jump[1:])
    faults.kill_point("optimize_kprobe")
    op = journal.record("virt", site.addr, _INT3, jump[:1], f"optimized jump at {where}")
    memory.write(site.addr, jump[:1])
    site.jump, site.jump_seqs, site.optimized = jump, (tail, op), True


def disarm_jump(ctx: ChannelContext, site: ProbeSite) -> None:
    """Turn the jump at ``site`` back into its int3 (VM stopped)."""
    region, seqs = site.opt, site.jump_seqs
    assert region is not None and seqs is not None and site.optimized
    memory, journal = ctx.memory, ctx.journal
    current = memory.read(site.addr, JMP32_SIZE)
    if current != site.jump:
        raise ProbeTextChanged(site.addr, site.jump, current)
    tail, op = seqs
    memory.write(site.addr, _INT3)
    journal.undone(op)
    faults.kill_point("unoptimize_kprobe")
    memory.write(site.addr + 1, region.original[1:JMP32_SIZE])
    journal.undone(tail)
    site.jump, site.jump_seqs, site.optimized = b"", None, False
