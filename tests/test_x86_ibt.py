"""IBT entries: the kernel's ``is_endbr()`` and ``arch_adjust_kprobe_addr()`` on bytes."""

from __future__ import annotations

from kprobevm.tracing.kernel_rules import KernelFacts, KernelRules
from kprobevm.x86.arch import ENDBR_POISON, adjust_kprobe_addr, has_ibt, is_endbr

ENDBR64 = bytes.fromhex("f30f1efa")
ENDBR32 = bytes.fromhex("f30f1efb")
FTRACE_NOP = bytes.fromhex("0f1f440000")


def test_endbr_forms() -> None:
    assert is_endbr(ENDBR64) and is_endbr(ENDBR32) and is_endbr(ENDBR_POISON)
    assert not is_endbr(FTRACE_NOP) and not is_endbr(b"\xf3\x0f")


def test_func_0_moves_past_endbr_and_4_is_the_entry() -> None:
    for first in (ENDBR64, ENDBR_POISON):
        assert adjust_kprobe_addr(first, 0) == (4, True)
        assert adjust_kprobe_addr(first, 4) == (4, True)
        assert adjust_kprobe_addr(first, 9) == (9, False)
    assert adjust_kprobe_addr(FTRACE_NOP, 0) == (0, True)
    assert adjust_kprobe_addr(FTRACE_NOP, 5) == (5, False)


def test_ibt_is_decided_from_kallsyms() -> None:
    assert has_ibt({"__ibt_endbr_seal"}) and not has_ibt({"vfs_read"})
    assert KernelRules.decide(KernelFacts((6, 12, 0), {"__ibt_endbr_seal"})).ibt_entry
    assert not KernelRules.decide(KernelFacts((6, 1, 0), set())).ibt_entry
