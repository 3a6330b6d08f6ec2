"""The capture plan of recorded events (no guest): which reads the guest makes at a hit,
and the host's evaluation of a record against them, fault for fault."""

from __future__ import annotations

import struct

import pytest

from kprobevm.errors import GuestFaultError, KprobeError
from kprobevm.gdbstub.memory import GuestMemory
from kprobevm.kprobes.recorder import CapturedRead, RecordedMemory, decode_record
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.capture import Unrecordable, record_spec
from kprobevm.x86 import record as rec
from kprobevm.x86.record import Capture

U64 = (1 << 64) - 1


def plan(args: str, string_size: int = 256) -> tuple[Capture, ...]:
    event = parse_event(f"p:e do_sys_openat2 {args}")
    assert isinstance(event, ProbeEvent)
    return record_spec(event.args, string_size=string_size).captures


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("%di %ip $stack $arg2 $comm \\7", ()),
        ("+0(%si):ustring", (Capture(0, 256, reg="si", string=True, user=True),)),
        ("+0(%si):string", (Capture(0, 256, reg="si", string=True),)),
        ("+8(%dx):u32", (Capture(8, 4, reg="dx"),)),
        ("-8(%bp):s64", (Capture(-8 & U64, 8, reg="bp"),)),
        ("+u4(%di):u16", (Capture(4, 2, reg="di", user=True),)),
        ("$stack2", (Capture(16, 8, reg="sp"),)),
        ("$arg8", (Capture(16, 8, reg="sp"),)),
        ("+16(+8(%di)):string", (Capture(8, 8, reg="di"), Capture(16, 256, from_capture=0,
                                                                   string=True))),
        ("+0(%dx):u8[3]", (Capture(0, 1, reg="dx"), Capture(1, 1, reg="dx"),
                           Capture(2, 1, reg="dx"))),
        ("+4(+0($stack1)):b3@2/32", (Capture(8, 8, reg="sp"), Capture(0, 8, from_capture=0),
                                     Capture(4, 4, from_capture=1))),
        ("+0(%si):symstr", (Capture(0, 8, reg="si"),)),
    ],
)  # fmt: skip
def test_capture_plan(args: str, expected: tuple[Capture, ...]) -> None:
    assert plan(args) == expected


def test_unresolved_symbols_are_not_recordable() -> None:
    """Placing an event resolves @SYM (the real-guest tests record those); a parse alone
    leaves them open, and the plan says so."""
    event = parse_event("p:e do_sys_openat2 j=@jiffies_64:u64")
    assert isinstance(event, ProbeEvent)
    with pytest.raises(Unrecordable, match="not resolved"):
        record_spec(event.args)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("r:e do_sys_openat2 $retval", r"\$retval"),
        ("p:e do_sys_openat2 +0(%si):string[2]", "arrays of strings"),
    ],
)
def test_unrecordable(text: str, why: str) -> None:
    event = parse_event(text)
    assert isinstance(event, ProbeEvent)
    with pytest.raises(Unrecordable, match=why):
        record_spec(event.args)


def test_string_size_is_the_capture_size() -> None:
    assert plan("+0(%si):ustring", string_size=4096)[0].size == 4096
    with pytest.raises(ValueError):
        Capture(0, 4097, reg="si", string=True)
    with pytest.raises(ValueError, match="snapshot"):
        Capture(0, 8, reg="fs_base")


def test_recorded_memory_answers_like_the_guest() -> None:
    reads = [
        CapturedRead(0x1000, 8, b"ABCDEFGH", False),
        CapturedRead(0x2000, 4, b"abc\0", True),
        CapturedRead(0x3000, -14, b"", False),
    ]
    mem = RecordedMemory(GuestMemory(_NoTransport()), reads)  # type: ignore[arg-type]
    assert mem.read(0x1002, 4) == b"CDEF"
    assert mem.u64(0x1000) == int.from_bytes(b"ABCDEFGH", "little")
    # a string reader asks for a chunk: the text, its NUL and zeros after
    assert mem.read(0x2000, 16) == b"abc" + bytes(13)
    assert mem.read(0x2001, 2) == b"bc"
    with pytest.raises(GuestFaultError):
        mem.read(0x3000, 8)
    with pytest.raises(KprobeError, match="not recorded"):
        mem.read(0x1004, 8)  # runs past the capture
    with pytest.raises(KprobeError, match="cannot be written"):
        mem.write(0x1000, b"x")


def test_decode_record_reads_what_the_program_writes() -> None:
    layout = rec.RecordLayout((Capture(0, 8, reg="di"), Capture(0, 16, reg="si", string=True)))
    regs = list(range(100, 100 + len(rec.SNAPSHOT_REGS)))
    raw = bytearray(layout.size)
    rec.RECORD_HEADER.pack_into(raw, 0, 0x41, layout.size, 7, 1, 123456, 42, b"cat\0junk")
    struct.pack_into(f"<{len(regs)}Q", raw, rec.REGS_OFFSET, *regs)
    first, second = layout.capture_offsets
    rec.CAPTURE_HEADER.pack_into(raw, first, 0xFFFF888000001000, 8)
    raw[first + 16 : first + 24] = b"\x11" * 8
    rec.CAPTURE_HEADER.pack_into(raw, second, 0x7FFF0000, 4)
    raw[second + 16 : second + 20] = b"/tm\0"
    record = decode_record(bytes(raw), layout)
    assert (record.probe_id, record.cpu, record.pid, record.comm, record.tsc) == (
        7, 1, 42, "cat", 123456)  # fmt: skip
    assert record.regs["r15"] == 100 and record.regs["ss"] == regs[-1]
    assert record.regs["di"] == regs[rec.SNAPSHOT_REGS.index("di")]
    assert record.reads[0] == CapturedRead(0xFFFF888000001000, 8, b"\x11" * 8, False)
    assert record.reads[1] == CapturedRead(0x7FFF0000, 4, b"/tm\0", True)
    assert layout.size % 8 == 0 and second - first == 16 + 8


class _NoTransport:
    """RecordedMemory must never reach the live guest."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"RecordedMemory used the transport ({name})")
