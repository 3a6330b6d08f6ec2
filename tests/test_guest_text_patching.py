"""Our probes side by side with the guest's own text patching: ftrace, static keys.

The guest's ftrace verifies the five NOP bytes at a function's entry before it patches
them; an int3 of ours there made its function tracer and its own kprobes fail, and ftrace
turn itself off until reboot. Probes on the NOP now put their int3 after it. Each test
here runs the guest's function tracer, tracefs kprobes or a tracepoint (a static key the
kernel flips by rewriting text, through int3s of its own) on the very function we probe,
and checks the guest's ``dmesg`` as well as its console (the image boots ``quiet``: an
ftrace WARNING never reaches the console).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import pytest

from kprobevm.errors import ProbeRefused
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.launcher import boot
from kprobevm.guest.vm import VM
from kprobevm.kernel.patchsites import FTRACE_NOP
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.x86.insn import boundaries
from kprobevm.x86.ptregs import PtRegs

pytestmark = pytest.mark.vm

T = "/sys/kernel/tracing"
FUNC = "do_sys_openat2"
OPENS = "for i in 1 2 3 4 5; do cat /etc/passwd > /dev/null; done"
FTRACE_TROUBLE = re.compile(r"ftrace failed|ftrace faulted|CORRUPTED|WARNING:|------------\[ cut")


@pytest.fixture(scope="module")
def guest() -> Iterator[VM]:
    """A guest of its own: a failed ftrace stays off until reboot."""
    with boot(smp=2, name="guest-ftrace") as vm:
        yield vm


@pytest.fixture(autouse=True)
def _ftrace_healthy(guest: VM) -> Iterator[None]:
    """Before and after each test: the guest's ftrace idle, its text as it was, and no
    ftrace complaint in dmesg or trouble on the console."""
    start = len(guest.serial_log())
    addr = guest.symbols[FUNC]
    before = guest.read(addr, 64)
    assert before.startswith(FTRACE_NOP)
    yield
    guest.run(f"echo nop > {T}/current_tracer; echo > {T}/set_ftrace_filter;"
              f" echo 0 > {T}/events/enable; echo > {T}/kprobe_events;"
              f" echo > {T}/trace")  # fmt: skip
    dmesg = guest.run("dmesg", check=True).stdout
    assert not FTRACE_TROUBLE.findall(dmesg), dmesg[-3000:]
    assert not kernel_trouble(guest.serial_log()[start:])
    assert guest.list_kprobes() == ""
    assert guest.read(addr, 64) == before


def _trace(guest: VM) -> str:
    return guest.run(f"cat {T}/trace", check=True).stdout


def test_the_guests_tracer_and_kprobes_work_on_the_function_we_probe(guest: VM) -> None:
    addr = guest.symbols[FUNC]
    seen: list[tuple[str, int, int, int]] = []

    def pre(kp: Kprobe, regs: PtRegs) -> None:
        seen.append(("pre", regs.ip, regs.di, regs.sp))

    def post(kp: Kprobe, regs: PtRegs) -> None:
        seen.append(("post", regs.ip, regs.di, regs.sp))

    kp = Kprobe(symbol_name=FUNC, pre_handler=pre, post_handler=post)
    guest.register_kprobe(kp)
    try:
        assert kp.ftrace and kp.addr == addr
        assert guest.read(addr, 5) == FTRACE_NOP  # the guest's bytes, untouched
        assert guest.list_kprobes() == f"{addr:016x}  k  {FUNC}+0x0    [FTRACE]\n"
        guest.run(OPENS, check=True)
        hits = kp.nhit
        assert hits >= 5
        # pre at the NOP's address, post just past it, nothing else changed by the NOP
        pairs = list(zip(seen[::2], seen[1::2], strict=True))
        assert all(p[0] == "pre" and q[0] == "post" for p, q in pairs), seen[:6]
        assert all(p[1] == addr and q[1] == addr + 5 for p, q in pairs), seen[:6]
        assert all(p[2:] == q[2:] for p, q in pairs), seen[:6]

        guest.run(f"echo {FUNC} > {T}/set_ftrace_filter; echo function > {T}/current_tracer",
                  check=True)  # fmt: skip
        assert guest.read(addr, 1) == b"\xe8"  # ftrace's call, in front of our int3
        guest.run(OPENS, check=True)
        trace = _trace(guest)  # before the nop tracer, which empties the buffer
        guest.run(f"echo nop > {T}/current_tracer", check=True)
        assert re.search(rf"cat-\d+ .* {FUNC} <-", trace), trace[-2000:]
        assert kp.nhit >= hits + 5
        hits = kp.nhit

        guest.run(f"echo > {T}/trace; echo 'p:kpvm/theirs {FUNC} dfd=%di:s32' >> "
                  f"{T}/kprobe_events; echo 1 > {T}/events/kpvm/theirs/enable",
                  check=True)  # fmt: skip
        guest.run(OPENS, check=True)
        guest.run(f"echo 0 > {T}/events/kpvm/theirs/enable", check=True)
        assert re.search(rf"cat-\d+ .* theirs: \({FUNC}\+0x0/0x[0-9a-f]+\) dfd=-100",
                         _trace(guest)), _trace(guest)[-2000:]  # fmt: skip
        assert kp.nhit >= hits + 5
    finally:
        guest.unregister_kprobe(kp)
    assert not kp.ftrace and kp.addr is None


def test_a_probe_goes_on_while_the_guests_ftrace_holds_the_site(guest: VM) -> None:
    addr = guest.symbols[FUNC]
    guest.run(f"echo {FUNC} > {T}/set_ftrace_filter; echo function > {T}/current_tracer",
              check=True)  # fmt: skip
    kp = Kprobe(symbol_name=FUNC, pre_handler=lambda kp, regs: None)
    guest.register_kprobe(kp)
    try:
        guest.run(OPENS, check=True)
        hits = kp.nhit
        assert hits >= 5
        guest.run(f"echo nop > {T}/current_tracer", check=True)  # the NOP comes back
        assert guest.read(addr, 5) == FTRACE_NOP
        guest.run(OPENS, check=True)
        assert kp.nhit >= hits + 5
    finally:
        guest.unregister_kprobe(kp)


def test_ftrace_site_and_the_next_instruction_probed_together(guest: VM) -> None:
    addr = guest.symbols[FUNC]
    order: list[str] = []
    after = Kprobe(addr=addr + 5, pre_handler=lambda kp, regs: order.append(f"+5 {regs.ip:#x}"))
    entry = Kprobe(symbol_name=FUNC, pre_handler=lambda kp, regs: order.append(f"+0 {regs.ip:#x}"))
    guest.register_kprobes([after, entry])
    try:
        assert entry.ftrace and not after.ftrace
        assert guest.get_kprobe(addr) is entry and guest.get_kprobe(addr + 5) is after
        assert guest.list_kprobes() == (f"{addr:016x}  k  {FUNC}+0x0    [FTRACE]\n"
                                        f"{addr + 5:016x}  k  {FUNC}+0x5    \n")  # fmt: skip
        guest.run("cat /etc/passwd > /dev/null", check=True)
        # ftrace's probe first, as ftrace runs before the int3 past its NOP is reached
        assert order and order[:2] == [f"+0 {addr:#x}", f"+5 {addr + 5:#x}"], order[:4]
        assert entry.nhit == after.nhit
    finally:
        guest.unregister_kprobes([after, entry])


def test_recorded_and_counted_probes_on_an_ftrace_site(guest: VM) -> None:
    addr = guest.symbols[FUNC]
    ips: list[int] = []
    recorded = Kprobe(symbol_name=FUNC, pre_handler=lambda kp, regs: ips.append(regs.ip),
                      record=RecordSpec())  # fmt: skip
    counted = Kprobe(symbol_name="vfs_read")
    guest.register_kprobes([recorded, counted])
    try:
        assert recorded.ftrace and counted.ftrace and counted.counted
        guest.run(f"{OPENS}; echo {FUNC} > {T}/set_ftrace_filter;"
                  f" echo function > {T}/current_tracer; {OPENS}", check=True)  # fmt: skip
        guest.flush_records()
        assert len(ips) >= 10 and set(ips) == {addr}
        assert counted.nhit >= 10
    finally:
        guest.unregister_kprobes([recorded, counted])


def test_an_ftrace_site_followed_by_patched_text_keeps_the_int3_on_the_nop(
    guest: VM, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the guest also rewrites the instruction after the NOP (a jump label), the
    int3 can only go on the NOP: said on stderr and kept in ``ftrace_held``."""
    sites = guest.patch_sites
    held = next((a for a in sorted(sites.ftrace) if sites.find(a + 5) is not None
                 and sites.reserved(a) is None
                 and guest.kprobe_blacklist.within_kprobe_blacklist(a) is None), None)  # fmt: skip
    assert held is not None, "no ftrace site followed by patched text in this kernel"
    kp = Kprobe(addr=held, pre_handler=lambda kp, regs: None)
    with caplog.at_level(logging.WARNING, logger="kprobevm.kprobes.core"):
        guest.register_kprobe(kp)
    try:
        assert not kp.ftrace
        assert "cannot patch this function while it is probed" in caplog.text
        assert held in guest.kprobes.ftrace_held
        assert guest.read(held, 1) == b"\xcc"
    finally:
        guest.unregister_kprobe(kp)


def test_tracepoint_static_keys_flip_around_our_probes(guest: VM) -> None:
    """Enabling a tracepoint rewrites its jump label in the function we probe (the kernel
    puts an int3 of its own there for the while): both go on working."""
    func = "kmem_cache_alloc"
    start, size = guest.symbols[func], guest.symbols.size(func)
    labels = [s for s in guest.patch_sites.sites
              if s.reason == "jump label" and start <= s.start < start + size]  # fmt: skip
    assert labels, f"no jump label in {func}"
    before = guest.read(start, size)
    # around each jump label: the instruction boundaries just before and just after it
    bounds = boundaries(before, start)
    near = sorted({a for s in labels for a in bounds
                   if s.start - 16 <= a < s.start or s.end <= a < s.end + 16})  # fmt: skip
    kps = [Kprobe(symbol_name=func), *(Kprobe(addr=a) for a in near)]
    placed = []
    for kp in kps:
        try:
            guest.register_kprobe(kp)
            placed.append(kp)
        except ProbeRefused:
            pass  # a lock prefix, an exception-table entry: the kernel refuses those too
    assert len(placed) >= 3, (near, placed)
    try:
        for _ in range(3):
            guest.run(f"echo 1 > {T}/events/kmem/kmem_cache_alloc/enable; {OPENS}", check=True)
            # the key flipped: a jump label of the function changed (our int3s read through)
            assert guest.kprobes.original_text(start, size) != before
            guest.run(f"echo 0 > {T}/events/kmem/kmem_cache_alloc/enable; {OPENS}", check=True)
        assert "kmem_cache_alloc: call_site=" in _trace(guest)
        assert placed[0].nhit >= 30
    finally:
        guest.unregister_kprobes(placed)
    assert guest.read(start, size) == before
