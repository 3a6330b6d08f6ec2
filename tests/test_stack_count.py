"""``count --by stack`` on the shared guest against the guest kernel's own stack counts:
a tracefs kprobe on the same function with a ``hist`` trigger keyed by its stack, both in
place over the same workload (``dd bs=1`` for vfs_read, a shell's open loop for
do_sys_openat2). Stack by stack the callers must be the same frames, the counts the same
but for the few reads and opens the guest's SSH server makes at the edges of the window."""

from __future__ import annotations

import pytest

from kprobevm.guest.vm import VM
from kprobevm.kprobes.aggregations import AggregateProbe, StackKey
from kprobevm.pytest_plugin import ProbeSession
from kprobevm.tracing.kernel_rules import kernel_rules
from kprobevm.tracing.maps import stack_frames
from kprobevm.x86.orc_walk import CUT_DEPTH, CUT_OUTSIDE
from tests._stack_hist import GuestHist, counts_between, our_callers

pytestmark = pytest.mark.vm

EDGE = 24
"""Hits a side may count that the other did not, per stack: the SSH server's reads or
opens while one side's window is open and the other's is not (the guest's is opened and
closed by commands of their own; a command's SSH traffic is some 10-20 reads)."""

DD = "dd if=/dev/zero of=/dev/null bs=1 count=2000 2>/dev/null"


def check_against_the_guests_hist(
    vm: VM, m: AggregateProbe, function: str, command: str, hits: int
) -> dict[tuple[str, ...], tuple[int, int]]:
    """``m`` counts ``function``'s hits by stack in the guest; with the guest's own hist
    trigger on the same function at the same time, run ``command`` and compare stack by
    stack. Returns {callers: (ours, theirs)}."""
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
        assert key.cut == 0, (key.reason, [vm.symbols.describe(f) for f in key.frames])
        callers = our_callers(vm, key)
        ours[callers] = ours.get(callers, 0) + n
    assert unplaced == 0
    renamed = kernel_rules(vm).version[:2] >= (6, 5)  # (the key's name, since 6.5)
    assert hist.key == ("common_stacktrace" if renamed else "stacktrace")
    both = {c: (ours.get(c, 0), theirs.get(c, 0)) for c in ours.keys() | theirs.keys()}
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


def test_interrupt_stacks_cross_to_the_interrupted_stack(vm: VM, kprobes: ProbeSession) -> None:
    """A timer interrupt's stack goes from the IRQ stack through the interrupt's frame to
    the task it interrupted (the idle task: its stack ends in init code or start_secondary);
    a walk is cut only past 16 frames or at a module's text, which it keeps and says."""
    m = kprobes.count_by("hrtimer_interrupt", "stack")
    vm.run("sleep 0.5", check=True)
    m.close()
    snap = m.read()
    assert snap.total > 0
    names = [[vm.symbols.describe(f).split("+")[0] for f in key.frames]  # type: ignore[union-attr]
             for key, _ in snap.counts]  # fmt: skip
    assert all(n[0] == "hrtimer_interrupt" for n in names), names
    assert any("asm_sysvec_apic_timer_interrupt" in n and "do_idle" in n for n in names), names
    for key, _ in snap.counts:
        assert isinstance(key, StackKey)
        frames, cut = stack_frames(key, vm.symbols)
        if key.cut == CUT_OUTSIDE:  # an interrupted module (virtio's notify): kept, said
            sym = vm.symbols.lookup(key.frames[-1])
            assert sym is not None and sym.module is not None and sym.is_text, frames
            assert cut == f"module {sym.module}: its frames are not walked", cut
        else:
            assert key.cut in (0, CUT_DEPTH), (key.reason, frames)
