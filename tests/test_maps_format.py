"""Maps with no guest: which fetch arguments the guest can count, and a snapshot printed
as bpftrace prints its maps (labels, trimmed ends, bars, stacks) and as JSON."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kprobevm.errors import ProbeRefused
from kprobevm.kernel.kallsyms import KernelSymbols
from kprobevm.kprobes.aggregations import Bucket, MapSnapshot, StackKey
from kprobevm.tracing import ProbeEvent, parse_event
from kprobevm.tracing.fetch import FetchArg
from kprobevm.tracing.maps import (
    aggregate_field,
    format_map,
    map_json,
    stack_frames,
    stack_lines,
)
from kprobevm.x86.aggregate import AggregateField
from kprobevm.x86.orc_walk import CUT_DEPTH, CUT_OUTSIDE

DEFINITION = (
    "p:x vfs_read a=%dx:u32 b=$arg3 c=+8(%di):s16 d=+u0(%si):u8 e=$stack"
    " f=+0(+0(%di)):u8 g=%ip h=$comm i=+0(%si):string j=+0(%di):b4@0/8 k=+0(%di):u8[2]"
    " l=@jiffies"
)


def _args() -> dict[str, FetchArg]:
    event = parse_event(DEFINITION)
    assert isinstance(event, ProbeEvent)
    return {a.name: a for a in event.args}


def test_the_fields_the_guest_reads() -> None:
    args = _args()
    assert aggregate_field(args["a"]) == AggregateField("dx", size=4)
    assert aggregate_field(args["b"]) == AggregateField("dx", size=8)
    assert aggregate_field(args["c"]) == AggregateField(
        "di", size=2, signed=True, deref=True, offset=8
    )
    assert aggregate_field(args["d"]) == AggregateField("si", size=1, deref=True, user=True)
    assert aggregate_field(args["e"]) == AggregateField("sp")
    mixed = replace(args["c"], mixed=True)
    assert aggregate_field(mixed).mixed  # the guest kernel's rule, set when planned


@pytest.mark.parametrize(
    ("name", "why"),
    [("f", "one word at an offset"), ("g", "%ip is not a value"), ("h", "not a plain number"),
     ("i", "not a plain number"), ("j", "not a plain number"), ("k", "not a plain number"),
     ("l", "one word at an offset")],
)  # fmt: skip
def test_what_the_guest_cannot_count_is_refused(name: str, why: str) -> None:
    with pytest.raises(ProbeRefused, match=why):
        aggregate_field(_args()[name])


def _log2(counts: dict[int, int]) -> MapSnapshot:
    bounds = [(None, 0), (0, 1)] + [(1 << k, 1 << (k + 1)) for k in range(64)]
    buckets = tuple(Bucket(lo, hi, counts.get(i, 0)) for i, (lo, hi) in enumerate(bounds))
    return MapSnapshot(kind="hist", by="none", buckets=buckets)


def test_log2_hist_as_bpftrace_prints_it() -> None:
    text = format_map("rd", _log2({1: 4, 3: 2, 12: 1, 22: 8}))
    lines = text.splitlines()
    assert lines[0] == "@rd:"
    assert lines[1] == "[0]                    4 |" + "@" * 26 + " " * 26 + "|"
    assert lines[2].startswith("[1]                    0 |")
    assert lines[3].startswith("[2, 4)                 2 |@@@@@@@@@@@@@ ")
    assert "[1K, 2K)" in text and lines[-1].startswith("[1M, 2M)               8 |" + "@" * 52)
    assert len(lines) == 1 + 22  # [0] ... [1M, 2M): the empty ends are left out
    neg = format_map("v", _log2({0: 1}))
    assert neg.splitlines()[1].startswith("(..., 0)               1 |")


def test_lhist_labels_count_rows_and_what_was_lost() -> None:
    lhist = MapSnapshot(kind="lhist", by="none", buckets=(
        Bucket(None, 0, 1), Bucket(0, 10, 0), Bucket(10, 20, 3), Bucket(20, None, 2)),
        faults=2)  # fmt: skip
    lines = format_map("n", lhist).splitlines()
    assert [line.split()[0] for line in lines[1:5]] == ["(...,", "[0,", "[10,", "[20,"]
    assert lines[4].startswith("[20, ...)")
    assert lines[5] == "@n: 2 hit(s) whose field could not be read"
    counts = MapSnapshot(kind="count", by="comm", counts=(("sh", 1), ("dd", 7)), dropped=3,
                         capacity=768)  # fmt: skip
    assert format_map("vfs_read", counts) == (
        "@vfs_read[sh]: 1\n@vfs_read[dd]: 7\n"
        "@vfs_read: 3 hit(s) dropped: a CPU's table was full (768 keys)\n"
    )
    doc = map_json("vfs_read", counts)
    assert doc["counts"] == [{"key": "sh", "count": 1}, {"key": "dd", "count": 7}]
    assert doc["total"] == 8 and doc["dropped"] == 3


_SYMS = """ffffffff81000000 T _stext
ffffffff81100000 T vfs_read
ffffffff81100200 T ksys_read
ffffffff81100300 t helper
ffffffff81100400 D some_data
ffffffffc0001000 t vp_notify\t[virtio_pci]
ffffffffc0001100 t vp_other\t[virtio_pci]
"""


def test_stacks_printed_as_bpftrace_prints_kstack() -> None:
    """``func+offset`` in decimal, one ``@[...]: N`` block; a cut walk says why; a last
    frame outside vmlinux is a module's (kept, said) or no text (dropped, not said)."""
    syms = KernelSymbols.from_text(_SYMS)
    whole = StackKey((0xFFFFFFFF81100001, 0xFFFFFFFF8110026B))
    assert stack_lines(whole, 7, syms) == ["@[", "        vfs_read+1", "        ksys_read+107",
                                           "]: 7"]  # fmt: skip
    deep = StackKey((0xFFFFFFFF81100001,), CUT_DEPTH)
    assert stack_lines(deep, 1, syms)[-2] == "        [stack cut: deeper than the key's frames]"
    module = StackKey((0xFFFFFFFF81100001, 0xFFFFFFFFC0001012), CUT_OUTSIDE)
    assert stack_frames(module, syms) == (
        ["vfs_read+1", "vp_notify+18"], "module virtio_pci: its frames are not walked")
    data = StackKey((0xFFFFFFFF81100001, 0xFFFFFFFF81100408), CUT_OUTSIDE)
    assert stack_frames(data, syms) == (["vfs_read+1"], None)


def test_a_stack_map_as_json() -> None:
    """Without symbols a stack key is its addresses and why it was cut, if it was."""
    snap = MapSnapshot(kind="count", by="stack", counts=(
        (StackKey((0xFFFFFFFF81100001,), CUT_DEPTH), 2), (StackKey((0x10, 0x20)), 5)))
    assert map_json("vfs_read", snap)["counts"] == [
        {"key": {"stack": ["0xffffffff81100001"], "cut": "deeper than the key's frames"},
         "count": 2},
        {"key": {"stack": ["0x10", "0x20"], "cut": None}, "count": 5},
    ]  # fmt: skip
