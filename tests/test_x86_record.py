"""The record program run in unicorn: a record and its reads, the ring's wrap, a full
ring and a busy CPU, each leaving every register as the probe found it."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field, replace

import pytest

from kprobevm.errors import KprobeError
from kprobevm.kprobes.recorder import CapturedRead, RecordSpec, decode_record, program_size
from kprobevm.x86 import record as rec
from kprobevm.x86.addrspace import FIVE_LEVEL, FOUR_LEVEL
from kprobevm.x86.record import Capture, CopyHelpers, RecordLayout, RingLayout
from tests._gas import gas_text, needs_gas
from tests._x86_unicorn import GPRS, Machine, unicorn

PROGRAM = 0xFFFFFFFFA0100000
CONTROL = 0xFFFFFFFFA0102000
COUNTERS = 0xFFFFFFFFA0103000
RING = 0xFFFFFFFFA0104000
RING_SIZE = 0x1000
HELPERS = 0xFFFFFFFF81100000
CONT = 0xFFFFFFFFA0200000
PERCPU = 0xFFFF888000200000
TASK = 0xFFFF888000300000
KDATA = 0xFFFF888000400000
USER = 0x0000000000601000
STACK = 0xFFFFC90000004000
GDT = 0xFFFFFFFFFF000000
PROBE_IP = 0xFFFFFFFF81234560
CPU = 3
PROBE_ID = 7
EFAULT = 14

RING_LAYOUT = RingLayout(
    head=CONTROL, tail=CONTROL + 64, drain=CONTROL + 128, busy=CONTROL + 256, max_cpus=256,
    counters=COUNTERS, ring=RING, ring_size=RING_SIZE, high_water=RING_SIZE // 2,
)  # fmt: skip
HELPER_ADDRS = CopyHelpers(
    copy_from_kernel=HELPERS, copy_from_user=HELPERS + 0x10, strncpy_from_kernel=HELPERS + 0x20,
    strncpy_from_user=HELPERS + 0x30, cpu_number=0x40, current_task=0x48, task_pid=0x10,
    task_comm=0x20,
)  # fmt: skip


@dataclass
class Run:
    """One hit through the program: the machine after it and the helper calls made."""

    m: Machine
    before: dict[str, int]
    after: dict[str, int] = field(default_factory=dict)
    calls: list[tuple[int, int, int]] = field(default_factory=list)


def _machine(layout: RecordLayout) -> tuple[Machine, int]:
    m = Machine()
    code = rec.build_record_program(
        PROGRAM, probes=((PROBE_ID, layout),), probe_ip=PROBE_IP, ring=RING_LAYOUT,
        helpers=HELPER_ADDRS, cont=CONT,
    ).code  # fmt: skip
    m.map(PROGRAM, 0x2000, b"\xcc")
    m.write(PROGRAM, code)
    for va, size in ((CONTROL, 0x1000), (COUNTERS, 0x1000), (RING, RING_SIZE), (PERCPU, 0x1000),
                     (TASK, 0x1000), (KDATA, 0x1000), (USER, 0x1000), (STACK - 0x3000, 0x4000)):
        m.map(va, size)  # fmt: skip
    m.map(HELPERS, 0x1000, b"\xcc")
    m.map(CONT, 0x1000, b"\xf4")
    m.write(PERCPU + 0x40, struct.pack("<I", CPU))
    m.write(PERCPU + 0x48, struct.pack("<Q", TASK))
    m.write(TASK + 0x10, struct.pack("<i", 4242))
    m.write(TASK + 0x20, b"workload\0".ljust(16, b"\0"))
    m.write(KDATA, struct.pack("<Q", KDATA + 0x100) + b"kernel text\0")
    m.write(KDATA + 0x100, b"nested\0")
    m.write(USER, b"/etc/passwd\0")
    m.start_paging(GDT)
    m.uc.msr_write(0xC0000101, PERCPU)  # IA32_GS_BASE: the per-CPU area
    return m, len(code)


def _copy(m: Machine, dst: int, src: int, n: int, *, string: bool) -> int:
    """The kernel's copy helpers, host side: -EFAULT off the mapped test pages."""
    try:
        data = m.read(src, n)
    except KeyError:
        return -EFAULT
    if not string:
        m.write(dst, data)
        return 0
    nul = data.find(b"\0")
    if nul < 0:
        m.write(dst, data[: n - 1] + b"\0")
        return n
    m.write(dst, data[: nul + 1])
    return nul + 1


def _run(m: Machine, length: int, seed: int = 1) -> Run:
    rng = random.Random(seed)
    regs = {r: rng.getrandbits(64) for r in GPRS if r != "rsp"}
    regs.update(rsi=USER, rdi=KDATA, rsp=STACK - 0x100, eflags=0x246)
    m.set_regs(regs)
    run = Run(m, m.regs())
    uc = m.uc

    def hook(_uc: object, addr: int, _size: int, _data: object) -> None:
        if HELPERS <= addr < HELPERS + 0x40:
            which = (addr - HELPERS) // 0x10
            r = m.regs()
            run.calls.append((which, r["rsi"], r["rdx"]))
            result = _copy(m, r["rdi"], r["rsi"], r["rdx"], string=which >= 2)
            ret = m.u64(r["rsp"])
            m.set_regs({"rax": result & (2**64 - 1), "rsp": r["rsp"] + 8, "rip": ret})
        elif not PROGRAM <= addr < PROGRAM + length:
            uc.emu_stop()

    handle = uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    try:
        uc.emu_start(PROGRAM, 0, count=5000)
    finally:
        uc.hook_del(handle)
    run.after = m.regs()
    return run


def _untouched(run: Run) -> None:
    """The program leaves for the instruction's copy with every register as it came."""
    assert run.after["rip"] == CONT
    for name in (*GPRS, "eflags"):
        if name != "rip":
            assert run.after[name] == run.before[name], name


def _counters(m: Machine) -> tuple[int, int]:
    hits, missed = struct.unpack("<QQ", m.read(COUNTERS + 16 * PROBE_ID, 16))
    return hits, missed


LAYOUT = RecordLayout((
    Capture(0, 256, reg="si", string=True, user=True),  # a user string
    Capture(0, 8, reg="di"),  # a kernel word: a pointer
    Capture(0, 32, from_capture=1, string=True),  # the string it points at
    Capture(0, 8, reg="r8"),  # r8 is random: the read faults
    Capture(0, 8, from_capture=3),  # based on a failed read: fails without a call
))  # fmt: skip


def test_a_record_with_its_reads() -> None:
    m, length = _machine(LAYOUT)
    run = _run(m, length)
    _untouched(run)
    raw = m.read(RING, LAYOUT.size)
    record = decode_record(raw, LAYOUT)
    assert struct.unpack_from("<QI", raw) == (1, LAYOUT.size)  # stamp: position 0 + 1
    assert (record.probe_id, record.cpu, record.pid, record.comm) == (PROBE_ID, CPU, 4242,
                                                                      "workload")  # fmt: skip
    for pt, gdb in (("ax", "rax"), ("bx", "rbx"), ("r15", "r15"), ("di", "rdi"), ("si", "rsi")):
        assert record.regs[pt] == run.before[gdb], pt
    assert record.regs["ip"] == PROBE_IP and record.regs["flags"] == 0x246
    assert record.regs["sp"] == run.before["rsp"]
    name, word, text, fault, after_fault = record.reads
    assert (name.address, name.status, name.data) == (USER, 12, b"/etc/passwd\0")
    assert (word.status, word.data) == (8, struct.pack("<Q", KDATA + 0x100))
    assert (text.address, text.data) == (KDATA + 0x100, b"nested\0")
    assert fault.status == -EFAULT and after_fault.status == -EFAULT
    # the kernel helpers each read once; the read based on a failed one is not tried
    assert [c[0] for c in run.calls] == [3, 0, 2, 0]
    assert struct.unpack("<QQ", m.read(CONTROL, 8) + m.read(CONTROL + 64, 8)) == (LAYOUT.size, 0)
    assert _counters(m) == (1, 0)
    assert m.read(CONTROL + 256 + CPU, 1) == b"\0"  # the busy byte is released


def test_a_record_that_would_cross_the_end_wraps_after_a_pad() -> None:
    m, length = _machine(LAYOUT)
    start = 3 * RING_SIZE - 64  # 64 bytes before the end, the third time round
    m.write(CONTROL, struct.pack("<Q", start))
    m.write(CONTROL + 64, struct.pack("<Q", start - 1500))  # unread: over half once it lands
    _untouched(_run(m, length))
    pad = struct.unpack("<Q", m.read(RING + RING_SIZE - 64, 8))[0]
    assert pad == (start + 1) | rec.PAD_BIT
    record_at = 3 * RING_SIZE
    assert struct.unpack("<Q", m.read(RING, 8))[0] == record_at + 1
    assert struct.unpack("<Q", m.read(CONTROL, 8))[0] == record_at + LAYOUT.size
    # past the high-water mark: the program asked the host to drain
    assert m.read(CONTROL + 128, 1) == b"\1"


def test_a_full_ring_counts_a_miss_and_asks_for_a_drain() -> None:
    m, length = _machine(LAYOUT)
    m.write(CONTROL, struct.pack("<Q", RING_SIZE - 16))  # the host has read nothing yet
    _untouched(_run(m, length))
    assert _counters(m) == (0, 1)
    assert struct.unpack("<Q", m.read(CONTROL, 8))[0] == RING_SIZE - 16  # nothing reserved
    assert m.read(CONTROL + 128, 1) == b"\1"
    assert m.read(CONTROL + 256 + CPU, 1) == b"\0"


def test_a_busy_cpu_counts_a_miss_and_writes_nothing() -> None:
    m, length = _machine(LAYOUT)
    m.write(CONTROL + 256 + CPU, b"\1")  # this CPU is inside a record program already
    run = _run(m, length)
    _untouched(run)
    assert _counters(m) == (0, 1) and not run.calls
    assert m.read(RING, 8) == bytes(8) and m.read(CONTROL, 8) == bytes(8)
    assert m.read(CONTROL + 256 + CPU, 1) == b"\1"  # still the outer program's


def test_count_program_only_counts() -> None:
    m = Machine()
    code = rec.build_count_program(PROGRAM, counters=(COUNTERS, COUNTERS + 16), cont=CONT).code
    m.map(PROGRAM, 0x1000, b"\xcc")
    m.write(PROGRAM, code)
    m.map(COUNTERS, 0x1000)
    m.map(CONT, 0x1000, b"\xf4")
    m.map(STACK - 0x1000, 0x1000)
    m.start_paging(GDT)
    m.set_regs({"rsp": STACK - 0x100, "eflags": 0x8D7})  # CF PF AF ZF SF OF set
    executed = m.run(PROGRAM, inside=(PROGRAM, PROGRAM + len(code)))
    assert m.regs()["rip"] == CONT and m.regs()["eflags"] == 0x8D7 and len(executed) == 5
    assert struct.unpack("<QQQ", m.read(COUNTERS, 24)) == (1, 0, 1)


def test_program_fits_its_cell() -> None:
    with pytest.raises(KprobeError, match="over 16"):
        rec.check_program_fits(b"\x90" * 17, 16, "somewhere")
    rec.check_program_fits(b"\x90" * 16, 16, "somewhere")


def test_a_programs_size_is_known_before_it_is_placed() -> None:
    """A trace session sizes a site's program before there is a ring or a cell:
    wherever the program goes, its size is the same."""
    rng = random.Random(5)
    for _ in range(20):
        specs = []
        for _ in range(rng.randint(1, 4)):
            captures: list[Capture] = []
            for _ in range(rng.randint(0, 6)):
                base = rng.choice(("reg", "capture", "const")) if captures else "reg"
                captures.append(Capture(
                    offset=rng.choice((0, 8, -16, 0x12345678, (1 << 64) - 8)),
                    size=rng.choice((1, 2, 4, 8, 64, 256)),
                    reg="si" if base == "reg" else None,
                    from_capture=rng.randrange(len(captures)) if base == "capture" else None,
                    string=rng.random() < 0.3, user=rng.random() < 0.3,
                    mixed=rng.random() < 0.5,
                ))  # fmt: skip
            specs.append(RecordSpec(captures=tuple(captures)))
        here = rec.build_record_program(
            PROGRAM, probes=tuple((PROBE_ID + i, RecordLayout(s.captures))
                                  for i, s in enumerate(specs)),
            probe_ip=PROBE_IP, ring=RING_LAYOUT, helpers=HELPER_ADDRS, cont=CONT,
        ).code  # fmt: skip
        assert program_size(specs, probe_ip=PROBE_IP) == len(here)
    stacked = rec.build_record_program(
        PROGRAM, probes=((PROBE_ID, RecordLayout((), 4096)),), probe_ip=PROBE_IP,
        ring=RING_LAYOUT, helpers=replace(HELPER_ADDRS, task_stack=0x30, top_of_stack=0x50),
        cont=CONT,
    ).code  # fmt: skip
    assert program_size([RecordSpec(stack_size=4096)], probe_ip=PROBE_IP) == len(stacked)
    counted = rec.build_count_program(PROGRAM, counters=(COUNTERS, COUNTERS + 16), cont=CONT)
    only_count = [RecordSpec(count_only=True)] * 2
    assert program_size(only_count, probe_ip=PROBE_IP) == len(counted.code)


def test_a_mixed_read_splits_at_the_guests_task_size() -> None:
    """A mixed read picks the user or kernel copy by comparing with TASK_SIZE_MAX: the
    guest's, which 5-level paging moves from (1 << 47) - 4096 to (1 << 56) - 4096."""
    layout = RecordLayout((Capture(0, 64, reg="si", string=True, mixed=True),))
    for split in (FOUR_LEVEL, FIVE_LEVEL):
        helpers = replace(HELPER_ADDRS, task_size_max=split.task_size_max)
        code = rec.build_record_program(
            PROGRAM, probes=((PROBE_ID, layout),), probe_ip=PROBE_IP, ring=RING_LAYOUT,
            helpers=helpers, cont=CONT,
        ).code  # fmt: skip
        assert struct.pack("<Q", split.task_size_max) in code
    m, length = _machine(layout)  # 4-level: a user address below TASK_SIZE_MAX
    run = _run(m, length)
    assert [c[0] for c in run.calls] == [3]  # strncpy_from_user_nofault
    assert decode_record(m.read(RING, layout.size), layout).reads[0].data == b"/etc/passwd\0"


def _stack_run(stack_size: int, top_word: int) -> tuple[Run, int, list[CapturedRead]]:
    """A hit whose record copies ``stack_size`` bytes of stack; ``top_word`` at the top of
    the hit's 16 KiB stack block (pt_regs' ss on a task stack, the saved sp on the IRQ
    stack). The run, the record's size, and its two stack slices."""
    layout = RecordLayout((), stack_size)
    m, length = _machine(layout)
    m.write(STACK - 8, struct.pack("<Q", top_word))
    m.write(KDATA + 0x800, bytes(range(256)) * 8)
    run = _run(m, length)
    _untouched(run)
    size = struct.unpack_from("<I", m.read(RING + 8, 4))[0]
    record = decode_record(m.read(RING, size), layout)
    assert struct.unpack("<Q", m.read(CONTROL, 8))[0] == size  # the head moved by as much
    return run, size, list(record.reads)


def test_a_stack_copy_ends_at_the_stack_top_and_follows_no_ss() -> None:
    run, size, (stack, below) = _stack_run(512, 0x18)  # sp is 0x100 below the top
    assert (stack.address, stack.status) == (STACK - 0x100, 0x100)
    assert stack.data == run.m.read(STACK - 0x100, 0x100)
    assert (below.address, below.status) == (0, -EFAULT)
    fixed = RecordLayout(()).size
    assert size == fixed + 2 * rec.CAPTURE_HEADER.size + 0x100  # only what was copied
    # a copy cut short by its size never reads the top word
    run, size, (short, below) = _stack_run(64, KDATA + 0x800)
    assert short.status == 64 and below.status == -EFAULT
    assert [(src, n) for which, src, n in run.calls if which == 0] == [(STACK - 0x100, 64)]


def test_a_stack_copy_on_the_irq_stack_follows_the_saved_sp() -> None:
    run, size, (stack, below) = _stack_run(1024, KDATA + 0x800)
    assert stack.status == 0x100
    assert (below.address, below.status) == (KDATA + 0x800, 1024)
    assert below.data == run.m.read(KDATA + 0x800, 1024)
    assert size == RecordLayout(()).size + 2 * rec.CAPTURE_HEADER.size + 0x100 + 1024
    # where the saved sp's block runs past a mapped page, the copy stops at the page end
    run, size, (stack, below) = _stack_run(1024, KDATA + 0xE00)
    assert (below.address, below.status) == (KDATA + 0xE00, 0x200)
    assert [(src, n) for which, src, n in run.calls if which == 0] == [
        (STACK - 8, 8), (STACK - 0x100, 0x100), (KDATA + 0xE00, 1024), (KDATA + 0xE00, 0x200)
    ]  # fmt: skip


@needs_gas
def test_a_stack_copying_program_listing_assembles_to_its_bytes() -> None:
    layout = RecordLayout((Capture(0, 8, reg="di"),), 2048)
    for top_of_stack in (0, 0x50):
        helpers = replace(HELPER_ADDRS, task_stack=0x30, top_of_stack=top_of_stack)
        program = rec.build_record_program(
            PROGRAM, probes=((PROBE_ID, layout), (PROBE_ID + 1, layout)), probe_ip=PROBE_IP,
            ring=RING_LAYOUT, helpers=helpers, cont=CONT,
        )  # fmt: skip
        assert gas_text(program.listing) == program.code


def _on_task_stack(layout: RecordLayout, helpers: CopyHelpers) -> tuple[Machine, bytes]:
    """A machine running ``layout``'s program with current's 16 KiB stack under STACK
    (``task_struct.stack`` at TASK + 0x30): the machine and the program's code."""
    code = rec.build_record_program(
        PROGRAM, probes=((PROBE_ID, layout),), probe_ip=PROBE_IP, ring=RING_LAYOUT,
        helpers=helpers, cont=CONT,
    ).code  # fmt: skip
    m, _ = _machine(layout)
    m.write(PROGRAM, code)
    m.write(TASK + 0x30, struct.pack("<Q", STACK - 0x4000))
    return m, code


def test_a_stack_copy_from_the_current_task_stack_is_a_plain_copy() -> None:
    # task_struct.stack (at TASK + 0x30) is the 16 KiB stack under STACK: the copy needs
    # no fault-tolerant helper, and the top (pt_regs' ss there) is never read as a link
    layout = RecordLayout((), 512)
    m, code = _on_task_stack(layout, replace(HELPER_ADDRS, task_stack=0x30))
    m.write(STACK - 0x100, bytes(range(248)) + struct.pack("<Q", 0x18))
    run = _run(m, len(code))
    _untouched(run)
    size = struct.unpack_from("<I", m.read(RING + 8, 4))[0]
    stack, below = decode_record(m.read(RING, size), layout).reads
    assert (stack.address, stack.status) == (STACK - 0x100, 0x100)
    assert stack.data == m.read(STACK - 0x100, 0x100)
    assert below.status == -EFAULT and not run.calls
    # an address outside current's stack goes through the kernel's helper as before
    m.write(TASK + 0x30, struct.pack("<Q", STACK))
    m.write(CONTROL, bytes(8))
    m.write(CONTROL + 64, bytes(8))
    run = _run(m, len(code))
    assert [c[0] for c in run.calls] == [0, 0]  # the top word, then the slice


def _task_stack_run(
    layout: RecordLayout, helpers: CopyHelpers, *, regs_end: int = STACK
) -> tuple[Run, int, int]:
    """A hit 0x100 below the top of current's stack (``task_struct.stack`` at TASK +
    0x30, the per-CPU ``top_of_stack`` at PERCPU + 0x50 holding ``regs_end``): the run,
    the instructions the program executed, and the record's size."""
    m, code = _on_task_stack(layout, helpers)
    m.write(PERCPU + 0x50, struct.pack("<Q", regs_end))
    m.write(STACK - 0x100, bytes(range(256)))
    count = [0]

    def hook(_uc: object, addr: int, _size: int, _data: object) -> None:
        count[0] += PROGRAM <= addr < PROGRAM + len(code)

    m.uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    run = _run(m, len(code))
    _untouched(run)
    return run, count[0], struct.unpack_from("<I", m.read(RING + 8, 4))[0]


@pytest.mark.parametrize("padding", [0, 16])
def test_a_copy_from_current_stack_stops_at_its_entry_regs_and_takes_their_frame(
    padding: int,
) -> None:
    # pt_regs end ``padding`` bytes below the stack's top (x86-64 with FRED pads 16):
    # the copy takes the frames up to them, then only their ip, cs, flags, sp and ss
    layout = RecordLayout((), 4096)
    helpers = replace(HELPER_ADDRS, task_stack=0x30, top_of_stack=0x50)
    run, _, size = _task_stack_run(layout, helpers, regs_end=STACK - padding)
    regs = STACK - padding - rec.PT_REGS_SIZE
    stack, frame = decode_record(run.m.read(RING, size), layout).reads
    assert (stack.address, stack.status) == (STACK - 0x100, regs - (STACK - 0x100))
    assert stack.data == run.m.read(STACK - 0x100, stack.status)
    assert (frame.address, frame.status) == (regs + 128, rec.HARDWARE_FRAME)
    assert frame.data == run.m.read(regs + 128, rec.HARDWARE_FRAME)
    assert size == RecordLayout(()).size + 2 * rec.CAPTURE_HEADER.size + stack.status + 40
    assert not run.calls
    # a copy too short for the frame (8 bytes) keeps its second slice empty
    layout = RecordLayout((), 8)
    run, _, size = _task_stack_run(layout, helpers, regs_end=STACK - padding)
    stack, below = decode_record(run.m.read(RING, size), layout).reads
    assert (stack.status, below.address, below.status) == (8, 0, -EFAULT)


def test_a_copy_from_current_stack_costs_its_words_and_a_few_instructions() -> None:
    # the guest pays per instruction (rep movsq: one a word): a copy from current's stack
    # adds its words and a small fixed part to a hit, whatever the stack's depth
    helpers = replace(HELPER_ADDRS, task_stack=0x30, top_of_stack=0x50)
    _, without, _ = _task_stack_run(RecordLayout(()), helpers)
    _, with_stack, _ = _task_stack_run(RecordLayout((), 4096), helpers)
    words = (0x100 - rec.PT_REGS_SIZE + rec.HARDWARE_FRAME) // 8
    assert with_stack - without <= words + 35
    # without top_of_stack the copy takes the whole stack to its top
    _, whole, _ = _task_stack_run(RecordLayout((), 4096), replace(helpers, top_of_stack=0))
    assert whole - without <= 0x100 // 8 + 35
