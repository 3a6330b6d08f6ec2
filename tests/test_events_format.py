"""Hits printed as the kernel's trace file prints them, and as JSON."""

from __future__ import annotations

import json

from kprobevm.tracing import EventHit, ProbeEvent, format_event_line, parse_event
from kprobevm.tracing.fetch import FetchArg, Symbolic
from kprobevm.tracing.format import format_timestamp, without_offset


def args_of(text: str) -> tuple[FetchArg, ...]:
    event = parse_event(text)
    assert isinstance(event, ProbeEvent)
    return event.args


def test_kprobe_line_matches_trace_print_context() -> None:
    dfd, filename = args_of("p:myprobe do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring")
    hit = EventHit(
        event="myprobe",
        group="kprobes",
        comm="cat",
        pid=1234,
        cpu=1,
        timestamp_ns=12_345_678_400,
        where="do_sys_openat2+0x0/0x170",
        args=((dfd, -100), (filename, b"/etc/hostname")),
    )
    assert format_event_line(hit) == (
        "             cat-1234    [001] ..Zff    12.345678: myprobe: "
        '(do_sys_openat2+0x0/0x170) dfd=-100 filename="/etc/hostname"'
    )
    assert hit.line() == format_event_line(hit)


def test_kretprobe_line() -> None:
    (rv,) = args_of("r:myretprobe do_sys_openat2 $retval")
    hit = EventHit(
        event="myretprobe",
        group="kprobes",
        comm="a-very-long-command-name",
        pid=7,
        cpu=12,
        timestamp_ns=1_038_282_286_878_000,
        where="do_sys_open+0x55/0x90",
        function="do_sys_openat2+0x0/0x170",
        args=((rv, 3),),
        flags="d....",
    )
    assert format_event_line(hit) == (
        " a-very-long-com-7       [012] d.... 1038282.286878: myretprobe: "
        "(do_sys_open+0x55/0x90 <- do_sys_openat2) arg1=0x3"
    )


def test_value_formats() -> None:
    args = args_of(
        "p f a=%ax:u8 b=%ax:s16 c=%ax:x32 d=%ax:symbol e=+0(%di):string f=+0(%di):u16[3] "
        "g=+0(%di):string[2] h=+0(%di):u64"
    )
    values = (
        255,
        -3,
        0xBEEF,
        Symbolic(0xFFFFFFFF81300010, "vfs_read+0x10/0x170"),
        None,
        (1, None, 3),
        (b"x", None),
        None,
    )
    hit = EventHit("e", "g", "sh", 1, 0, 0, "f+0x0/0x10", tuple(zip(args, values, strict=True)))
    assert format_event_line(hit).split(": (f+0x0/0x10) ")[1] == (
        "a=255 b=-3 c=0xbeef d=vfs_read+0x10/0x170 e=(fault) f={1,(fault),3} "
        'g={"x",(fault)} h=(fault)'
    )


def test_timestamp_rounds_to_the_microsecond_like_ns2usecs() -> None:
    assert format_timestamp(0) == "    0.000000"
    assert format_timestamp(1_999_999_499) == "    1.999999"
    assert format_timestamp(1_999_999_500) == "    2.000000"
    assert format_timestamp(123_456_789_000_000) == "123456.789000"


def test_without_offset() -> None:
    assert without_offset("do_sys_openat2+0x0/0x170") == "do_sys_openat2"
    assert without_offset("ext4_sync_fs+0x0/0x100 [ext4]") == "ext4_sync_fs [ext4]"
    assert without_offset("0xffffffffc0000000") == "0xffffffffc0000000"


def test_json_has_stable_fields() -> None:
    dfd, filename, sym, arr = args_of(
        "p:myprobe do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring s=%ip:symbol a=+0(%di):u8[2]"
    )
    hit = EventHit(
        event="myprobe",
        group="kprobes",
        comm="cat",
        pid=1234,
        cpu=1,
        timestamp_ns=12_345_678_000,
        where="do_sys_openat2+0x0/0x170",
        args=(
            (dfd, -100),
            (filename, b"/etc/\xffhost"),
            (sym, Symbolic(1, "0x1")),
            (arr, (1, None)),
        ),
    )
    data = hit.to_json()
    assert json.loads(json.dumps(data)) == {
        "event": "myprobe",
        "group": "kprobes",
        "probe": "do_sys_openat2+0x0/0x170",
        "comm": "cat",
        "pid": 1234,
        "cpu": 1,
        "timestamp": "12.345678",
        "timestamp_ns": 12_345_678_000,
        "args": {"dfd": -100, "filename": "/etc/\\xffhost", "s": "0x1", "a": [1, None]},
    }
    ret = EventHit("r", "kprobes", "cat", 1, 0, 0, "x+0x5/0x10", function="f+0x0/0x20")
    assert ret.to_json()["function"] == "f" and ret.is_return
