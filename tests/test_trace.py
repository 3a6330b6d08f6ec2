"""Trace sessions on the shared guest: kprobe_events definitions placed, hits as the kernel
would print them, the kernel's registration errors, and a dry run that writes nothing."""

from __future__ import annotations

import json

import pytest

from kprobevm.errors import KprobeError, ProbeSyntaxError
from kprobevm.guest.vm import VM
from kprobevm.tracing import EventHit, ProbeEvent, parse_event
from kprobevm.tracing.session import TraceSession, args_of, plan_events

pytestmark = pytest.mark.vm


def events(*texts: str) -> list[ProbeEvent]:
    out = []
    for text in texts:
        event = parse_event(text)
        assert isinstance(event, ProbeEvent)
        out.append(event)
    return out


def trace(vm: VM, command: str, *definitions: str) -> list[EventHit]:
    session = TraceSession(vm, plan_events(vm, events(*definitions)))
    with session:
        vm.run(command)
    assert not session.handler_errors()
    return list(session.drain())


def test_open_file_names_and_comm(vm: VM) -> None:
    """The issue's example: cat /etc/hostname shows up with its file name and comm."""
    hits = trace(
        vm, "cat /etc/hostname; true",
        "p:open do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring",
        # A kernel string fetch of a user pointer: since 5.8 the kernel reads it as a
        # user string (kernel_rules' mixed_reads), so it prints the name too.
        "p:openk do_sys_openat2 filename=+0(%si):string",
    )  # fmt: skip
    cats = [h for h in hits if h.comm == "cat" and h.event == "open"]
    assert any(args_of(h)["filename"] == b"/etc/hostname" for h in cats), [h.line() for h in hits]
    line = next(h.line() for h in cats if args_of(h)["filename"] == b"/etc/hostname")
    assert line.lstrip().startswith("cat-")
    assert ": open: (do_sys_openat2+0x0/0x" in line
    assert line.endswith(' dfd=-100 filename="/etc/hostname"')
    assert all(h.pid > 0 for h in cats)
    kernel_string = [h for h in hits if h.event == "openk" and h.comm == "cat"]
    assert any(args_of(h)["filename"] == b"/etc/hostname" for h in kernel_string)
    # timestamps: host monotonic since the probes were placed, increasing
    stamps = [h.timestamp_ns for h in hits]
    assert stamps == sorted(stamps) and stamps[0] >= 0


def test_return_probe_shows_enoent(vm: VM) -> None:
    """A failing open returns -2: x64 by default (0xfffffffffffffffe), -2 as s32."""
    hits = trace(
        vm, "cat /nonexistent; true",
        "r:openret do_sys_openat2 $retval ret=$retval:s32",
    )  # fmt: skip
    cats = [h for h in hits if h.comm == "cat"]
    failed = [h for h in cats if args_of(h)["ret"] == -2]
    assert failed, [h.line() for h in hits]
    hit = failed[0]
    assert hit.is_return
    line = hit.line()
    assert " <- do_sys_openat2) arg1=0xfffffffffffffffe ret=-2" in line, line
    # the return address is in the caller: (caller+0x../0x.. <- do_sys_openat2)
    assert "(do_sys_openat2" not in line
    doc = hit.to_json()
    assert doc["function"] == "do_sys_openat2" and doc["args"] == {
        "arg1": 0xFFFFFFFFFFFFFFFE, "ret": -2}  # fmt: skip
    json.dumps(doc)


CROWDED = (
    "p:c1 do_sys_openat2 ar=+0(%si):x8[8] w=+0(%si):u16[4] fn=+0(%si):ustring",
    "p:c2 do_sys_openat2 ar=+0(%si):u8[8] dfd=%di:s32",
    "p:c3 do_sys_openat2 q=+0(%dx):x64[3] fl=+0(%dx):x64",
    "p:c4 do_sys_openat2 s=+0(%si):s8[6] fn=+0(%si):string",
    "p:c5 do_sys_openat2 h=+0(%si):x16[4] c=$comm",
)
"""Five events with arrays on one address: their record program would not fit its cell."""


def test_auto_mode_stops_where_the_record_program_would_not_fit(vm: VM) -> None:
    """``auto`` falls back to stopping at each hit, and says why; ``record`` refuses
    before anything is placed."""
    plan = plan_events(vm, events(*CROWDED))
    with pytest.raises(KprobeError, match="over the 2,048 of its cell"):
        TraceSession(vm, plan, mode="record").start()
    assert not vm.kprobes.table, "a refused session placed nothing"
    session = TraceSession(vm, plan)
    with session:
        vm.run("cat /etc/hostname; true")
    assert not session.recorded and session.record_refused is not None
    assert session.record_refused.startswith("do_sys_openat2+0x0/0x")
    assert "kprobes/c1, kprobes/c2, kprobes/c3, kprobes/c4, kprobes/c5" in session.record_refused
    assert not session.handler_errors() and session.missed() == 0
    hits = [h for h in session.drain() if h.comm == "cat"]
    ours = [h for h in hits if args_of(h).get("fn") == b"/etc/hostname"]
    assert {h.event for h in ours} == {"c1", "c4"}, [h.line() for h in hits]
    c1 = next(h for h in ours if h.event == "c1")
    assert c1.line().endswith(
        ' ar={0x2f,0x65,0x74,0x63,0x2f,0x68,0x6f,0x73} w={25903,25460,26671,29551}'
        ' fn="/etc/hostname"'
    ), c1.line()


def test_count_only_counts_every_call(vm: VM) -> None:
    plan = plan_events(vm, events("p vfs_read", "r vfs_read"))
    session = TraceSession(vm, plan, count_only=True)
    with session:
        vm.run("for i in 1 2 3 4 5 6 7 8 9 10; do cat /proc/version >/dev/null; done")
    counts = [n for _, n in session.counts()]
    assert counts[0] >= 10  # each cat reads /proc/version at least once
    assert counts[1] <= counts[0] and counts[1] >= 10
    assert session.hits.empty()


def test_dry_run_plan_writes_nothing(vm: VM) -> None:
    addr = vm.symbols["do_sys_openat2"]
    before = vm.read(addr, 32)
    listed = vm.list_kprobes()
    plan = plan_events(vm, events(
        "p:open do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring",
        "r:openret do_sys_openat2 $retval",
    ))  # fmt: skip
    assert vm.read(addr, 32) == before
    assert vm.list_kprobes() == listed
    text = plan[0].describe()
    assert f"kprobes/open: kprobe at {addr:#018x} (do_sys_openat2+0x0/0x" in text
    # the guest's ftrace owns the entry NOP: the int3 displaces the instruction after it
    assert f"ftrace site: the int3 goes past the NOP, at {addr + 5:#018x}" in text
    assert "runs: slot: " in text
    assert "fetch dfd=%di:s32: reg di" in text
    assert "fetch filename=+0(%si):ustring: reg si -> user string at +0x0" in text
    assert "kretprobe" in plan[1].describe()


def _error(vm: VM, text: str) -> ProbeSyntaxError:
    with pytest.raises(ProbeSyntaxError) as info:
        plan_events(vm, events(text))
    return info.value


def test_registration_errors_as_the_kernel_logs_them(vm: VM) -> None:
    err = _error(vm, "p:x no_such_function_kprobevm")
    assert (err.code, err.position) == ("BAD_PROBE_ADDR", len("p:x "))
    # inside the 5-byte ftrace nop at the entry
    err = _error(vm, "p:x do_sys_openat2+1")
    assert (err.code, err.position) == ("BAD_INSN_BNDRY", len("p:x "))
    err = _error(vm, "r:x do_sys_openat2+5")
    assert err.code == "BAD_RETPROBE"
    # a blacklisted function: the kernel's register_kprobe() fails with -EINVAL
    entry = vm.blacklist().splitlines()[0].split("\t")[1]
    err = _error(vm, f"p:x {entry}")
    assert err.code == "FAIL_REG_PROBE", err


def test_event_registry_as_the_kernel_keeps_it(vm: VM) -> None:
    """A tracepoint's name is taken (EVENT_EXIST); two places under one name make one
    multi-probe event whose lines carry each place."""
    err = _error(vm, "p:sched/sched_switch do_sys_openat2")
    assert (err.code, err.position) == ("EVENT_EXIST", 0)
    with pytest.raises(ProbeSyntaxError) as info:
        plan_events(vm, events("p:g/e do_sys_openat2", "r:g/e do_sys_openat2"))
    assert info.value.code == "DIFF_PROBE_TYPE"
    hits = trace(
        vm, "cat /proc/version >/dev/null",
        "p:g/open do_sys_openat2 dfd=%di:s32", "p:g/open do_filp_open dfd=%di:s32",
    )  # fmt: skip
    places = {h.where.split("+")[0] for h in hits if h.event == "open" and h.comm == "cat"}
    assert places == {"do_sys_openat2", "do_filp_open"}, [h.line() for h in hits]


def test_boundary_check_reads_through_placed_probes(vm: VM) -> None:
    """A probe at a function's entry (an int3 just past its 5-byte NOP) does not hide
    the instruction boundaries after it from the next definition's check."""
    from kprobevm.kprobes.core import Kprobe

    entry = Kprobe(symbol_name="do_sys_openat2")
    vm.register_kprobe(entry)
    try:
        assert vm.read(vm.symbols["do_sys_openat2"] + 5, 1) in (b"\xcc", b"\xe9")
        [planned] = plan_events(vm, events("p:after do_sys_openat2+5"))
        assert planned.resolved.address == vm.symbols["do_sys_openat2"] + 5
        with pytest.raises(ProbeSyntaxError, match="BAD_INSN_BNDRY"):
            plan_events(vm, events("p:inside do_sys_openat2+2"))
    finally:
        vm.unregister_kprobe(entry)
