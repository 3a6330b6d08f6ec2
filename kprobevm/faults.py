"""Kill points: this process SIGKILLs itself at a named moment of its work on a guest.

For the kill matrix (:mod:`kprobevm.bench.killmatrix`): a host killed at any of these
moments must leave a guest that runs on, and a journal that ``kprobevm recover`` undoes.
``KPROBEVM_KILL_POINT=NAME`` kills at the first time NAME is reached, ``NAME:N`` at the
N-th (so a test can pick the moment at random). The variable is read once, at import;
unset, a kill point is one comparison with a module constant.

The points, each at the most dangerous moment of its step:

``journal_write``
    A journal record is on disk, the guest write it announces is not done
    (:meth:`kprobevm.kprobes.journal.Journal.record`; reached by every write).
``journal_torn``
    Half of a journal record's line is on disk (the same place, before the line ends).
``idt_gate``
    The IDT vector 3 gate is journaled, not written: the stub, the trampoline and the
    mailbox watchpoints are in (:meth:`kprobevm.trap.watchpoint.WatchpointChannel.install`).
``pmd_populate``
    The slot area's page table is zeroed and the PMD entry journaled, not written
    (:meth:`kprobevm.x86.slotmap.SlotArea.setup`).
``set_pte``
    A slot page is zeroed, its PTE not written (:meth:`kprobevm.x86.slotmap.SlotArea.map_page`;
    reached by every page the channel maps).
``arm_kprobe``
    A new site's slot code and stub table entry are in, its int3 not written
    (:meth:`kprobevm.kprobes.core.KprobeManager._place_site`; once per new site).
``disarm_kprobe``
    A site's original byte is back, the journal does not say so yet
    (:meth:`kprobevm.trap.channel.TrapChannel.disarm`).
``optimize_kprobe``
    An optimized probe's jump displacement is written behind its int3, the jump's
    opcode byte not yet (:func:`kprobevm.trap.optjump.arm_jump`).
``unoptimize_kprobe``
    The jump's opcode byte is an int3 again, its displacement not yet restored
    (:func:`kprobevm.trap.optjump.disarm_jump`).
``promote_site``
    A hot site's own mailbox byte is watched, the site not yet moved to a slot that
    stores to it (:meth:`kprobevm.trap.watchpoint.WatchpointChannel._promote`).
``recover_restore``
    ``kprobevm recover`` holds the VM stopped and is about to restore a journaled byte
    (:mod:`kprobevm.kprobes.recover`; reached once per entry it restores).
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "POINTS", "due", "kill", "kill_point", "parse_kill_point"]

ENV = "KPROBEVM_KILL_POINT"
POINTS = (
    "journal_write",
    "journal_torn",
    "idt_gate",
    "pmd_populate",
    "set_pte",
    "arm_kprobe",
    "disarm_kprobe",
    "optimize_kprobe",
    "unoptimize_kprobe",
    "promote_site",
    "recover_restore",
)


def parse_kill_point(value: str) -> tuple[str, int]:
    """``NAME`` or ``NAME:N`` as (name, N); ``ValueError`` for an unknown name or N < 1."""
    name, _, count = value.partition(":")
    if name not in POINTS:
        raise ValueError(f"unknown kill point {name!r} (known: {', '.join(POINTS)})")
    nth = int(count) if count else 1
    if nth < 1:
        raise ValueError(f"kill point {value!r}: N counts from 1")
    return name, nth


_SPEC = os.environ.get(ENV) or None
_NAME, _NTH = parse_kill_point(_SPEC) if _SPEC is not None else (None, 0)
_reached = 0


def due(name: str) -> bool:
    """Whether this arrival at ``name`` is the one to die at (counts the arrival); for a
    point that must leave something half done first, as ``journal_torn`` does."""
    global _reached
    if name != _NAME:
        return False
    _reached += 1
    return _reached == _NTH


def kill() -> None:
    """SIGKILL this process now: no handler, no atexit, no flush."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_point(name: str) -> None:
    """Die here if ``KPROBEVM_KILL_POINT`` names this arrival at ``name``."""
    if _NAME is not None and due(name):
        kill()
