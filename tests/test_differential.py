"""kprobevm against the guest's own tracefs: the same definitions, the same workload,
every line compared field by field; rejected definitions compared as ``error_log`` entries;
the placed probes compared as debugfs ``kprobes/list`` lines.

The guest kernel is the oracle. One guest per kernel of :data:`KERNELS` (module scope);
each batch of :data:`TRACED` runs once through tracefs, then through kprobevm recorded
(when every event of the batch can be recorded) and stopping; :data:`CROWDED` runs as
``--mode auto`` takes it, which must fall back to stopping.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from kprobevm.errors import KprobeError
from kprobevm.guest.vm import VM
from kprobevm.tracing import differential as diff
from kprobevm.tracing.kernel_rules import KernelFacts, KernelRules, kernel_rules, parse_version

WORKLOAD = "cat /etc/passwd /proc/version /nonexistent >/dev/null 2>&1; true"
COMM = "cat"

KERNELS: dict[str, dict[str, object]] = {"default": {}}
"""Each guest kernel the harness runs on here, as ``kprobevm.boot()`` arguments. The other
kernels the project boots (6.12 cloud and rt, 6.1 rt, KASLR, 5-level paging) run the same
corpus in tests/test_boot_variants.py, beside the rest of their conformance subset."""

KNOWN: dict[tuple[str, str], str] = {}
"""Differences the harness found on a kernel and kprobevm does not settle yet, by
(kernel, run), a run being a traced batch (``lines-INDEX-MODE``) or one rejected case
(``error_log DEFINITION``): those are expected to differ (strictly: one that matches
says the entry is out of date)."""

TRACED: tuple[tuple[str, ...], ...] = (
    (  # strings, user and mixed reads, nested derefs, @SYM, immediates, $comm, multi-probe
        "p:o1 do_sys_openat2 dfd=%di:s32 fn=+0(%si):string",
        "p:o2 do_sys_openat2 fu=+0(%si):ustring c=$comm fl=+0(%dx):x64 m=+8(%dx):u64"
        " uf=+u0(%si):u8",
        "p:fo do_filp_open dfd=%di:s32 name=+0(+0(%si)):string",
        "p:ex do_exit code=%di:x32 banner=@linux_banner:string nr=@nr_cpu_ids:u32"
        " pt=@panic_timeout:s32 sct=@sys_call_table:symbol",
        'p:ex2 do_exit im=\\42 ims=\\"hello":string cmd=+0(@saved_command_line):string'
        " c=$COMM",
        "p:multi ksys_write fd=%di:u32 n=%dx:u64",
        "p:multi close_fd fd=%di:u32 n=%dx:u64",
    ),
    (  # every integer type, arrays, bitfields, $argN, registers, a probe inside a function
        "p:t1 do_sys_openat2 u8=%di:u8 u16=%di:u16 u32=%di:u32 u64=%di:u64 s8=%di:s8"
        " s16=%di:s16 s64=%di:s64",
        "p:t3 do_sys_openat2 ar=+0(%si):x8[4] ar2=+0(%si):u16[2] bf=+0(%dx):b1@15/64"
        " bf2=+0(%dx):b4@0/32 bf3=%di:b4@4/8",
        "p:n1 do_sys_openat2+{insn:do_sys_openat2:2} dfd=%di:s32 ip=%ip oa=%orig_ax fl=%flags",
        "p:n2 do_filp_open+{insn:do_filp_open:3} c=$comm",
    ),
    (  # registers and $argN, the return address, an address probe
        "p:t4 do_sys_openat2 a1=$arg1:s32 a2=+0($arg2):ustring a3=+0($arg3):x64 fl=%flags"
        " cs=%cs ss=%ss ip=%ip oa=%orig_ax sp=%sp:b3@0/64 st=$stack:b3@0/64",
        "p:sa getname_flags s0=$stack0:symbol fl=%si:x32",
        "p:ad {addr:do_filp_open} dfd=%di:s32",
    ),
    (  # names: a group of our own, made-up names, bare definitions; hex types
        "p:t2 do_sys_openat2 x8=%di:x8 x16=%di:x16 x32=%di:x32 x64=%di:x64 d=%di",
        "p:grp/custom do_exit c=$comm",
        "p:grp2/ do_exit",
        "p do_filp_open",
        "p:ks ksys_write+0 buf=+0(%si):x8[2]",
    ),
    (  # return probes: r, %return, maxactive, $retval typed, a return on an entry's address,
       # two on one function
        "p:k1 do_sys_openat2 s0=$stack0:symbol",
        "r:or do_sys_openat2 $retval ret=$retval:s32 c=$comm ip=%ip oa=%orig_ax",
        "r:or2 do_sys_openat2 ret=$retval:s32",  # two return probes on one function
        "p:fo2 do_filp_open%return err=$retval:b1@63/64",
        # cs: a 6.9+ kernel's trampoline sets only the selector; the other bits are the
        # stack's contents (a stack address: the top bit set, the rest per task)
        "r:gr getname_flags ret=$retval:b1@63/64 cs=%cs:b16@0/64 csx=%cs:b1@63/64",
        "r10:mr ksys_write rv=$retval:s32",
        "r:mr close_fd rv=$retval:s32",
    ),
    (  # a function's arguments at its return, saved at its entry: $argN, dereferenced,
       # by a parameter's name and BTF type, $arg*; an IBT function (vfs_read: entry at +4)
        "r:ra do_sys_openat2 d=$arg1:s32 fn=+0($arg2):ustring ret=$retval:s32",
        "r:rb do_sys_openat2 $arg1 filename:ustring",
        "p:ve vfs_read ip=%ip",
        "r:rv vfs_read count $retval",
        "r:rc close_fd $arg*",
    ),
    (  # five events with arrays on one address: their record program would not fit its
       # cell, so --mode auto stops at each hit (CROWDED)
        "p:c1 do_sys_openat2 ar=+0(%si):x8[8] w=+0(%si):u16[4] fn=+0(%si):ustring",
        "p:c2 do_sys_openat2 ar=+0(%si):u8[8] dfd=%di:s32",
        "p:c3 do_sys_openat2 q=+0(%dx):x64[3] fl=+0(%dx):x64",
        "p:c4 do_sys_openat2 s=+0(%si):s8[6] fn=+0(%si):string",
        "p:c5 do_sys_openat2 h=+0(%si):x16[4] c=$comm",
    ),
)
"""Definitions the guest accepts, in batches placed together (see :data:`NEEDS`)."""

RETURNS = 4
RETURN_ARGS = 5
NEEDS: dict[int, tuple[str, ...]] = {RETURN_ARGS: ("entry_args_at_return", "btf_args")}
"""Batches only a kernel with these rules (:mod:`kprobevm.tracing.kernel_rules`) takes;
on another kernel the guest and kprobevm must refuse their definitions alike."""


RECORD_REFUSED: dict[int, tuple[str, str]] = {
    # a 6.9+ kernel's return %cs is partly a stack word, which the record program's own
    # frame covers by the time it could read it: such events stop the guest
    RETURNS: ("selector_cs", "a return's %cs"),
    RETURN_ARGS: ("entry_args_at_return", "saved at the function's entry"),
}
"""Batches ``--mode record`` refuses on a kernel with the rule, and what it says."""


def record_refusal(vm: VM, index: int) -> str | None:
    """What ``--mode record`` says when it refuses batch ``index`` on ``vm``'s kernel."""
    rule, why = RECORD_REFUSED.get(index, ("", ""))
    return why if rule and getattr(kernel_rules(vm), rule) else None


def check_record_refused(vm: VM, definitions: list[str], workload: str, why: str) -> None:
    """``--mode record`` refuses the batch, saying ``why``, and leaves no probe."""
    with pytest.raises(KprobeError, match=re.escape(why)):
        diff.run_kprobevm(vm, definitions, workload, mode="record")
    assert not vm.list_kprobes()


def taken_by(vm: VM, index: int) -> bool:
    """Whether ``vm``'s kernel has every rule batch ``index`` needs."""
    rules = kernel_rules(vm)
    return all(getattr(rules, rule) for rule in NEEDS.get(index, ()))


def check_refused_alike(vm: VM, definitions: list[str]) -> None:
    """Each definition written alone: the same error_log entries (or accepted lines) on
    both sides, and at least one refused."""
    sides: tuple[list[str], list[str]] = ([], [])
    for text in definitions:
        for side, run in zip(sides, (diff.tracefs_errors, diff.kprobevm_errors), strict=True):
            result = run(vm, [text])
            side += [e.text() for e in result.errors] + list(result.accepted)
    assert sides[1] == sides[0]
    assert any(x.startswith("trace_kprobe: error:") for x in sides[0]), sides[0]

REJECTED: tuple[tuple[str, ...], ...] = (
    ("p:e1 do_sys_openat2+1",),  # BAD_INSN_BNDRY
    ("p:e2 no_such_function_kprobevm",),  # BAD_PROBE_ADDR
    ("r:e3 do_sys_openat2+{insn:do_sys_openat2:1}",),  # BAD_RETPROBE
    ("p:e4 vfs_read a=%di:symstr",),  # a later kernel's type: this 6.1 takes it
    ("p:e5 vfs_read", "p:e5 vfs_read"),  # SAME_PROBE
    ("p:e6 vfs_read", "r:e6 vfs_write"),  # DIFF_PROBE_TYPE
    ("p:e7 vfs_read a=%di", "p:e7 vfs_write b=%di"),  # DIFF_ARG_TYPE
    ("p:sched/sched_switch vfs_read",),  # EVENT_EXIST
    ("p:e8 do_int3",),  # FAIL_REG_PROBE: blacklisted
    ("p:e9 {dup}",),  # NON_UNIQ_SYMBOL
    ("p:e10 vfs_read a=+u0(%si):u8[4]",),  # BAD_STRING: user arrays of numbers
    ("r:e11 vfs_read a=$arg1",),  # BAD_VAR
    ("p:e12 vfs_read a=$stack99999",),  # BAD_STACK_NUM
    ('p:e13 vfs_read a=\\"abc',),  # IMMSTR_NO_CLOSE
    ("p:e14 vfs_read a=%rax",),  # BAD_REG_NAME
    ("p:e15 vfs_read a=+0(%di):b9@0/8",),  # BAD_BITFIELD
    ("p:e16 vfs_read a=$comm:u8",),  # rejected, nothing logged
    ("r5000:e17 vfs_read",),  # MAXACT_TOO_BIG
    ("p:e18 vfs_read%ret",),  # BAD_ADDR_SUFFIX
    ("p:e19 vfs_read+{insn:vfs_read:1} a=$arg1",),  # $argN off the entry (but after endbr64)
    # what a kernel with BTF arguments takes or refuses otherwise (kernel_rules.btf_args)
    ("p:e20 vfs_read count",),  # a parameter by name
    ("p:e21 vfs_read $arg*",),  # every parameter
    ("p:e22 do_sys_openat2 $arg1 filename:ustring",),  # $argN named; a char * as a string
    ("r:e23 schedule_tail $retval",),  # NO_RETVAL: a void function
    ("r:e24 getname_flags $retval:string",),  # BAD_TYPE4STR: not a char *
    ("p:e25 vfs_read nosuchparam",),  # NO_BTFARG
    ("p:e26 vfs_read+{insn:vfs_read:2} $arg1",),  # NOFENTRY_ARGS
    ("p:e27 vfs_read+{insn:vfs_read:2} a=+0($arg1)",),  # 6.11: NOFENTRY_ARGS, 6.1: BAD_VAR
    ("p:e28 {addr:vfs_read} a=$arg1",),  # an address probe is no function entry
)
"""Definitions (with those before them in their tuple) the guest rejects."""

def corpus_size() -> int:
    """Definitions in the corpus, accepted and rejected."""
    return sum(map(len, TRACED)) + sum(map(len, REJECTED))


def test_corpus_is_large_enough() -> None:
    assert corpus_size() >= 40


# --- the machinery, without a guest ---------------------------------------------------


def test_trace_lines_parse_into_fields() -> None:
    text = (
        "# tracer: nop\n"
        '             cat-108     [000] .N...     2.562445: o1: (do_sys_openat2+0x0/0x170)'
        ' dfd=-100 fn="/etc/my passwd" x=1\n'
        "             cat-108     [000] .....     2.563917: cl: ([unknown/kretprobe'd] <-"
        " close_fd) arg1=0x0\n"
    )
    lines = diff.parse_trace(text, {"o1": ("dfd", "fn", "x"), "cl": ("arg1",)})
    assert [(x.comm, x.pid, x.flags, x.event) for x in lines] == [
        ("cat", 108, ".N...", "o1"), ("cat", 108, ".....", "cl")]  # fmt: skip
    assert lines[0].args == (("dfd", "-100"), ("fn", '"/etc/my passwd"'), ("x", "1"))
    assert lines[1].where == "[unknown/kretprobe'd] <- close_fd"


def test_compare_aligns_and_names_the_fields() -> None:
    def line(event: str, value: str, pid: int = 1, flags: str = ".....") -> diff.TraceLine:
        text = f"cat-{pid} [000] {flags} 1.000000: {event}: (f+0x0/0x10) v={value}"
        parsed = diff.parse_trace_line(text)
        assert parsed is not None
        return parsed

    guest = [line("a", "1"), line("b", "2"), line("c", "3")]
    ours = [line("a", "1", pid=9, flags="..Zff"), line("c", "4")]
    result = diff.compare_lines(guest, ours)
    assert (result.compared, result.matched, result.same_flags) == (3, 1, 0)
    assert [m.fields for m in result.mismatches] == [("missing in kprobevm",), ("args",)]


def test_error_log_entries_parse() -> None:
    text = (
        "[    2.423814] trace_kprobe: error: Retprobe address must be an function entry\n"
        "  Command: r:bad do_sys_openat2+4\n"
        "                 ^\n"
    )
    assert diff.parse_error_log(text) == [diff.ErrorLogEntry(
        "Retprobe address must be an function entry", "r:bad do_sys_openat2+4", 6)]  # fmt: skip


def test_rules_are_decided_from_the_kernel() -> None:
    assert parse_version("Linux version 6.1.0-57-cloud-amd64 (debian-kernel@...)") == (6, 1, 0)
    old = KernelRules.decide(KernelFacts((5, 4, 0), {"kretprobe_trampoline"}))
    assert not old.mixed_reads and old.rethook_trampoline == "kretprobe_trampoline"
    assert not old.kretprobed
    new = KernelRules.decide(KernelFacts((6, 1, 0), {"arch_rethook_trampoline"}))
    assert new.mixed_reads and new.newest_first and not new.ftrace_kprobes
    assert new.kretprobed
    assert not (new.btf_args or new.sticky_deref_offset or new.comm_type_logged)
    assert not (new.selector_cs or new.entry_args_at_return)
    later = KernelRules.decide(
        KernelFacts((6, 12, 0), {"btf_find_func_proto", "store_trace_entry_data"})
    )
    assert later.btf_args and later.sticky_deref_offset and later.comm_type_logged
    assert later.selector_cs and later.entry_args_at_return


# --- real guests ------------------------------------------------------------------------


@dataclass
class Harness:
    """One booted guest, each batch's tracefs run kept for both modes, and the tally."""

    vm: VM
    kernel: str
    tracefs: dict[int, diff.SideRun] = field(default_factory=dict)
    tally: dict[str, list[int]] = field(default_factory=dict)

    def batch(self, index: int) -> list[str]:
        return [diff.expand(d, self.vm) for d in TRACED[index]]

    def guest_run(self, index: int) -> diff.SideRun:
        if index not in self.tracefs:
            self.tracefs[index] = diff.run_tracefs(self.vm, self.batch(index), WORKLOAD)
        return self.tracefs[index]

    def expect_known(self, request: pytest.FixtureRequest, run: str) -> None:
        """Mark this run an expected failure when :data:`KNOWN` lists it for this kernel."""
        reason = KNOWN.get((self.kernel, run))
        if reason is not None:
            request.applymarker(pytest.mark.xfail(reason=reason, strict=True))

    def count(self, mode: str, result: diff.Comparison) -> None:
        seen = self.tally.setdefault(mode, [0, 0])
        seen[0] += result.compared
        seen[1] += result.matched


@pytest.fixture(scope="module", params=sorted(KERNELS))
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """A guest of one kernel of :data:`KERNELS`, booted for this module only."""
    import kprobevm

    with kprobevm.boot(name=f"diff-{request.param}", **KERNELS[request.param]) as vm:  # type: ignore[arg-type]
        h = Harness(vm, request.param)
        yield h
        for mode, (compared, matched) in sorted(h.tally.items()):
            print(f"\n{request.param} {mode}: {matched}/{compared} lines identical")


CROWDED = len(TRACED) - 1
"""The batch whose events on one address need a record program larger than its cell."""


def _modes(index: int, batch: tuple[str, ...]) -> tuple[str, ...]:
    """How kprobevm's side runs a batch: recorded and stopping, or as ``--mode auto``
    takes it where it cannot record (falling back to stopping, which the test checks)."""
    if index == CROWDED:
        return ("auto",)
    return ("record", "stop")


RUNS = [(index, mode) for index, batch in enumerate(TRACED) for mode in _modes(index, batch)]


@pytest.mark.vm
@pytest.mark.parametrize(("index", "mode"), RUNS)
def test_lines_as_the_guests_tracefs_prints_them(harness: Harness, index: int, mode: str,
                                                 request: pytest.FixtureRequest) -> None:
    harness.expect_known(request, f"lines-{index}-{mode}")
    vm = harness.vm
    definitions = harness.batch(index)
    if not taken_by(vm, index):
        check_refused_alike(vm, definitions)
        return
    guest = harness.guest_run(index)
    assert guest.of(COMM), "the workload made no line on the guest's side"
    if mode == "record" and (why := record_refusal(vm, index)) is not None:
        check_record_refused(vm, definitions, WORKLOAD, why)
        return
    ours = diff.run_kprobevm(vm, definitions, WORKLOAD, mode=mode)
    if mode == "auto":
        assert ours.record_refused is not None and "record program" in ours.record_refused
    result = diff.compare_lines(guest.of(COMM), ours.of(COMM))
    harness.count(mode, result)
    assert result.identical, result.describe()
    assert ours.kprobes_list == guest.kprobes_list


@pytest.mark.vm
def test_error_log_as_the_guest_writes_it(harness: Harness,
                                         request: pytest.FixtureRequest) -> None:
    vm = harness.vm
    guest: list[str] = []
    ours: list[str] = []
    for case in REJECTED:  # each on its own: error_log keeps only the last few entries
        expanded = [diff.expand(d, vm) for d in case]
        sides: tuple[list[str], list[str]] = ([], [])
        for side, run in zip(sides, (diff.tracefs_errors, diff.kprobevm_errors), strict=True):
            result = run(vm, expanded)
            side += [e.text() for e in result.errors] + list(result.accepted)
        known = KNOWN.get((harness.kernel, f"error_log {case[-1]}"))
        if known is not None:
            assert sides[0] != sides[1], f"KNOWN is out of date: {known}"
            continue
        guest += sides[0]
        ours += sides[1]
    assert ours == guest
    # the harness reads error_log: most cases are logged on every kernel
    assert sum(x.startswith("trace_kprobe: error:") for x in guest) >= len(REJECTED) // 2


@pytest.mark.vm
def test_rules_of_the_guest(harness: Harness) -> None:
    rules = kernel_rules(harness.vm)
    assert rules.version[:2] == tuple(
        int(x) for x in harness.vm.run("uname -r").stdout.split(".")[:2]
    )
    # decided from BTF (pt_regs' csx) where the version would say the same
    assert rules.selector_cs == (rules.version[:2] >= (6, 9))
