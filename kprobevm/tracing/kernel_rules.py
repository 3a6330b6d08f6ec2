"""What a kprobe event prints that depends on the guest's kernel, decided from that kernel.

Each rule is a behaviour of the kernel's kprobe events that changed at some release, or
that hangs on the kernel's configuration; :data:`RULES` lists them with the kernel change
that brought each. :func:`kernel_rules` decides them for one guest from facts read out
of it (:class:`KernelFacts`): a symbol that the change added or that the configuration
builds in, else the version in ``linux_banner``. The differential harness
(:mod:`kprobevm.tracing.differential`) is what finds the rules; add one here when it
shows a difference that a kernel explains.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kprobevm.errors import KprobeVMError
from kprobevm.kernel.btf import BtfError
from kprobevm.x86.arch import has_ibt

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM
    from kprobevm.kernel.btf import Btf

__all__ = [
    "RULES",
    "KernelFacts",
    "KernelRule",
    "KernelRules",
    "kernel_facts",
    "kernel_rules",
    "parse_version",
]

_VERSION_RE = re.compile(r"Linux version (\d+)\.(\d+)(?:\.(\d+))?")
_BANNER_SIZE = 256


def parse_version(banner: str) -> tuple[int, int, int]:
    """(major, minor, patch) from ``linux_banner`` (``Linux version 6.1.0-57-cloud-amd64
    ...``); raises :class:`~kprobevm.errors.KprobeVMError` for text of another shape."""
    m = _VERSION_RE.search(banner)
    if m is None:
        raise KprobeVMError(f"no kernel version in {banner[:80]!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


@dataclass(frozen=True)
class KernelFacts:
    """What the rules are decided from: the version, the names in kallsyms, and the
    kernel's BTF when there is one."""

    version: tuple[int, int, int]
    symbols: Container[str]
    btf: Btf | None = None

    def has(self, name: str) -> bool:
        """Whether kallsyms names ``name``."""
        return name in self.symbols

    def has_member(self, struct: str, member: str) -> bool | None:
        """Whether BTF's ``struct`` has ``member`` (None: no BTF, or no such struct)."""
        if self.btf is None:
            return None
        try:
            self.btf.member(struct, member)
        except BtfError as exc:
            return False if "has no member" in str(exc) else None
        return True

    def at_least(self, major: int, minor: int) -> bool:
        """Whether the kernel is ``major.minor`` or later."""
        return self.version[:2] >= (major, minor)


@dataclass(frozen=True)
class KernelRule:
    """One version- or configuration-dependent behaviour, and where it came from."""

    name: str
    behaviour: str
    change: str
    """The kernel change that brought it (release, title)."""
    decide: Callable[[KernelFacts], bool]
    """Whether a kernel with these facts has the behaviour."""


def _mixed_reads(facts: KernelFacts) -> bool:
    # The helper this change introduced; a kernel without kallsyms names falls back
    # on the release.
    return facts.has("strncpy_from_user_nofault") or facts.at_least(5, 8)


def _ftrace_kprobes(facts: KernelFacts) -> bool:
    return facts.has("kprobe_ftrace_handler")


def _btf_args(facts: KernelFacts) -> bool:
    # trace_btf.o, built only with PROBE_EVENTS_BTF_ARGS (6.6 on), defines it; 6.5 had
    # the same in trace_probe.c as a static function, which kallsyms may not name
    return facts.has("btf_find_func_proto")


def _selector_cs(facts: KernelFacts) -> bool:
    member = facts.has_member("pt_regs", "csx")
    return member if member is not None else facts.at_least(6, 9)


RULES: tuple[KernelRule, ...] = (
    KernelRule(
        name="mixed_reads",
        behaviour=(
            "a kernel-space read (`string`, `+OFF(...)`, `@SYM`) of an address below "
            "TASK_SIZE reads user memory, so `+0(%si):string` of a user file name prints "
            "the name, not (fault)"
        ),
        change=(
            "Linux 5.8, 'tracing/kprobes: handle mixed kernel/userspace probes better' "
            "(with x86 selecting ARCH_HAS_NON_OVERLAPPING_ADDRESS_SPACE in the same series)"
        ),
        decide=_mixed_reads,
    ),
    KernelRule(
        name="newest_first",
        behaviour=(
            "events on one address run newest definition first: their lines for one hit "
            "come out in the reverse of the order they were defined"
        ),
        change=(
            "every release with aggregate kprobes: add_new_kprobe() puts a probe without "
            "a post handler (every trace event) at the head of the aggregate's list"
        ),
        decide=lambda facts: True,
    ),
    KernelRule(
        name="ftrace_kprobes",
        behaviour=(
            "a probe on a function's ftrace call site runs from ftrace, not int3: its "
            "line's flags are `.....` and `%orig_ax` reads 0"
        ),
        change="Linux 3.15 (x86), 'kprobes/x86: Support kprobes on ftrace' (KPROBES_ON_FTRACE)",
        decide=_ftrace_kprobes,
    ),
    KernelRule(
        name="kretprobed",
        behaviour=(
            "a return address that is the kernel's return trampoline (the return of a call "
            "that another return probe on the function hooked first) prints as "
            "`[unknown/kretprobe'd]`; before, a return line printed the trampoline's "
            "symbol with its offset"
        ),
        change=(
            "Linux 5.15, 'tracing: Show kretprobe unknown indicator only for "
            "kretprobe_trampoline' (the address is compared, not the name)"
        ),
        decide=lambda facts: facts.at_least(5, 15),
    ),
    KernelRule(
        name="ibt_entry",
        behaviour=(
            "a function that starts with `endbr64` (or its sealed nop4) has its entry at "
            "+4: a probe at +0 or +4 goes to +4 and prints `func+0x4`, and `$argN` and "
            "return probes take +4 as the entry"
        ),
        change=(
            "Linux 5.18, 'x86/ibt,kprobes: Cure sym+0 equals fentry woes' "
            "(arch_adjust_kprobe_addr), on kernels built with X86_KERNEL_IBT"
        ),
        decide=lambda facts: has_ibt(facts.symbols),
    ),
    KernelRule(
        name="btf_args",
        behaviour=(
            "an argument may name a parameter of the probed function (`count`), a bare "
            "`$argN` or `$arg*` becomes the parameters' names, an argument without a type "
            "takes its BTF type (`$retval` of a `long` function prints `3`, not `0x3`), "
            "`$retval` of a `void` function is refused (NO_RETVAL) and `:string` checks "
            "the BTF type (BAD_TYPE4STR)"
        ),
        change=(
            "Linux 6.5, 'tracing/probes: Support function parameters if BTF is available' "
            "and 'tracing/probes: Add BTF retval type support' (PROBE_EVENTS_BTF_ARGS), "
            "with 6.6's 'tracing/probes: Add string type check with BTF'"
        ),
        decide=_btf_args,
    ),
    KernelRule(
        name="sticky_deref_offset",
        behaviour=(
            "the error position of an argument moves past a `+OFF(` it parsed and stays "
            "there: a later error in the same argument (BAD_STRING of "
            "`+u0(%si):u8[4]`) has its caret that many bytes further right"
        ),
        change=(
            "Linux 6.5, 'tracing/probes: Move event parameter fetching code to common "
            "parser' (the position became the parse context's offset)"
        ),
        decide=lambda facts: facts.at_least(6, 5),
    ),
    KernelRule(
        name="entry_args_at_return",
        behaviour=(
            "a return probe may fetch the function's arguments (`$argN`, a parameter's "
            "name): the kernel saves them at the entry (its entry data) and reads them "
            "at the return; a dereference of one reads memory at the return. `$argN` "
            "anywhere else but an entry is NOFENTRY_ARGS (before: BAD_VAR)"
        ),
        change="Linux 6.11, 'tracing/probes: Support $argN in return probe (kprobe and fprobe)'",
        decide=lambda facts: facts.has("store_trace_entry_data"),
    ),
    KernelRule(
        name="comm_type_logged",
        behaviour=(
            "`$comm` or an immediate string with a type other than `string` is logged "
            "in error_log (NEED_STRING_TYPE, its caret on the type); before, it was "
            "refused in silence"
        ),
        change="Linux 6.8, 'tracing/probes: Fix to show a parse error for bad type for $comm'",
        decide=lambda facts: facts.at_least(6, 8),
    ),
    KernelRule(
        name="selector_cs",
        behaviour=(
            "`%cs` of a return probe reads the return trampoline's frame: `__KERNEL_CS` "
            "in its low 16 bits over whatever the stack held there (the function's own "
            "stack contents)"
        ),
        change=(
            "Linux 6.9, 'x86/ptrace: Cleanup the definition of the pt_regs structure' "
            "(`cs` became a u16 in a union with the 64-bit `csx` slot, so the "
            "trampoline's `regs->cs = __KERNEL_CS` sets only the low 16 bits)"
        ),
        decide=_selector_cs,
    ),
)
"""Every rule kprobevm knows, in one place."""


@dataclass(frozen=True)
class KernelRules:
    """The rules decided for one kernel (see :data:`RULES` for what each means)."""

    version: tuple[int, int, int]
    mixed_reads: bool
    newest_first: bool
    ftrace_kprobes: bool
    kretprobed: bool
    rethook_trampoline: str | None
    """The kernel's name for the return trampoline a return probe puts on the stack
    (``arch_rethook_trampoline`` since 5.19, ``__kretprobe_trampoline`` before that,
    ``kretprobe_trampoline`` before 5.14), None when kallsyms names none of them."""
    ibt_entry: bool = False
    btf_args: bool = False
    sticky_deref_offset: bool = False
    entry_args_at_return: bool = False
    comm_type_logged: bool = False
    selector_cs: bool = False

    @classmethod
    def decide(cls, facts: KernelFacts) -> KernelRules:
        """Each rule of :data:`RULES` decided for ``facts``."""
        got = {rule.name: rule.decide(facts) for rule in RULES}
        names = ("arch_rethook_trampoline", "__kretprobe_trampoline", "kretprobe_trampoline")
        trampoline = next((n for n in names if facts.has(n)), None)
        return cls(
            version=facts.version, mixed_reads=got["mixed_reads"],
            newest_first=got["newest_first"], ftrace_kprobes=got["ftrace_kprobes"],
            kretprobed=got["kretprobed"], rethook_trampoline=trampoline,
            ibt_entry=got["ibt_entry"], btf_args=got["btf_args"],
            sticky_deref_offset=got["sticky_deref_offset"],
            entry_args_at_return=got["entry_args_at_return"],
            comm_type_logged=got["comm_type_logged"], selector_cs=got["selector_cs"],
        )  # fmt: skip


LATEST = KernelRules(
    version=(6, 1, 0), mixed_reads=True, newest_first=True, ftrace_kprobes=True,
    kretprobed=True, rethook_trampoline="arch_rethook_trampoline",
)  # fmt: skip
"""The rules of the default image's kernel: for planning without a guest."""


def kernel_facts(vm: VM) -> KernelFacts:
    """The facts of ``vm``'s kernel: ``linux_banner`` read from its memory, its kallsyms
    and its BTF (no SSH: usable on the trap thread's side of a session)."""
    symbols = vm.symbols
    raw = vm.read(symbols["linux_banner"], _BANNER_SIZE)
    banner = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return KernelFacts(parse_version(banner), symbols, vm.btf)


_DECIDED: weakref.WeakKeyDictionary[VM, KernelRules] = weakref.WeakKeyDictionary()


def kernel_rules(vm: VM) -> KernelRules:
    """The rules of ``vm``'s kernel, decided once per guest."""
    rules = _DECIDED.get(vm)
    if rules is None:
        rules = _DECIDED[vm] = KernelRules.decide(kernel_facts(vm))
    return rules
