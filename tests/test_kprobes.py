"""The kprobes engine against a real guest: hits, handlers, instruction classes, refusals.

Every test here runs on the session's default guest (one vCPU, ``nokaslr``, TCG) and
leaves it as found: each test unregisters its probes, and a fixture checks that no probe
is left behind. The guest's serial console is checked for oopses by conftest.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import capstone
import pytest
from capstone import x86 as csx86

from kprobevm.errors import GuestFaultError, KprobeError, ProbeRefused
from kprobevm.guest.vm import VM
from kprobevm.kprobes.core import Kprobe
from kprobevm.trap.watchpoint import WatchpointChannel
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.emulate import condition_holds
from kprobevm.x86.idt import decode_idt_gate
from kprobevm.x86.insn import Insn, InsnKind
from kprobevm.x86.ptregs import PtRegs

pytestmark = pytest.mark.vm

MASK64 = (1 << 64) - 1
INT3 = b"\xcc"
ARMED = (INT3, b"\xe9")
"""An armed probe's first byte: its int3, or the jump of an optimized one."""
OPEN_TARGET = "/tmp/kpt-open-target"
# ``read`` is an ash builtin: one open of the file per iteration, no fork or exec.
OPEN_LOOP = "for i in $(seq {n}); do read x < {path}; done; echo $x"


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_probe_left(vm: VM) -> Iterator[None]:
    """Each test starts and ends with an empty probe table (a failed test cleans up too)."""
    assert not vm.kprobes.table, f"probes left by an earlier test: {vm.list_kprobes()}"
    yield
    leftover = vm.list_kprobes()
    vm.kprobes.unregister_all()
    assert not leftover, f"the test left probes registered:\n{leftover}"


def open_workload(vm: VM, n: int, path: str = OPEN_TARGET, content: str = "kpt-hello") -> None:
    """``n`` opens of ``path`` in one guest command; checks the guest read what was written."""
    vm.run(f"echo {content} > {path}", check=True)
    result = vm.run(OPEN_LOOP.format(n=n, path=path), check=True, timeout=120)
    assert result.stdout == f"{content}\n", result


def function_range(vm: VM, name: str) -> tuple[int, int]:
    sym = vm.symbols.symbol(name)
    assert sym.size > 0, sym
    return sym.address, sym.size


def text_digest(vm: VM, names: list[str]) -> dict[str, str]:
    """SHA-256 of each function's bytes in guest memory."""
    out = {}
    for name in names:
        start, size = function_range(vm, name)
        out[name] = hashlib.sha256(vm.read(start, size)).hexdigest()
    return out


def function_insns(vm: VM, name: str) -> list[Insn]:
    """Every instruction of ``name``, decoded from the guest's own text."""
    start, size = function_range(vm, name)
    code = vm.read(start, size)
    return [
        x86insn.decode(code[a - start : a - start + x86insn.MAX_INSN_SIZE], a)
        for a in x86insn.boundaries(code, start)
    ]


def register_all(vm: VM, kps: list[Kprobe]) -> tuple[list[Kprobe], Counter[str]]:
    """Register what the engine accepts; count refusals by code."""
    placed: list[Kprobe] = []
    refused: Counter[str] = Counter()
    for kp in kps:
        try:
            vm.register_kprobe(kp)
        except ProbeRefused as exc:
            refused[exc.code] += 1
        else:
            placed.append(kp)
    return placed, refused


def unregister_all(vm: VM, kps: list[Kprobe]) -> None:
    for kp in kps:
        vm.unregister_kprobe(kp)


# -- 1. a probe on do_sys_openat2 -----------------------------------------------------------


def test_openat2_hits_and_file_names(vm: VM) -> None:
    """200 opens: at least 200 hits whose regs.si (the user's filename) reads the path."""
    names: Counter[bytes] = Counter()
    faults = 0
    ips: set[int] = set()

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        nonlocal faults
        ips.add(regs.ip)
        assert regs.memory is not None
        try:
            names[regs.memory.cstring(regs.si, 256)] += 1
        except GuestFaultError:
            faults += 1  # a user page not present yet: the kernel would fault it in

    addr = vm.symbols["do_sys_openat2"]
    kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=pre)
    vm.register_kprobe(kp)
    try:
        assert kp.addr == addr
        assert vm.trap_channel == "watchpoint"
        open_workload(vm, 200)
    finally:
        vm.unregister_kprobe(kp)
    assert kp.nhit >= 200
    assert kp.nerrors == 0, kp.errors
    assert ips == {addr}  # regs.ip is the probe address, not the slot
    assert names[OPEN_TARGET.encode()] >= 200, (names.most_common(8), faults)
    assert kp.nhit == sum(names.values()) + faults


def test_hot_site_reads_no_register_unless_asked(vm: VM) -> None:
    """A hot site gets a watchpoint of its own: its stop names it, so a counting handler
    costs no register read; pt_regs kept past the hit refuse to read a running vCPU."""
    kept: list[PtRegs] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        if not kept:
            kept.append(regs)

    kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=pre)
    vm.register_kprobe(kp)
    channel = vm.kprobes.channel
    assert isinstance(channel, WatchpointChannel)
    stats = channel.stats
    try:
        promoted = stats.promoted
        open_workload(vm, 30)
        assert stats.promoted == promoted + 1
        assert kp.addr is not None
        site = vm.kprobes.site_of(kp)
        assert site.pre_watch is not None and channel.hot.sites[site.pre_watch] is site
        hits, regs_ns = stats.hits, stats.regs_ns
        open_workload(vm, 100)
        assert stats.hits - hits >= 100
        assert stats.regs_ns == regs_ns, "registers were read for handlers that read none"
    finally:
        vm.unregister_kprobe(kp)
    assert kp.nhit >= 130
    assert not channel.hot.sites
    with pytest.raises(KprobeError, match="finished hit"):
        _ = kept[0].di


# -- 2. instruction classes mid-function ---------------------------------------------------

CLASS_FUNCTIONS = ["do_sys_openat2", "getname", "getname_flags.part.0", "do_filp_open"]
"""Hot on every open and together holding every class (6.1 cloud kernel): push/pop/call/
jcc/ret in getname, its jmp to getname_flags.part.0, whose ``mov names_cachep(%rip),%rdi``
is the RIP-relative load, and ``or $0x40,%edx``/``add $0x68,%rdx`` in do_filp_open."""
REQUIRED_CLASSES = {"rip_load", "call", "jcc", "jmp", "ret", "push", "pop", "alu"}

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.detail = True


def _register_table() -> dict[str, tuple[str, int]]:
    """capstone register name -> (pt_regs name, width in bytes)."""
    table: dict[str, tuple[str, int]] = {}
    legacy = {"ax": "a", "cx": "c", "dx": "d", "bx": "b"}
    for pt, letter in legacy.items():
        table["r" + pt] = (pt, 8)
        table["e" + pt] = (pt, 4)
        table[pt] = (pt, 2)
        table[letter + "l"] = (pt, 1)
    for pt in ("sp", "bp", "si", "di"):
        table["r" + pt] = (pt, 8)
        table["e" + pt] = (pt, 4)
        table[pt] = (pt, 2)
        table[pt + "l"] = (pt, 1)
    for n in range(8, 16):
        table[f"r{n}"] = (f"r{n}", 8)
        table[f"r{n}d"] = (f"r{n}", 4)
        table[f"r{n}w"] = (f"r{n}", 2)
        table[f"r{n}b"] = (f"r{n}", 1)
    return table


REGS = _register_table()


def merge(old: int, value: int, width: int) -> int:
    """A register after writing ``value`` to its low ``width`` bytes (x86-64 rules: a
    32-bit write zero-extends, 8- and 16-bit writes keep the upper bits)."""
    if width == 8:
        return value & MASK64
    if width == 4:
        return value & 0xFFFFFFFF
    mask = (1 << (8 * width)) - 1
    return (old & ~mask & MASK64) | (value & mask)


@dataclass(frozen=True)
class Expect:
    """What one probed instruction is, for the post-state check."""

    insn: Insn
    cls: str  # one of REQUIRED_CLASSES, or "other"
    dst: tuple[str, int] | None = None  # register written (pt_regs name, width)
    src: tuple[str, int] | None = None  # register read (push)
    imm: int | None = None
    mem: capstone.x86.X86OpMem | None = None
    op: str = ""


def classify(insn: Insn) -> Expect:
    cs = next(_CS.disasm(insn.bytes, insn.addr))
    ops = list(cs.operands)
    kind = insn.kind
    if kind is InsnKind.CALL_REL:
        return Expect(insn, "call")
    if kind is InsnKind.JMP_REL:
        return Expect(insn, "jmp")
    if kind is InsnKind.JCC_REL:
        return Expect(insn, "jcc")
    if kind is InsnKind.RET:
        return Expect(insn, "ret")
    if kind is not InsnKind.PLAIN:
        return Expect(insn, "other")
    name = cs.mnemonic
    if name == "push" and len(ops) == 1:
        if ops[0].type == csx86.X86_OP_REG and cs.reg_name(ops[0].reg) in REGS:
            return Expect(insn, "push", src=REGS[cs.reg_name(ops[0].reg)])
        if ops[0].type == csx86.X86_OP_IMM:
            return Expect(insn, "push", imm=int(ops[0].imm))
    if name == "pop" and len(ops) == 1 and ops[0].type == csx86.X86_OP_REG:
        return Expect(insn, "pop", dst=REGS[cs.reg_name(ops[0].reg)])
    if len(ops) == 2 and ops[0].type == csx86.X86_OP_REG and cs.reg_name(ops[0].reg) in REGS:
        dst = REGS[cs.reg_name(ops[0].reg)]
        if name == "mov" and ops[1].type == csx86.X86_OP_MEM and dst[1] in (4, 8):
            rip = ops[1].mem.base == csx86.X86_REG_RIP
            return Expect(insn, "rip_load" if rip else "load", dst=dst, mem=ops[1].mem)
        if name in ("add", "sub", "and", "or", "xor") and ops[1].type == csx86.X86_OP_IMM:
            return Expect(insn, "alu", dst=dst, imm=int(ops[1].imm), op=name)
    return Expect(insn, "other")


def effective_address(e: Expect, pre: dict[str, int]) -> int:
    """The load's address from the registers before the instruction (capstone operand)."""
    assert e.mem is not None
    mem = e.mem
    addr = int(mem.disp)
    if mem.base == csx86.X86_REG_RIP:
        addr += e.insn.next_addr  # the original address: the slot copy must match it
    elif mem.base != 0:
        reg, _ = REGS[_CS.reg_name(mem.base)]
        addr += pre[reg]
    if mem.index != 0:
        reg, _ = REGS[_CS.reg_name(mem.index)]
        addr += pre[reg] * mem.scale
    if mem.segment == csx86.X86_REG_GS:
        addr += pre["gs_base"]
    elif mem.segment == csx86.X86_REG_FS:
        addr += pre["fs_base"]
    return addr & MASK64


def alu(op: str, a: int, imm: int, width: int) -> int:
    mask = (1 << (8 * width)) - 1
    b = imm & mask
    a &= mask
    result = {"add": a + b, "sub": a - b, "and": a & b, "or": a | b, "xor": a ^ b}[op]
    return result & mask


@dataclass
class ClassCheck:
    """Pre/post handlers that check every post state against the pre state."""

    expects: dict[int, Expect]
    pending: dict[tuple[int, int], tuple[dict[str, int], int | None]]
    checked: Counter[str]
    failures: list[str]

    def pre(self, kp: Kprobe, regs: PtRegs) -> None:
        e = self.expects[regs.ip]
        stack_top = None
        if e.cls in ("pop", "ret"):
            assert regs.memory is not None
            stack_top = regs.memory.u64(regs.sp)
        self.pending[(regs.cpu, e.insn.addr)] = (regs.as_dict(), stack_top)

    def post(self, kp: Kprobe, regs: PtRegs) -> None:
        assert kp.addr is not None
        e = self.expects[kp.addr]
        state = self.pending.pop((regs.cpu, e.insn.addr), None)
        if state is None:
            self.failures.append(f"{e.insn}: post stop without a pre stop on cpu {regs.cpu}")
            return
        pre, stack_top = state
        try:
            problem = self.check(e, pre, stack_top, regs)
        except Exception as exc:  # report, do not let the engine swallow it
            problem = f"check raised {exc!r}"
        if problem:
            self.failures.append(f"{e.insn}: {problem}")
        else:
            self.checked[e.cls] += 1

    @staticmethod
    def check(e: Expect, pre: dict[str, int], stack_top: int | None, post: PtRegs) -> str:
        insn = e.insn
        mem = post.memory
        assert mem is not None
        sp0 = pre["sp"]
        if e.cls == "call":
            if (post.ip, post.sp) != (insn.target, sp0 - 8) or mem.u64(post.sp) != insn.next_addr:
                return f"call: ip={post.ip:#x} sp={post.sp:#x} [sp]={mem.u64(post.sp):#x}"
            return ""
        if e.cls == "jmp":
            return "" if (post.ip, post.sp) == (insn.target, sp0) else f"jmp: ip={post.ip:#x}"
        if e.cls == "jcc":
            assert insn.cc is not None
            taken = condition_holds(insn.cc, pre["flags"])
            want = insn.target if taken else insn.next_addr
            return "" if post.ip == want else f"jcc: ip={post.ip:#x}, want {want:#x}"
        if e.cls == "ret":
            if (post.ip, post.sp) != (stack_top, sp0 + 8):
                return f"ret: ip={post.ip:#x} sp={post.sp:#x}, want {stack_top:#x}"
            return ""
        # plain instructions: the next one follows, and the effect is checked per class
        if post.ip != insn.next_addr:
            return f"ip={post.ip:#x}, want {insn.next_addr:#x}"
        if e.cls == "push":
            value = pre[e.src[0]] if e.src is not None else (e.imm or 0) & MASK64
            if post.sp != sp0 - 8 or mem.u64(post.sp) != value:
                return f"push: sp={post.sp:#x} [sp]={mem.u64(post.sp):#x} want {value:#x}"
        elif e.cls == "pop":
            assert e.dst is not None
            if post.sp != sp0 + 8 or post[e.dst[0]] != stack_top:
                return f"pop: sp={post.sp:#x} {e.dst[0]}={post[e.dst[0]]:#x}"
        elif e.cls in ("rip_load", "load"):
            assert e.dst is not None
            reg, width = e.dst
            addr = effective_address(e, pre)
            want = merge(pre[reg], mem.u64(addr) if width == 8 else mem.u32(addr), width)
            if post[reg] != want:
                return f"load from {addr:#x}: {reg}={post[reg]:#x}, want {want:#x}"
        elif e.cls == "alu":
            assert e.dst is not None and e.imm is not None
            reg, width = e.dst
            want = merge(pre[reg], alu(e.op, pre[reg], e.imm, width), width)
            if post[reg] != want:
                return f"{e.op}: {reg}={post[reg]:#x}, want {want:#x}"
        return ""


def test_instruction_classes_post_state(vm: VM) -> None:
    """A pre+post probe on every instruction of four hot functions; each post state is
    checked against the pre state of the same hit, per instruction class."""
    before = text_digest(vm, CLASS_FUNCTIONS)
    expects: dict[int, Expect] = {}
    for name in CLASS_FUNCTIONS:
        for insn in function_insns(vm, name):
            expects[insn.addr] = classify(insn)
    checker = ClassCheck(expects, {}, Counter(), [])
    kps = [
        Kprobe(addr=a, pre_handler=checker.pre, post_handler=checker.post) for a in expects
    ]
    placed, refused = register_all(vm, kps)
    try:
        # int3 padding (EOPNOTSUPP) and the ftrace NOPs/alternatives (EBUSY) only
        assert set(refused) <= {"EOPNOTSUPP", "EBUSY"}, refused
        assert len(placed) > 0.8 * len(kps), (len(placed), refused)
        open_workload(vm, 20, content="kpt-classes")
        result = vm.run("cat /proc/version; ls /etc | sort | head -3", check=True)
        assert result.stdout.startswith("Linux version 6."), result
    finally:
        unregister_all(vm, placed)
    assert text_digest(vm, CLASS_FUNCTIONS) == before
    assert not checker.failures, "\n".join(checker.failures[:20])
    hit_classes = {expects[kp.addr].cls for kp in placed if kp.nhit and kp.addr is not None}
    assert hit_classes >= REQUIRED_CLASSES, REQUIRED_CLASSES - hit_classes
    assert set(checker.checked) >= REQUIRED_CLASSES, checker.checked
    assert sum(kp.nerrors for kp in placed) == 0, [kp.errors for kp in placed if kp.errors]
    # every stop was paired: no pre left without its post
    assert not checker.pending, list(checker.pending)[:5]


# -- 3. a handler changes what the guest sees ----------------------------------------------


def test_handler_overrides_getpid(vm: VM) -> None:
    """Skip getpid's body and return 4242 (the kernel's override convention): ash's $$
    comes from getpid(), so the guest prints 4242; after unregistering, a real pid."""
    calls = 0

    def override(kp: Kprobe, regs: PtRegs) -> bool:
        nonlocal calls
        calls += 1
        assert regs.memory is not None
        regs.ax = 4242
        regs.ip = regs.memory.u64(regs.sp)  # return to the caller...
        regs.sp += 8  # ...popping the return address, as `ret` would
        return True  # regs.ip changed: do not run the probed instruction

    kp = Kprobe(symbol_name="__x64_sys_getpid", pre_handler=override)
    vm.register_kprobe(kp)
    try:
        overridden = vm.run("sh -c 'echo $$'", check=True).stdout
    finally:
        vm.unregister_kprobe(kp)
    assert overridden == "4242\n"
    assert kp.nhit >= 1 and calls == kp.nhit
    real = vm.run("sh -c 'echo $$'", check=True).stdout.strip()
    assert real.isdigit() and int(real) not in (0, 4242)


# -- 4. aggregate probes -------------------------------------------------------------------


def test_aggregate_probes(vm: VM) -> None:
    """Two probes at one address: one int3, both handlers on every hit, in order."""
    addr = vm.symbols["do_sys_openat2"]
    place = vm.kprobes.int3_place(addr)  # past the ftrace NOP
    original = vm.read(place, 1)
    order: list[str] = []

    def recorder(tag: str) -> Callable[[Kprobe, PtRegs], None]:
        def pre(kp: Kprobe, regs: PtRegs) -> None:
            if regs.ip == addr:
                order.append(tag)

        return pre

    first = Kprobe(symbol_name="do_sys_openat2", pre_handler=recorder("first"))
    second = Kprobe(addr=addr, pre_handler=recorder("second"))
    vm.register_kprobe(first)
    vm.register_kprobe(second)
    try:
        assert len(vm.kprobes.table) == 1 and vm.read(place, 1) in ARMED
        open_workload(vm, 30)
        assert first.nhit == second.nhit >= 30
        assert order == ["first", "second"] * first.nhit
        # a third probe with a post_handler joins the aggregate: the slot gains a post stop
        posts: list[int] = []
        third = Kprobe(addr=addr, post_handler=lambda kp, regs: posts.append(regs.ip))
        vm.register_kprobe(third)
        hits_before = first.nhit
        open_workload(vm, 10)
        assert third.nhit == first.nhit - hits_before >= 10
        assert set(posts) == {addr + 5} and len(posts) == third.nhit  # after the 5-byte NOP
        vm.unregister_kprobe(third)
        vm.unregister_kprobe(first)
        assert vm.read(place, 1) in ARMED  # the second still needs it
        order.clear()
        hits_first, hits_second = first.nhit, second.nhit
        open_workload(vm, 20)
        assert first.nhit == hits_first
        assert second.nhit - hits_second >= 20
        assert order == ["second"] * (second.nhit - hits_second)
    finally:
        for kp in (first, second):
            if kp.registered:
                vm.unregister_kprobe(kp)
    assert vm.read(place, 1) == original


# -- 5. enable/disable, arm/disarm, get_kprobe, list ------------------------------------------

# report_probe(): "ADDR  k  SYM+0xOFF  MOD " then the flags (MOD a blank in the kernel)
LIST_LINE = re.compile(
    r"^([0-9a-f]{16})  k  (\S+)\+0x([0-9a-f]+)    (\[DISABLED\])?(?:\[OPTIMIZED\])?(\[FTRACE\])?$"
)


def test_disable_enable_kprobe(vm: VM) -> None:
    addr = vm.kprobes.int3_place(vm.symbols["do_sys_openat2"])
    original = vm.read(addr, 1)
    assert original != INT3
    kp = Kprobe(symbol_name="do_sys_openat2")
    vm.register_kprobe(kp)
    try:
        assert vm.read(addr, 1) in ARMED
        open_workload(vm, 10)
        hits = kp.nhit
        assert hits >= 10
        vm.disable_kprobe(kp)
        assert vm.read(addr, 1) == original  # the only probe here: the int3 is gone
        assert vm.list_kprobes().endswith("    [DISABLED][FTRACE]\n")
        open_workload(vm, 10)
        assert kp.nhit == hits
        vm.enable_kprobe(kp)
        assert vm.read(addr, 1) in ARMED
        open_workload(vm, 10)
        assert kp.nhit >= hits + 10
    finally:
        vm.unregister_kprobe(kp)
    assert vm.read(addr, 1) == original


def test_disabled_member_of_aggregate_gets_no_hits(vm: VM) -> None:
    addr = vm.symbols["do_sys_openat2"]
    on, off = Kprobe(addr=addr), Kprobe(addr=addr)
    place = vm.kprobes.int3_place(addr)
    vm.register_kprobe(on)
    vm.register_kprobe(off)
    try:
        vm.disable_kprobe(off)
        assert vm.read(place, 1) in ARMED  # still armed for the enabled one
        open_workload(vm, 10)
        assert on.nhit >= 10 and off.nhit == 0
    finally:
        vm.unregister_kprobe(on)
        vm.unregister_kprobe(off)


def test_arm_disarm_all(vm: VM) -> None:
    names = ["do_sys_openat2", "getname"]
    int3_at = {n: vm.kprobes.int3_place(vm.symbols[n]) for n in [*names, "do_filp_open"]}
    originals = {n: vm.read(int3_at[n], 1) for n in names}
    kps = [Kprobe(symbol_name=n) for n in names]
    extra = Kprobe(symbol_name="do_filp_open")
    for kp in [*kps, extra]:
        vm.register_kprobe(kp)
    try:
        vm.disable_kprobe(extra)
        open_workload(vm, 10)
        assert all(kp.nhit >= 10 for kp in kps)
        hits = [kp.nhit for kp in kps]
        vm.disarm_all_kprobes()
        assert {n: vm.read(int3_at[n], 1) for n in names} == originals
        assert all(kp.registered for kp in kps)
        open_workload(vm, 10)
        assert [kp.nhit for kp in kps] == hits
        vm.enable_kprobe(extra)  # enabling while all are disarmed does not arm
        assert vm.read(int3_at["do_filp_open"], 1) not in ARMED
        vm.disable_kprobe(extra)
        vm.arm_all_kprobes()
        assert all(vm.read(int3_at[n], 1) in ARMED for n in names)
        assert vm.read(int3_at["do_filp_open"], 1) not in ARMED  # disabled stays disarmed
        open_workload(vm, 10)
        assert all(kp.nhit >= h + 10 for kp, h in zip(kps, hits, strict=True))
        assert extra.nhit == 0
    finally:
        unregister_all(vm, [*kps, extra])
    assert {n: vm.read(int3_at[n], 1) for n in names} == originals


def test_get_kprobe_and_list_kprobes(vm: VM) -> None:
    base = vm.symbols["do_sys_openat2"]
    second_insn = function_insns(vm, "do_sys_openat2")[1].addr
    at_entry = Kprobe(symbol_name="do_sys_openat2")
    inside = Kprobe(symbol_name="do_sys_openat2", offset=second_insn - base)
    other = Kprobe(symbol_name="getname")
    for kp in (at_entry, inside, other):
        vm.register_kprobe(kp)
    try:
        assert vm.get_kprobe(base) is at_entry
        assert vm.get_kprobe(second_insn) is inside
        assert vm.get_kprobe(vm.symbols["getname"]) is other
        assert vm.get_kprobe(base + 1) is None
        vm.disable_kprobe(other)
        lines = vm.list_kprobes().splitlines()
        parsed = [LIST_LINE.match(line) for line in lines]
        assert all(parsed), lines
        rows = [(int(m[1], 16), m[2], int(m[3], 16), bool(m[4]), bool(m[5]))
                for m in parsed if m]  # fmt: skip
        assert sorted(rows) == sorted([
            (base, "do_sys_openat2", 0, False, True),
            (second_insn, "do_sys_openat2", second_insn - base, False, False),
            (vm.symbols["getname"], "getname", 0, True, True),
        ])  # fmt: skip
        assert lines[0].startswith(f"{base:016x}  k  do_sys_openat2+0x0")
    finally:
        unregister_all(vm, [at_entry, inside, other])
    assert vm.list_kprobes() == ""
    assert vm.get_kprobe(base) is None


# -- 6. handlers that raise ------------------------------------------------------------------


def test_raising_handlers_are_counted(vm: VM) -> None:
    def bad_pre(kp: Kprobe, regs: PtRegs) -> None:
        raise ValueError(f"pre at {regs.ip:#x}")

    def bad_post(kp: Kprobe, regs: PtRegs) -> None:
        raise RuntimeError("post")

    pre_raiser = Kprobe(symbol_name="do_sys_openat2", pre_handler=bad_pre)
    post_raiser = Kprobe(symbol_name="getname", post_handler=bad_post)
    vm.register_kprobe(pre_raiser)
    vm.register_kprobe(post_raiser)
    errors_before = vm.kprobes.handler_errors
    try:
        open_workload(vm, 20)
        assert pre_raiser.nhit >= 20 and pre_raiser.nerrors == pre_raiser.nhit
        assert post_raiser.nhit >= 20 and post_raiser.nerrors == post_raiser.nhit
        assert pre_raiser.errors and pre_raiser.errors[-1].startswith("ValueError: pre at 0x")
        assert post_raiser.errors[-1] == "RuntimeError: post"
        assert vm.kprobes.handler_errors - errors_before == (
            pre_raiser.nerrors + post_raiser.nerrors
        )
        # the engine goes on: a later probe works next to the raising ones
        good = Kprobe(symbol_name="do_filp_open")
        vm.register_kprobe(good)
        open_workload(vm, 10)
        assert good.nhit >= 10 and good.nerrors == 0
        vm.unregister_kprobe(good)
    finally:
        unregister_all(vm, [pre_raiser, post_raiser])
    assert vm.run("echo alive", check=True).stdout == "alive\n"


# -- 7. refusals -----------------------------------------------------------------------------


def refused(vm: VM, kp: Kprobe, watch: tuple[int, int] | None) -> ProbeRefused:
    """Register ``kp`` expecting a refusal; check the watched bytes did not change."""
    before = vm.read(*watch) if watch else b""
    with pytest.raises(ProbeRefused) as info:
        vm.register_kprobe(kp)
    assert not kp.registered
    assert not vm.kprobes.table
    if watch:
        assert vm.read(*watch) == before
    return info.value


def test_refuse_unknown_symbol(vm: VM) -> None:
    exc = refused(vm, Kprobe(symbol_name="kpt_no_such_function"), None)
    assert exc.code == "BAD_PROBE_ADDR"


def test_refuse_off_boundary(vm: VM) -> None:
    start, size = function_range(vm, "do_sys_openat2")
    exc = refused(vm, Kprobe(symbol_name="do_sys_openat2", offset=1), (start, size))
    assert exc.code == "BAD_INSN_BNDRY"
    # and in the middle of a longer instruction further in
    long_insn = next(i for i in function_insns(vm, "do_sys_openat2")[1:] if i.length >= 4)
    exc = refused(vm, Kprobe(addr=long_insn.addr + 2), (start, size))
    assert exc.code == "BAD_INSN_BNDRY"


def test_refuse_data_symbol(vm: VM) -> None:
    """``jiffies`` is data (it ticks, so its bytes are not compared; the table stays empty)."""
    exc = refused(vm, Kprobe(symbol_name="jiffies"), None)
    assert exc.code == "BAD_PROBE_ADDR"


@pytest.mark.parametrize(
    "name",
    [
        "do_int3",  # NOKPROBE_SYMBOL
        "exc_int3",  # .noinstr.text
        "asm_exc_int3",  # .entry.text: the #BP vector itself
        "entry_SYSCALL_64",  # .entry.text
        "nmi_handle",  # NOKPROBE_SYMBOL
    ],
)
def test_refuse_blacklisted(vm: VM, name: str) -> None:
    addr = vm.symbols[name]
    entry = vm.kprobe_blacklist.within_kprobe_blacklist(addr)
    assert entry is not None, f"{name} is not in vm.kprobe_blacklist"
    assert entry.format_debugfs() in vm.blacklist().splitlines()
    exc = refused(vm, Kprobe(symbol_name=name), function_range(vm, name))
    assert exc.code == "EINVAL" and "blacklisted" in str(exc)


def _patch_site_in_function(vm: VM, reason: str) -> int:
    """A site of ``reason`` at an instruction boundary of an ordinary probe-able function."""
    for site in vm.patch_sites.sites:
        if site.reason != reason:
            continue
        sym = vm.symbols.lookup(site.start)
        if sym is None or sym.type not in "tT" or sym.address == site.start or sym.size > 4096:
            continue
        if vm.kprobe_blacklist.within_kprobe_blacklist(site.start) is not None:
            continue
        code = vm.read(sym.address, sym.size)
        try:
            starts = x86insn.boundaries(code, sym.address)
        except ProbeRefused:
            continue
        if site.start in starts:
            return site.start
    raise AssertionError(f"no {reason} site in an ordinary function")


@pytest.mark.parametrize("reason", ["jump label", "exception table", "alternative"])
def test_refuse_patch_site(vm: VM, reason: str) -> None:
    addr = _patch_site_in_function(vm, reason)
    exc = refused(vm, Kprobe(addr=addr), (addr, 16))
    assert exc.code == "EBUSY" and reason in str(exc)


def test_refuse_int3_padding(vm: VM) -> None:
    pad = next(i for i in function_insns(vm, "getname_flags") if i.bytes == INT3)
    exc = refused(vm, Kprobe(addr=pad.addr), (pad.addr, 1))
    assert exc.code == "EOPNOTSUPP"


def test_refuse_symbol_and_addr(vm: VM) -> None:
    addr = vm.symbols["do_sys_openat2"]
    exc = refused(vm, Kprobe(symbol_name="do_sys_openat2", addr=addr), (addr, 16))
    assert exc.code == "EINVAL"


def test_refuse_double_registration(vm: VM) -> None:
    addr = vm.symbols["do_sys_openat2"]
    kp = Kprobe(symbol_name="do_sys_openat2")
    vm.register_kprobe(kp)
    try:
        armed = vm.read(addr, 16)
        with pytest.raises(KprobeError, match="already registered"):
            vm.register_kprobe(kp)
        assert vm.read(addr, 16) == armed
        assert len(vm.kprobes.site_of(kp).probes) == 1
        open_workload(vm, 5)
        assert kp.nhit >= 5
    finally:
        vm.unregister_kprobe(kp)


# -- 8. the guest as we found it -------------------------------------------------------------

RESTORE_FUNCTIONS = ["do_sys_openat2", "getname", "do_filp_open", "__do_sys_getpid"]


def test_close_restores_text_and_idt_then_reinstalls(vm: VM) -> None:
    """Register, hit, unregister, close: text hashes and IDT gate 3 as before; then again."""
    vm.kprobes.close()  # start without our channel, whatever ran before
    gate_addr = vm.symbols["idt_table"] + 3 * 16
    gate = vm.read(gate_addr, 16)
    assert decode_idt_gate(gate) == vm.symbols["asm_exc_int3"]
    before = text_digest(vm, RESTORE_FUNCTIONS)
    for _round in range(2):
        kps = [Kprobe(symbol_name=n) for n in RESTORE_FUNCTIONS]
        kps += [Kprobe(addr=function_insns(vm, n)[2].addr) for n in RESTORE_FUNCTIONS]
        for kp in kps:
            vm.register_kprobe(kp)
        assert vm.trap_channel == "watchpoint"
        stub = decode_idt_gate(vm.read(gate_addr, 16))
        assert stub != decode_idt_gate(gate)
        stub_sym = vm.symbols.lookup(stub)
        assert stub_sym is None or not stub_sym.is_text  # not kernel text: our slot page
        assert text_digest(vm, RESTORE_FUNCTIONS) != before
        open_workload(vm, 10)
        assert vm.run("sh -c 'echo $$'", check=True).stdout.strip().isdigit()
        assert all(kp.nhit >= 1 for kp in kps), [(kp.where(), kp.nhit) for kp in kps]
        unregister_all(vm, kps)
        assert text_digest(vm, RESTORE_FUNCTIONS) == before
        vm.kprobes.close()
        assert vm.trap_channel == "none"
        assert vm.read(gate_addr, 16) == gate
        with pytest.raises(GuestFaultError):
            vm.read(stub, 1)  # the slot area is unmapped
        hits = [kp.nhit for kp in kps]
        open_workload(vm, 10)
        assert [kp.nhit for kp in kps] == hits


def test_batch_registration_as_the_first_one(vm: VM) -> None:
    """register_kprobes() with no channel yet: the engine starts once the batch is placed."""
    vm.kprobes.close()  # no channel, no trap thread
    names = ["do_sys_openat2", "getname"]
    kps = [Kprobe(symbol_name=n, pre_handler=lambda kp, regs: None) for n in names]
    vm.register_kprobes(kps)
    try:
        vm.run("cat /proc/version >/dev/null", check=True)
        assert all(kp.nhit > 0 for kp in kps), [kp.nhit for kp in kps]
    finally:
        vm.unregister_kprobes(kps)


def test_breakpoint_fallback_channel(vm: VM) -> None:
    """The #BP-vector breakpoint channel: a stepped instruction and an emulated call, with
    pre and post handlers, and the text and IDT left as they were."""
    vm.kprobes.close()
    func = vm.symbols.symbol("do_sys_openat2")
    before = vm.read(func.address, func.size)
    gate = vm.read(vm.symbols["idt_table"] + 48, 16)
    call = next(
        i
        for a in x86insn.boundaries(before, func.address)
        if (i := x86insn.decode(before[a - func.address :], a)).kind is x86insn.InsnKind.CALL_REL
    )
    seen: list[tuple[str, int, int]] = []
    entry = Kprobe(
        symbol_name="do_sys_openat2",
        pre_handler=lambda kp, r: seen.append(("pre", r.ip, r.sp)),
        post_handler=lambda kp, r: seen.append(("post", r.ip, r.sp)),
    )
    at_call = Kprobe(
        addr=call.addr,
        pre_handler=lambda kp, r: seen.append(("call-pre", r.ip, r.sp)),
        post_handler=lambda kp, r: seen.append(("call-post", r.ip, r.sp)),
    )
    vm.use_trap_channel("breakpoint")
    try:
        vm.register_kprobes([entry, at_call])
        assert vm.trap_channel == "breakpoint"
        vm.run("read x </proc/version", check=True)
        vm.unregister_kprobes([entry, at_call])
        vm.kprobes.close()
    finally:
        vm.use_trap_channel("watchpoint")
    assert entry.nhit >= 1 and at_call.nhit >= 1
    pre = next(s for s in seen if s[0] == "pre")
    post = next(s for s in seen if s[0] == "post")
    assert pre[1] == func.address and post[1] == func.address + 5 and post[2] == pre[2]
    cpre = next(s for s in seen if s[0] == "call-pre")
    cpost = next(s for s in seen if s[0] == "call-post")
    assert cpre[1] == call.addr and cpost[1] == call.target and cpost[2] == cpre[2] - 8
    assert vm.read(func.address, func.size) == before
    assert vm.read(vm.symbols["idt_table"] + 48, 16) == gate


def test_freed_slots_are_collected_and_reused(vm: VM) -> None:
    """More register/unregister cycles than a slot page holds: garbage collection gives
    the dirty slots back (the idle guest passes its quiescent states), no page is added,
    and probes on reused slots still work."""
    kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
    vm.register_kprobe(kp)  # the channel is installed now
    vm.unregister_kprobe(kp)
    channel = vm.kprobes.channel
    assert isinstance(channel, WatchpointChannel) and channel.slots is not None
    slots = channel.slots
    pages_before = slots.stats()["pages"]
    for _ in range(40):  # 32 slots of 128 bytes in a page
        kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
        vm.register_kprobe(kp)
        vm.unregister_kprobe(kp)
        time.sleep(0.06)  # past the minimum age
    assert slots.stats()["pages"] == pages_before
    kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=lambda kp, regs: None)
    vm.register_kprobe(kp)
    try:
        vm.run("read x </proc/version", check=True)
        assert kp.nhit >= 1
    finally:
        vm.unregister_kprobe(kp)


# -- probes without handlers: counted in the guest, no stop ----------------------------------

HOT_FUNCTIONS = ["do_sys_openat2", "vfs_read", "kmem_cache_alloc", "kmem_cache_free",
                 "path_openat", "ksys_read"]


def test_handler_less_probes_are_counted_without_a_stop(vm: VM) -> None:
    """The first 40 instructions of six hot functions, no handlers: the guest counts every
    hit itself (no VM stop at all), and nhit is exact against a stopping probe's count."""
    insns = {name: function_insns(vm, name)[:40] for name in HOT_FUNCTIONS}
    second = insns["do_sys_openat2"][1].addr
    counted = [Kprobe(addr=insn.addr) for name in HOT_FUNCTIONS for insn in insns[name][1:]
               if insn.addr != second]
    entry = Kprobe(symbol_name="do_sys_openat2")  # counted, at the entry
    calls: list[int] = []
    stopping = Kprobe(addr=second, pre_handler=lambda kp, regs: calls.append(regs.ip))
    channel = vm.kprobes.channel
    placed, _refused = register_all(vm, counted)
    try:
        vm.register_kprobe(entry)
        assert len(placed) > 150 and all(kp.counted for kp in [*placed, entry])
        stops_before = channel.stats.hits
        vm.run("for i in $(seq 100); do cat /etc/passwd >/dev/null;"
               " head -c 10 /proc/version >/dev/null; done", check=True, timeout=120)
        assert channel.stats.hits == stops_before  # nothing stopped the guest
        assert entry.nhit >= 300
    finally:
        unregister_all(vm, placed)
    # nhit is read live from the guest: against a probe with a handler at the next
    # instruction (run exactly once per call)
    try:
        vm.register_kprobe(stopping)
        before = entry.nhit
        open_workload(vm, 20)
        assert entry.nhit - before == len(calls) == stopping.nhit >= 20
    finally:
        vm.unregister_kprobe(stopping)
        vm.unregister_kprobe(entry)
    assert not entry.counted and entry.record is None  # as the user gave it
    assert entry.nhit - before == len(calls)  # the count survives unregistering


def test_a_probe_with_a_handler_turns_a_counted_site_into_a_stopping_one(vm: VM) -> None:
    counted = Kprobe(symbol_name="vfs_read")
    vm.register_kprobe(counted)
    try:
        open_workload(vm, 5)
        hits = counted.nhit
        assert counted.counted and hits > 0
        seen: list[int] = []
        handled = Kprobe(symbol_name="vfs_read", pre_handler=lambda kp, regs: seen.append(1))
        vm.register_kprobe(handled)
        try:
            # the guest's count is kept (the guest runs on: it may have grown meanwhile);
            # from the turn on both count every hit on the host
            kept = counted.nhit - handled.nhit
            assert not counted.counted and counted.registered and kept >= hits
            assert vm.list_kprobes().count("vfs_read+0x0") == 2
            open_workload(vm, 5)
            assert counted.nhit - handled.nhit == kept
            assert handled.nhit == len(seen) > 0
        finally:
            vm.unregister_kprobe(handled)
    finally:
        vm.unregister_kprobe(counted)
