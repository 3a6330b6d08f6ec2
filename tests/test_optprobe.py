"""Jump-optimized probes on the session guest: the jump after an ftrace NOP, the
registers a hit sees through it, the switch that turns optimization off and on, a probe
inside a jump taking it away, and the text as it was after each."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pytest

from kprobevm.guest.vm import VM
from kprobevm.kernel.patchsites import FTRACE_NOP
from kprobevm.kprobes.core import Kprobe, ProbeSite
from kprobevm.kprobes.optimizer import OPTIMIZE_BY_DEFAULT
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86 import asm
from kprobevm.x86 import insn as x86insn
from kprobevm.x86.ptregs import PtRegs

pytestmark = pytest.mark.vm

FUNC = "vfs_read"
DD = "dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null"
INT3, JMP = 0xCC, 0xE9


@pytest.fixture
def text(vm: VM) -> Iterator[bytes]:
    """vfs_read's first 64 bytes, checked the same after the test; the switch on for the
    test and back to its default after."""
    addr = vm.symbols[FUNC]
    before = vm.read(addr, 64)
    assert before.startswith(FTRACE_NOP)
    vm.kprobes.optimizer.enabled = True
    yield before
    vm.kprobes.optimizer.enabled = OPTIMIZE_BY_DEFAULT
    assert vm.read(addr, 64) == before
    assert vm.list_kprobes() == ""


def test_a_recorded_probe_jumps_to_its_slot_after_the_ftrace_nop(vm: VM, text: bytes) -> None:
    addr = vm.symbols[FUNC]
    seen: list[tuple[int, int, int]] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        seen.append((regs.ip, regs.dx, regs.flags))

    kp = Kprobe(symbol_name=FUNC, pre_handler=pre, record=RecordSpec())
    vm.register_kprobe(kp)
    try:
        vm.kprobes.optimizer.settle()  # the guest may hold the jump off a moment
        site = vm.kprobes.site_of(kp)
        assert site.optimized and site.addr == addr + 5, vm.kprobes.optimizer.why_not
        assert site.slot is not None and site.opt is not None
        now = vm.read(addr, 64)
        # the guest's NOP untouched, our jump after it, the rest as it was
        assert now[:5] == FTRACE_NOP
        # straight to the record program: the slot's entry would only jump there
        recorder = getattr(vm.kprobes.channel, "recorder", None)
        assert recorder is not None
        program = recorder.site_programs[site.addr].address
        assert now[5:10] == asm.jmp_rel32(addr + 5, program)
        assert vm.read(site.slot.address, 5) == asm.jmp_rel32(site.slot.address, program)
        assert now[10:] == text[10:]
        # listed as the kernel lists a probe on an ftrace site
        assert vm.list_kprobes() == f"{addr:016x}  k  {FUNC}+0x0    [FTRACE]\n"
        vm.run(DD.format(n=500), check=True)
        vm.flush_records()
    finally:
        vm.unregister_kprobe(kp)
    reads = [s for s in seen if s[1] == 1]  # dd's one-byte reads: count in %rdx
    assert len(reads) >= 500, len(seen)
    assert {ip for ip, _, _ in seen} == {addr}
    assert all(flags & 0x200 for _, _, flags in seen)  # interrupts on, as at the call


def test_the_switch_keeps_the_int3_and_gives_the_jump_back(vm: VM, text: bytes) -> None:
    addr = vm.symbols[FUNC]
    ips: list[int] = []
    kp = Kprobe(symbol_name=FUNC, pre_handler=lambda kp, regs: ips.append(regs.ip))
    optimizer = vm.kprobes.optimizer
    optimizer.enabled = False
    vm.register_kprobe(kp)
    try:
        site = vm.kprobes.site_of(kp)
        assert not site.optimized and vm.read(addr + 5, 1)[0] == INT3
        vm.run(DD.format(n=20), check=True)
        on_int3 = len(ips)
        assert on_int3 >= 20
        optimizer.enabled = True
        optimizer.settle()
        assert site.optimized and vm.read(addr + 5, 1)[0] == JMP
        vm.run(DD.format(n=20), check=True)
        assert len(ips) >= on_int3 + 20
        optimizer.enabled = False
        assert not site.optimized and vm.read(addr + 5, 5) == bytes([INT3]) + text[6:10]
        vm.run(DD.format(n=5), check=True)
    finally:
        vm.unregister_kprobe(kp)
    assert set(ips) == {addr}


def test_a_post_handler_takes_the_jump_away(vm: VM, text: bytes) -> None:
    addr = vm.symbols[FUNC]
    pre = Kprobe(addr=addr + 5, pre_handler=lambda kp, regs: None)
    posts: list[int] = []
    post = Kprobe(addr=addr + 5, post_handler=lambda kp, regs: posts.append(regs.ip))
    vm.register_kprobe(pre)
    try:
        vm.kprobes.optimizer.settle()
        site = vm.kprobes.site_of(pre)
        assert site.optimized
        vm.register_kprobe(post)
        assert not site.optimized and site.opt is None
        assert vm.read(addr + 5, 1)[0] == INT3
        assert "post_handler" in vm.kprobes.optimizer.why_not[site.addr]
        vm.run(DD.format(n=10), check=True)
        assert len(posts) >= 10 and set(posts) == {addr + 7}  # after `push %r15`
    finally:
        vm.unregister_kprobes([post, pre])


def test_a_probe_inside_a_jump_takes_it_away(vm: VM, text: bytes) -> None:
    addr = vm.symbols[FUNC]
    outer = Kprobe(symbol_name=FUNC)  # counted in the guest: its jump goes after the NOP
    vm.register_kprobe(outer)
    try:
        vm.kprobes.optimizer.settle()
        first = vm.kprobes.site_of(outer)
        assert first.optimized and first.opt is not None
        inner_at = first.opt.insns[1].addr
        inner = Kprobe(addr=inner_at)
        vm.register_kprobe(inner)
        try:
            vm.kprobes.optimizer.settle()
            second = vm.kprobes.site_of(inner)
            assert not first.optimized and first.opt is None
            assert vm.read(addr + 5, 1)[0] == INT3
            assert "inside its jump" in vm.kprobes.optimizer.why_not[first.addr]
            # the inner one's own jump may go in: the outer int3's slot comes back to it
            assert second.optimized, vm.kprobes.optimizer.why_not
            before = (outer.nhit, inner.nhit)
            vm.run(DD.format(n=50), check=True)
            assert outer.nhit - before[0] >= 50 and inner.nhit - before[1] >= 50
        finally:
            vm.unregister_kprobe(inner)
        vm.run(DD.format(n=10), check=True)
    finally:
        vm.unregister_kprobe(outer)


def test_jumps_by_default_and_none_with_no_optimize_on_the_command_line(
    vm: VM, text: bytes, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kprobevm import cli
    from kprobevm.trap.watchpoint import WatchpointChannel

    jumped: list[int] = []
    real = WatchpointChannel.optimize

    def optimize(channel: WatchpointChannel, site: ProbeSite) -> None:
        jumped.append(site.addr)
        real(channel, site)

    monkeypatch.setattr(WatchpointChannel, "optimize", optimize)
    monkeypatch.setattr(cli, "_guest", lambda args: contextlib.nullcontext(vm))
    # an idle second first: the optimizer may have to wait for the guest to be quiet
    argv = ["count", "--boot", FUNC, "--", f"sleep 1; {DD.format(n=10)}"]
    assert OPTIMIZE_BY_DEFAULT and cli.main(argv) == cli.EXIT_OK
    assert jumped == [vm.symbols[FUNC] + 5] and vm.kprobes.optimizer.enabled
    assert cli.main([argv[0], "--no-optimize", *argv[1:]]) == cli.EXIT_OK
    assert len(jumped) == 1 and not vm.kprobes.optimizer.enabled
    counts = [int(line.split(": ")[1]) for line in capsys.readouterr().out.splitlines()]
    assert len(counts) == 2 and min(counts) >= 10, counts


def test_the_benchmark_round_measures_each_way_on_its_own_path(vm: VM, text: bytes) -> None:
    """One small round of ``scripts/bench-optprobe``: every way hit once per read (its
    check refuses a probe on the wrong path), the optimizer's switch left as it was."""
    from kprobevm.bench.optprobe import WAYS, measure_round

    r = measure_round(vm, 200, index=1)
    assert set(r.hits) == set(WAYS)
    assert all(200 <= r.hits[w] < 400 for w in WAYS), r.hits
    assert all(r.unprobed[w].cpu_ns > 0 and r.unprobed[w].guest_ns > 0 for w in WAYS)
    assert vm.kprobes.optimizer.enabled


def test_no_jump_over_bytes_the_guests_own_kprobe_patched(vm: VM, text: bytes) -> None:
    """The guest kernel optimizes its own kprobes too, and takes their jumps out lazily:
    a jump of ours over bytes it has patched would copy its jump into our slot (and put
    it back at the end). Such a site keeps its int3 and says why."""
    addr = vm.symbols[FUNC]
    optimizer = vm.kprobes.optimizer
    second = x86insn.decode(text[5:20], addr + 5).next_addr
    tracing = "/sys/kernel/tracing"
    vm.run(f"echo 'p:kprobevm_own {FUNC}+{second - addr}' >> {tracing}/kprobe_events &&"
           f" echo 1 > {tracing}/events/kprobes/kprobevm_own/enable", check=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20  # the guest's optimizer runs some jiffies later
        while vm.read(second, 1)[0] != JMP and time.monotonic() < deadline:
            time.sleep(0.1)
        assert vm.read(second, 1)[0] == JMP, "the guest did not optimize its own kprobe"
        kp = Kprobe(symbol_name=FUNC, pre_handler=lambda kp, regs: None)
        vm.register_kprobe(kp)
        try:
            optimizer.settle()
            site = vm.kprobes.site_of(kp)
            assert not site.optimized, optimizer.why_not
            assert f"{second:#x}" in optimizer.why_not[site.addr], optimizer.why_not
            vm.run("head -c1 /etc/passwd >/dev/null")
            assert kp.nhit >= 1
        finally:
            vm.unregister_kprobe(kp)
    finally:
        vm.run(f"echo 0 > {tracing}/events/kprobes/kprobevm_own/enable;"
               f" echo '-:kprobevm_own' >> {tracing}/kprobe_events", check=True)  # fmt: skip
        deadline = time.monotonic() + 20  # its jump goes out lazily too
        while vm.read(addr, 64) != text and time.monotonic() < deadline:
            time.sleep(0.1)
