"""Kernel stack traces unwound on the host, against the guest kernel's own.

The guest's tracefs with ``options/stacktrace`` (and ``sym-offset``) is the oracle: the
same probes and workload run through it and through kprobevm (recorded and stopping),
and every line's stack must be the same, entry by entry. A timer interrupt's stacks
cross from the IRQ stack to the interrupted task's: those are compared where both
sides' interrupted context is the idle loop, and by their interrupt half otherwise.
The ORC decoder and the walk's rules are checked apart on made-up tables.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from kprobevm import cli
from kprobevm.guest.console import kernel_trouble
from kprobevm.guest.vm import VM
from kprobevm.kernel.orc import (
    END_FORMAT,
    ORC_REG_PREV_SP,
    ORC_REG_SP,
    ORC_REG_SP_INDIRECT,
    ORC_REG_UNDEFINED,
    SIGNAL_FORMAT,
    OrcTable,
    OrcType,
    banner_version,
    orc_format,
)
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.tracing import differential as diff
from kprobevm.tracing.format import EventHit
from kprobevm.x86.ptregs import PtRegs
from kprobevm.x86.unwind_orc import PT_REGS, KernelStack, unwind

# --- the ORC format and the walk, on made-up tables ---------------------------------------

TEXT = 0xFFFFFFFF81000000


def _entry(sp_reg: int, sp_offset: int, typ: int, *, bp_reg: int = ORC_REG_UNDEFINED,
           bp_offset: int = 0, end: bool = False) -> bytes:  # fmt: skip
    """A 5.12-6.3 ``struct orc_entry`` (type:2, end:1)."""
    bits = sp_reg | bp_reg << 4 | typ << 8 | int(end) << 10
    return struct.pack("<hhH", sp_offset, bp_offset, bits)


CALL, REGS = 0, 1


def _table(entries: list[tuple[int, bytes]]) -> OrcTable:
    ips = [ip for ip, _ in entries]
    return OrcTable(ips, b"".join(e for _, e in entries), END_FORMAT, (ips[0], ips[-1]))


def _reader(words: dict[int, int]) -> Callable[[int], int | None]:
    return words.get


def test_entry_layout_is_decided_by_the_kernel_version() -> None:
    assert orc_format(banner_version("Linux version 6.1.0-57-cloud-amd64 (x)")) is END_FORMAT
    assert orc_format((6, 12, 118)) is SIGNAL_FORMAT
    assert not orc_format((5, 10, 0)).indirect_offset_after
    # 6.4 on: type 2 is a call, 3 regs with the signal bit; before, 0 call, 1 regs
    call = SIGNAL_FORMAT.decode(8, 0, ORC_REG_SP | 2 << 8)
    regs = SIGNAL_FORMAT.decode(0, 0, ORC_REG_SP | 3 << 8 | 1 << 11)
    assert (call.type, call.signal, regs.type, regs.signal) == ("call", False, "regs", True)
    old = END_FORMAT.decode(*struct.unpack("<hhH", _entry(ORC_REG_SP, 0, REGS)))
    assert (old.type, old.signal) == (OrcType.REGS, True)
    end = END_FORMAT.decode(*struct.unpack("<hhH", _entry(ORC_REG_UNDEFINED, 0, 0, end=True)))
    assert end.type == OrcType.END_OF_STACK


def test_walk_through_calls_an_irq_stack_switch_and_an_entry_frame() -> None:
    # f: a call frame 16 bytes deep; g: switched to the IRQ stack, the old sp saved at its
    # top ([sp] + 8 is the CFA); h: the interrupt's pt_regs at sp, from user mode
    f, g, h = TEXT + 0x100, TEXT + 0x200, TEXT + 0x300
    table = _table([
        (f, _entry(ORC_REG_SP, 16, CALL, bp_reg=ORC_REG_PREV_SP, bp_offset=-16)),
        (g, _entry(ORC_REG_SP_INDIRECT, 8, CALL)),
        (h, _entry(ORC_REG_SP, 0, REGS)),
        (TEXT + 0x400, _entry(ORC_REG_UNDEFINED, 0, 0)),
    ])  # fmt: skip
    irq, task = 0xFFFFC90000003F00, 0xFFFFC90000012E00
    words = {
        irq: 0x1234,  # f's saved bp, at its CFA - 16
        irq + 8: g + 5,  # f's return address, below its CFA (irq + 16)
        irq + 16: task,  # g: the old sp saved at the IRQ stack's top
        task: h + 7,  # g's return address, below its CFA (task + 8)
        task + 8 + PT_REGS["ip"]: 0x401000,
        task + 8 + PT_REGS["sp"]: 0x7FFC0000,
        task + 8 + PT_REGS["cs"]: 0x33,
        task + 8 + PT_REGS["bp"]: 0,
    }
    regs = {"ip": f, "sp": irq, "bp": 0, "cs": 0x10}
    stack = unwind(regs, table, _reader(words), lambda a: TEXT <= a < TEXT + 0x1000, ip=f + 1)
    assert stack.entries == (f + 1, g + 5, h + 7) and stack.error is None


def test_walk_ends_with_the_reason_when_the_stack_cannot_be_read() -> None:
    f = TEXT + 0x100
    table = _table([(f, _entry(ORC_REG_SP, 8, CALL)), (TEXT + 0x200, _entry(0, 0, 0))])
    stack = unwind({"ip": f, "sp": 0x1000, "bp": 0}, table, _reader({}), lambda a: True)
    assert stack.entries == (f,) and "cannot read the return address" in (stack.error or "")
    # a frame whose caller sits lower on the same stack is bad data, not a walk
    loop = {0xFF8: f + 1}
    table = _table([(f, _entry(ORC_REG_SP, 0, CALL)), (TEXT + 0x200, _entry(0, 0, 0))])
    stack = unwind({"ip": f, "sp": 0x1000, "bp": 0}, table, _reader(loop), lambda a: True)
    assert "wrong direction" in (stack.error or "")


def test_trace_text_with_stacks_parses_back() -> None:
    hit = EventHit(
        event="o", group="kprobes", comm="cat", pid=7, cpu=0, timestamp_ns=1_000,
        where="do_sys_openat2+0x0/0x170", stack=("do_sys_openat2+0x1/0x170", "x+0x5/0x10"),
    )  # fmt: skip
    lines = hit.lines()
    assert lines[1].endswith("0.000001: <stack trace>") and lines[2:] == [
        " => do_sys_openat2+0x1/0x170",
        " => x+0x5/0x10",
    ]
    assert hit.to_json()["stack"] == ["do_sys_openat2+0x1/0x170", "x+0x5/0x10"]
    parsed = diff.parse_trace("\n".join([*lines, hit.line()]))
    assert [p.stack for p in parsed] == [hit.stack, None]
    cut = replace(hit, stack_cut="cannot read pt_regs at 0x10")
    assert cut.lines()[-1] == " => <stack cut: cannot read pt_regs at 0x10>"
    assert cut.to_json()["stack_cut"] == "cannot read pt_regs at 0x10"


def test_stacktrace_usage_errors_come_before_any_boot(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["trace", "--boot", "--stacktrace", "r:e vfs_read"])
    assert code == cli.EXIT_USAGE and "return probe" in capsys.readouterr().err
    code = cli.main(["trace", "--boot", "--stacktrace", "--stack-size", "4", "p vfs_read"])
    assert code == cli.EXIT_USAGE and "--stack-size 4" in capsys.readouterr().err


# --- against the guest's tracefs ------------------------------------------------------------

DEFINITIONS = (
    "p:o do_sys_openat2 f=+0(%si):ustring",
    "p:r vfs_read n=%dx:u64",
    "p:m do_mmap len=%dx:u64",  # from the mmap system call, and from exec's ELF loader
)
WORKLOAD = (
    "for i in 1 2 3; do cat /etc/passwd /proc/version; head -c1 /etc/passwd; done >/dev/null; true"
)
COMMS = ("cat", "head")
PROBED = ("do_sys_openat2", "vfs_read", "do_mmap", "hrtimer_interrupt")


def _workload_lines(run: diff.SideRun) -> list[diff.TraceLine]:
    return [line for line in run.lines if line.comm in COMMS]


@pytest.fixture(scope="module")
def tracefs_run(vm: VM) -> diff.SideRun:
    return diff.run_tracefs(vm, DEFINITIONS, WORKLOAD, stacktrace=True)


@pytest.fixture
def text_kept(vm: VM) -> Iterator[None]:
    """The probed functions' text must be as before the test."""
    before = {name: vm.read(vm.symbols[name], 64) for name in PROBED}
    yield None
    assert {name: vm.read(vm.symbols[name], 64) for name in PROBED} == before


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["record", "stop"])
def test_stacks_identical_to_tracefs(
    vm: VM, tracefs_run: diff.SideRun, mode: str, text_kept: None
) -> None:
    guest = _workload_lines(tracefs_run)
    assert guest and all(line.stack for line in guest), "tracefs printed no stacks"
    assert len({line.stack for line in guest}) >= 3, "the workload's stacks should differ"
    ours = diff.run_kprobevm(vm, DEFINITIONS, WORKLOAD, mode=mode, stacktrace=True)
    result = diff.compare_lines(guest, _workload_lines(ours))
    assert result.identical, result.describe()


IRQ_ENTRY = "asm_sysvec_apic_timer_interrupt"
IDLE = "native_safe_halt"


def _split_at_entry(stack: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the interrupt's own frames up to its entry, the interrupted context's)."""
    at = next(i for i, e in enumerate(stack) if e.startswith(IRQ_ENTRY)) + 1
    return stack[:at], stack[at:]


def _idle(stack: tuple[str, ...]) -> bool:
    """The interrupt came in the idle loop's halt."""
    return _split_at_entry(stack)[1][:1] != () and _split_at_entry(stack)[1][0].startswith(IDLE)


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["record", "stop"])
def test_interrupt_stacks_cross_to_the_interrupted_stack(
    vm: VM, mode: str, text_kept: None
) -> None:
    definitions, workload = ["p:h hrtimer_interrupt"], "sleep 1; cat /etc/passwd >/dev/null"
    guest = diff.run_tracefs(vm, definitions, workload, stacktrace=True).lines
    ours = diff.run_kprobevm(vm, definitions, workload, mode=mode, stacktrace=True).lines
    assert guest and ours
    guest_irq = {_split_at_entry(line.stack or ())[0] for line in guest}
    ours_irq = Counter(_split_at_entry(line.stack or ())[0] for line in ours)
    assert set(ours_irq) <= guest_irq, (ours_irq, guest_irq)
    # the idle task's stack below the interrupt, whole: from the IRQ stack to start_kernel
    guest_idle = {s for line in guest if (s := line.stack) and _idle(s)}
    ours_idle = {s for line in ours if (s := line.stack) and _idle(s)}
    assert guest_idle and ours_idle == guest_idle, (ours_idle, guest_idle)


@pytest.mark.vm
def test_kprobe_stack_true_from_python(vm: VM, text_kept: None) -> None:
    stacks: list[KernelStack] = []

    def handler(kp: Kprobe, regs: PtRegs) -> None:
        assert regs.stack is not None
        stacks.append(regs.stack)

    # stopping; recorded with the default copy; recorded with too small a copy
    for record in (None, RecordSpec(), RecordSpec(stack_size=64)):
        kp = Kprobe(symbol_name="do_sys_openat2", pre_handler=handler, stack=True, record=record)
        vm.register_kprobe(kp)
        try:
            vm.run("cat /proc/version >/dev/null")
            vm.flush_records()
        finally:
            vm.unregister_kprobe(kp)
        assert kp.nerrors == 0 and stacks, kp.errors
        lines = [vm.stack_tracer.lines(s) for s in stacks]
        assert all(s[0] == " => do_sys_openat2+0x1/0x170" for s in lines)
        if record is None or record.stack_size == 0:
            assert all(s.error is None for s in stacks), stacks[0].error
            assert all(s[-1].startswith(" => entry_SYSCALL_64_after_hwframe+") for s in lines)
        else:  # the walk ends where the copy does, and says so
            assert all("64 bytes of stack the record holds" in (s.error or "") for s in stacks)
        stacks.clear()


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["record", "stop"])
def test_stacks_through_module_frames_use_the_module_orc(
    vm: VM, mode: str, text_kept: None
) -> None:
    # skb_to_sgvec is called by virtio_net (a module) for each packet the guest sends;
    # the SSH session's output sends some
    definitions, workload = ["p:x skb_to_sgvec"], "cat /etc/passwd; sleep 0.2"
    guest = {
        line.stack for line in diff.run_tracefs(vm, definitions, workload, stacktrace=True).lines
    }
    ours = {line.stack for line in diff.run_kprobevm(vm, definitions, workload, mode=mode,
                                                     stacktrace=True).lines}  # fmt: skip
    assert ours and all(s and "[virtio_net]" in s[1] for s in ours), ours
    assert ours & guest, (ours, guest)  # the same path through the module, whole
    assert all(s and not s[-1].startswith("<stack cut") for s in ours), ours


@pytest.fixture(scope="module")
def newer_guest() -> Iterator[VM]:
    """Debian's 6.12 cloud kernel: ORC entries in the 6.4+ layout, IBT (``func+4``)."""
    import kprobevm

    with kprobevm.boot(name="stacks-6.12", kernel_package="linux-image-6.12-cloud-amd64") as vm:
        start = len(vm.serial_log())
        yield vm
        trouble = kernel_trouble(vm.serial_log()[start:])
        assert not trouble, trouble


@pytest.mark.vm
def test_stacks_identical_to_tracefs_on_a_newer_kernel(newer_guest: VM) -> None:
    vm = newer_guest
    assert vm.stack_tracer.table.format is SIGNAL_FORMAT  # decided from its linux_banner
    before = {name: vm.read(vm.symbols[name], 64) for name in PROBED}
    guest = _workload_lines(diff.run_tracefs(vm, DEFINITIONS, WORKLOAD, stacktrace=True))
    assert guest and all(line.stack for line in guest)
    for mode in ("record", "stop"):
        ours = diff.run_kprobevm(vm, DEFINITIONS, WORKLOAD, mode=mode, stacktrace=True)
        result = diff.compare_lines(guest, _workload_lines(ours))
        assert result.identical, f"{mode}: {result.describe()}"
    assert {name: vm.read(vm.symbols[name], 64) for name in PROBED} == before
