"""The registry checks of register_trace_kprobe (no guest: they need only parsed events)."""

from __future__ import annotations

import pytest

from kprobevm.errors import ProbeSyntaxError
from kprobevm.tracing import EventRegistry, ProbeEvent, parse_event


def ev(text: str) -> ProbeEvent:
    parsed = parse_event(text)
    assert isinstance(parsed, ProbeEvent)
    return parsed


def rejected(registry: EventRegistry, text: str) -> ProbeSyntaxError:
    with pytest.raises(ProbeSyntaxError) as info:
        registry.add(ev(text))
    return info.value


def test_same_name_same_args_joins_the_event() -> None:
    reg = EventRegistry()
    reg.add(ev("p:grp/open do_sys_openat2 dfd=%di:s32"))
    reg.add(ev("p:grp/open do_filp_open dfd=%di:s32"))
    assert [e.symbol for e in reg.events[("grp", "open")]] == ["do_sys_openat2", "do_filp_open"]


def test_return_and_plain_probe_under_one_name() -> None:
    reg = EventRegistry()
    reg.add(ev("p:grp/x vfs_read"))
    err = rejected(reg, "r:grp/x vfs_write")
    assert (err.code, err.position) == ("DIFF_PROBE_TYPE", 0)
    reg.add(ev("r:grp/y vfs_read"))
    assert rejected(reg, "p:grp/y vfs_write").code == "DIFF_PROBE_TYPE"


@pytest.mark.parametrize(
    ("second", "word"),
    [
        ("p:g/e vfs_write a=%di:u32 b=%si", 2),  # type of the first argument
        ("p:g/e vfs_write a=%di c=%si", 3),  # name of the second
        ("p:g/e vfs_write a=%di", 3),  # one fewer: the caret goes past the last word
        ("p:g/e vfs_write a=%di b=%si c=%dx", 4),  # one more
    ],
)
def test_arguments_must_agree(second: str, word: int) -> None:
    reg = EventRegistry()
    reg.add(ev("p:g/e vfs_read a=%di b=%si"))
    err = rejected(reg, second)
    words = second.split(" ")
    expected = sum(len(w) + 1 for w in words[:word]) if word < len(words) else 0
    assert (err.code, err.position) == ("DIFF_ARG_TYPE", expected)


def test_same_probe_twice() -> None:
    reg = EventRegistry()
    reg.add(ev("p:g/e vfs_read+4 a=%di"))
    err = rejected(reg, "p:g/e vfs_read+4 a=%di")
    assert (err.code, err.position) == ("SAME_PROBE", 0)
    reg.add(ev("p:g/e vfs_read+4 a=+0(%di)"))  # same type and name, another fetch
    reg.add(ev("p:g/e vfs_read a=%di"))  # another offset


def test_address_probes_are_all_unknown_to_the_kernel() -> None:
    reg = EventRegistry()
    reg.add(ev("p:g/e 0xffffffff81000000"))
    assert rejected(reg, "p:g/e 0xffffffff81000010").code == "SAME_PROBE"


def test_name_of_a_guest_event() -> None:
    reg = EventRegistry(existing={("sched", "sched_switch")})
    err = rejected(reg, "p:sched/sched_switch schedule")
    assert (err.code, err.position) == ("EVENT_EXIST", 0)
    reg.add(ev("p:sched/mine schedule"))
    assert not reg.events.get(("sched", "sched_switch"))


def test_nothing_is_added_by_a_rejection() -> None:
    reg = EventRegistry()
    reg.add(ev("p:g/e vfs_read"))
    rejected(reg, "r:g/e vfs_read")
    assert len(reg.events[("g", "e")]) == 1
