"""``count --by stack`` on the shared guest against the guest kernel's own stack counts:
a tracefs kprobe on the same function with a ``hist`` trigger keyed by its stack, both in
place over the same workload (``dd bs=1`` for vfs_read, a shell's open loop for
do_sys_openat2, a second of timer interrupts for hrtimer_interrupt). Stack by stack the
callers must be the same frames, the counts the same but for the few reads the guest's
SSH server makes at the edges of the window."""

from __future__ import annotations

import pytest

from kprobevm.guest.vm import VM
from kprobevm.kprobes.aggregations import AggregateProbe, StackKey
from kprobevm.pytest_plugin import ProbeSession
from kprobevm.tracing.kernel_rules import kernel_rules
from kprobevm.x86.orc_walk import CUT_DEPTH, CUT_NO_ORC, CUT_OUTSIDE
from tests._stack_hist import HIST_DEPTH, GuestHist, counts_between, our_callers

pytestmark = pytest.mark.vm

EDGE = 24
"""Hits a side may count that the other did not, per stack: the SSH server's reads or
opens while one side's window is open and the other's is not (the guest's is opened and
closed by commands of their own; a command's SSH traffic is some 10-20 reads)."""

DD = "dd if=/dev/zero of=/dev/null bs=1 count=2000 2>/dev/null"


COMPARED = HIST_DEPTH - 4
"""Callers compared at most: the kernel's key holds 16 frames, of which the kprobe's own
and the probed function's take 3 (and a 4th on the int3 path); a longer stack is
compared on its innermost callers."""


def _compared(callers: tuple[str, ...]) -> tuple[str, ...]:
    """The callers both sides can show: to the first module frame (``func+0x../0x..
    [mod]``: the guest's walk stops there, keeping it) and at most :data:`COMPARED`."""
    module = next((i for i, f in enumerate(callers) if f.endswith("]")), None)
    if module is not None:
        callers = callers[: module + 1]
    return callers[:COMPARED]


def check_against_the_guests_hist(
    vm: VM, m: AggregateProbe, function: str, command: str, hits: int
) -> dict[tuple[str, ...], tuple[int, int]]:
    """``m`` counts ``function``'s hits by stack in the guest; with the guest's own hist
    trigger on the same function at the same time, run ``command`` and compare stack by
    stack. Only a walk cut by depth or at a module's text is taken; such stacks, and
    stacks deeper than the kernel's key, are compared on the frames both hold. Returns
    {callers: (ours, theirs)}."""
    hist = GuestHist(vm, function)
    hist.start()
    try:
        before = m.read()
        vm.run(command, check=True)
        hist.pause()
        after = m.read()
        theirs, unplaced = hist.read()
    finally:
        hist.remove()
    ours: dict[tuple[str, ...], int] = {}
    for key, n in counts_between(before, after).items():
        assert isinstance(key, StackKey) and key.frames[0] == m.kp.addr + 1  # type: ignore[operator]
        frames = [vm.symbols.describe(f) for f in key.frames]
        assert key.cut in (0, CUT_DEPTH, CUT_OUTSIDE, CUT_NO_ORC), (key.reason, frames)
        if key.cut == CUT_NO_ORC:
            # an interrupt may land where the kernel keeps no ORC entry (6.12's retpoline
            # thunks): the walk stops at that interrupted frame, compared on what it has
            assert any(f.startswith("asm_") for f in frames[:-1]), frames
        if key.cut == CUT_DEPTH:
            assert len(frames) - 1 >= COMPARED, frames
        if key.cut == CUT_OUTSIDE:
            assert frames[-1].endswith("]"), frames  # a module's text, kept
        callers = _compared(our_callers(vm, key))
        ours[callers] = ours.get(callers, 0) + n
    assert unplaced == 0
    renamed = kernel_rules(vm).version[:2] >= (6, 5)  # (the key's name, since 6.5)
    assert hist.key == ("common_stacktrace" if renamed else "stacktrace")
    merged: dict[tuple[str, ...], int] = {}
    for callers, n in theirs.items():
        merged[_compared(callers)] = merged.get(_compared(callers), 0) + n
    both = {c: (ours.get(c, 0), merged.get(c, 0)) for c in ours.keys() | merged.keys()}
    for callers, (a, b) in both.items():
        assert abs(a - b) <= EDGE, (callers, a, b, both)
    top = max(both, key=lambda c: both[c][0])
    assert min(both[top]) >= hits, both
    return both


def test_vfs_read_stacks_are_the_guests(vm: VM, kprobes: ProbeSession) -> None:
    m = kprobes.count_by("vfs_read", "stack")
    both = check_against_the_guests_hist(vm, m, "vfs_read", DD, 2000)
    top = max(both, key=lambda c: both[c][0])
    assert top[0].startswith("ksys_read+") and top[-1].startswith("entry_SYSCALL_64"), top


def test_do_sys_openat2_stacks_are_the_guests(vm: VM, kprobes: ProbeSession) -> None:
    m = kprobes.count_by("do_sys_openat2", "stack")
    both = check_against_the_guests_hist(
        vm, m, "do_sys_openat2", "i=0; while [ $i -lt 500 ]; do : </dev/null;"
        " i=$((i+1)); done", 500,
    )  # fmt: skip
    top = max(both, key=lambda c: both[c][0])
    assert top[0].startswith("__x64_sys_open"), top


def test_interrupt_stacks_are_the_guests(vm: VM, kprobes: ProbeSession) -> None:
    """Timer interrupts: from the IRQ stack through the interrupt's frame to the task it
    interrupted (mostly the idle task, whose stack goes on into init text), against the
    guest's own hist trigger on hrtimer_interrupt."""
    m = kprobes.count_by("hrtimer_interrupt", "stack")
    both = check_against_the_guests_hist(vm, m, "hrtimer_interrupt", "sleep 1", 5)
    top = max(both, key=lambda c: both[c][0])
    names = [f.split("+")[0] for f in top]
    assert names[:3] == ["__sysvec_apic_timer_interrupt", "sysvec_apic_timer_interrupt",
                         "asm_sysvec_apic_timer_interrupt"], top  # fmt: skip
    assert "do_idle" in names, top
