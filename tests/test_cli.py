"""The ``kprobevm`` command: usage errors need no guest; one real ``trace --boot`` run and one
``count --boot`` run check what users see."""

from __future__ import annotations

import json
import time
from typing import NoReturn

import pytest

from kprobevm import cli
from kprobevm.errors import VMLaunchFailure
from kprobevm.gdbstub.transport import parse_gdb_address
from kprobevm.tracing.hits import HitContext
from kprobevm.tracing.session import check_definitions


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_definition_exits_1_with_the_kernel_error_and_caret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.monotonic()
    code, out, err = run(
        capsys, "trace", "--boot", "p:open do_sys_openat2 filename=+0(%si):strin", "--", "true"
    )
    assert time.monotonic() - started < 5, "parse errors come before any boot"
    assert code == cli.EXIT_USAGE and out == ""
    lines = err.splitlines()
    assert lines[0] == "kprobevm trace: error: BAD_TYPE: Unknown type is specified"
    assert lines[1] == "  Command: p:open do_sys_openat2 filename=+0(%si):strin"
    # the kernel marks the type
    assert lines[2].index("^") == lines[1].index("strin")


def test_bad_fetch_arg(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "count", "--boot", "p:x vfs_read a=%rax")
    assert code == cli.EXIT_USAGE
    assert "BAD_REG_NAME" in err
    lines = err.splitlines()
    assert lines[2].index("^") == lines[1].index("%rax")


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "trace", "p vfs_read")[0] == cli.EXIT_USAGE  # no --boot/--attach
    code, _, err = run(capsys, "trace", "--boot")
    assert code == cli.EXIT_USAGE and "no probe definitions" in err
    # a deletion means nothing to a new session: refused (as an unknown option when first)
    assert run(capsys, "trace", "--boot", "-:myprobe")[0] == cli.EXIT_USAGE
    events, notes = check_definitions(["p:a vfs_read", "-:myprobe"])
    assert [e.event for e in events] == ["a"] and "no events to delete" in notes[0]
    assert run(capsys, "--help")[0] == cli.EXIT_OK
    code, out, _ = run(capsys, "trace", "--help")
    assert code == cli.EXIT_OK and "host monotonic" in out and ":ustring" in out
    assert "guest's TSC" in out and "--mode" in out
    code, _, err = run(capsys, "trace", "--boot", "--string-size", "0", "p vfs_read")
    assert code == cli.EXIT_USAGE and "--string-size 0" in err


def test_exit_status_of_a_handler_error_is_its_own_and_documented(
    capsys: pytest.CaptureFixture[str],
) -> None:
    codes = [cli.EXIT_OK, cli.EXIT_USAGE, cli.EXIT_VM, cli.EXIT_HANDLER]
    assert len(set(codes)) == len(codes)
    for sub in ("trace", "count"):
        code, out, _ = run(capsys, sub, "--help")
        assert code == cli.EXIT_OK and f"{cli.EXIT_HANDLER} a probe handler raised" in out


def test_recover_of_a_missing_journal_is_a_vm_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "recover", "/nonexistent/kprobevm.journal")
    assert code == cli.EXIT_VM and "recover" in err


def test_addresses_and_count_words() -> None:
    assert parse_gdb_address("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_gdb_address(":1234") == ("127.0.0.1", 1234)
    assert parse_gdb_address("/tmp/gdb.sock") == "/tmp/gdb.sock"
    assert cli._count_definition("vfs_read") == "p vfs_read"
    assert cli._count_definition("vfs_read%return") == "p vfs_read%return"
    assert cli._count_definition("r:rd vfs_read") == "r:rd vfs_read"
    assert cli._split_command(["p a", "--", "cat", "x"]) == (["p a"], ["cat", "x"])


BOOTING = [
    ["run", "--", "true"],
    ["boot"],
    ["trace", "--boot", "p vfs_read"],
    ["count", "--boot", "vfs_read"],
    ["list", "--boot"],
    ["blacklist", "--boot", "vfs_read"],
]


@pytest.mark.parametrize("argv", BOOTING, ids=lambda argv: argv[0])
def test_qemu_option_reaches_boot(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that boots takes --qemu and hands it to boot(); without it, None
    (so that boot() consults $KPROBEVM_QEMU)."""
    from kprobevm.guest import launcher

    seen: list[dict[str, object]] = []

    def fake_boot(*args: object, **kwargs: object) -> NoReturn:
        seen.append(kwargs)
        raise VMLaunchFailure("not booting in this test")

    monkeypatch.setattr(launcher, "boot", fake_boot)
    sub, rest = argv[0], argv[1:]
    code, _, err = run(capsys, sub, "--qemu", "/opt/qemu/bin/qemu-system-x86_64", *rest)
    assert code == cli.EXIT_VM and "not booting in this test" in err
    code, _, _ = run(capsys, *argv)
    assert code == cli.EXIT_VM
    assert [kw["qemu"] for kw in seen] == ["/opt/qemu/bin/qemu-system-x86_64", None]


@pytest.mark.parametrize("argv", BOOTING, ids=lambda argv: argv[0])
def test_kaslr_and_cpu_reach_boot(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that boots takes --kaslr and --cpu; without them boot() gets nokaslr
    and the default CPU."""
    from kprobevm.guest import launcher

    seen: list[dict[str, object]] = []

    def fake_boot(*args: object, **kwargs: object) -> NoReturn:
        seen.append(kwargs)
        raise VMLaunchFailure("not booting in this test")

    monkeypatch.setattr(launcher, "boot", fake_boot)
    sub, rest = argv[0], argv[1:]
    assert run(capsys, sub, "--kaslr", "--cpu", launcher.LA57_CPU, *rest)[0] == cli.EXIT_VM
    assert run(capsys, *argv)[0] == cli.EXIT_VM
    assert [(kw["kaslr"], kw["cpu"]) for kw in seen] == [
        (True, launcher.LA57_CPU), (False, launcher.DEFAULT_CPU)]  # fmt: skip


@pytest.mark.vm
def test_trace_boot_json(capsys: pytest.CaptureFixture[str]) -> None:
    """The real thing, end to end: boot, place, run, print JSON lines, remove, power off."""
    code, out, err = run(
        capsys, "trace", "--boot", "--json",
        "p:open do_sys_openat2 dfd=%di:s32 filename=+0(%si):ustring",
        "r:openret do_sys_openat2 ret=$retval:s32",
        "--", "cat /etc/hostname; cat /nonexistent; true",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs, err
    opens = [d for d in docs if d["event"] == "open" and d["comm"] == "cat"]
    assert {"/etc/hostname", "/nonexistent"} <= {d["args"]["filename"] for d in opens}, out
    first = opens[0]
    assert set(first) == {"event", "group", "probe", "comm", "pid", "cpu", "timestamp",
                          "timestamp_ns", "args"}  # fmt: skip
    assert first["group"] == "kprobes" and first["probe"].startswith("do_sys_openat2+0x0/0x")
    rets = [d for d in docs if d["event"] == "openret" and d["comm"] == "cat"]
    assert any(d["args"]["ret"] == -2 for d in rets) and rets[0]["function"] == "do_sys_openat2"
    assert "No such file" in err  # CMD's output goes to stderr
    assert "probes removed" in err


@pytest.mark.vm
def test_count_boot(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "count", "--boot", "do_sys_openat2", "r:rd vfs_read",
        "--", "for i in 1 2 3 4 5; do cat /proc/version; done >/dev/null",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    lines = out.splitlines()
    assert len(lines) == 2, out
    counts = {}
    for line in lines:
        key, _, n = line.partition(": ")
        assert key.startswith("@[") and key.endswith("]"), line
        counts[key[2:-1]] = int(n)
    assert counts["do_sys_openat2"] >= 5 and counts["rd"] >= 5
    assert [int(line.split(": ")[1]) for line in lines] == sorted(counts.values())


@pytest.mark.vm
def test_record_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """--mode record counts in the guest, and refuses to count a return probe (the guest
    counts entries) as a usage error."""
    code, out, err = run(
        capsys, "count", "--boot", "--mode", "record", "do_sys_openat2",
        "--", "for i in 1 2 3 4 5; do cat /proc/version; done >/dev/null",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    assert int(out.split(": ")[1]) >= 5, out
    code, _, err = run(
        capsys, "count", "--boot", "--mode", "record", "r:or do_sys_openat2", "--", "true"
    )
    assert code == cli.EXIT_USAGE and "is a return probe" in err, err


@pytest.mark.vm
def test_a_handler_that_raises_exits_3(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A return probe's handler that raises is reported on stderr and makes trace exit 3,
    while the other event's hits print as ever.

    No fetch argument of the language raises (a read that fails prints (fault)), so the
    bug is put into the return value's fetch: the guest, the engine catching it on the
    trap thread and the session collecting it after the probes are removed are all real.
    """

    def broken(self: HitContext) -> int:
        raise RuntimeError("retval is broken")

    monkeypatch.setattr(HitContext, "retval", broken)
    code, out, err = run(
        capsys, "trace", "--boot", "--json",
        "p:open do_sys_openat2 dfd=%di:s32",
        "r:openret do_sys_openat2 ret=$retval:s32",
        "--", "cat /etc/hostname",
    )  # fmt: skip
    assert code == cli.EXIT_HANDLER, err
    assert "handler error: RuntimeError: retval is broken" in err
    docs = [json.loads(line) for line in out.splitlines()]
    assert any(d["event"] == "open" and d["comm"] == "cat" for d in docs), out
    assert not any(d["event"] == "openret" for d in docs), out
    assert "probes removed" in err


@pytest.mark.vm
def test_auto_mode_says_why_it_stops(capsys: pytest.CaptureFixture[str]) -> None:
    """Events whose record program would not fit its cell are traced stopping at each
    hit, and stderr says why."""
    from tests.test_trace import CROWDED

    code, out, err = run(capsys, "trace", "--boot", *CROWDED, "--", "cat /etc/hostname")
    assert code == cli.EXIT_OK, err
    assert "kprobevm: not recorded, stopping at each hit: do_sys_openat2+0x0/0x" in err, err
    assert "over the 2,048 of its cell" in err
    assert any(": c1: " in line and 'fn="/etc/hostname"' in line for line in out.splitlines())


@pytest.mark.vm
def test_count_by_and_hist_boot(capsys: pytest.CaptureFixture[str]) -> None:
    """``count --by comm``: dd's 300 reads under its comm, ``@[FUNC, KEY]: N`` ascending;
    ``hist --linear --json`` on 2 vCPUs: bs=5 reads in the [5, 6) bucket, the CPUs'
    regions summed; both counted in the guest."""
    code, out, err = run(
        capsys, "count", "--boot", "--by", "comm", "vfs_read",
        "--", "dd if=/dev/zero of=/dev/null bs=1 count=300 2>/dev/null",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    counts = [(line.partition(": ")[0], int(line.partition(": ")[2])) for line in out.splitlines()]
    assert ("@[vfs_read, dd]", 300) in counts, out
    assert [n for _, n in counts] == sorted(n for _, n in counts)
    code, out, err = run(
        capsys, "hist", "--boot", "--smp", "2", "--json", "--field", "count", "--linear", "0,10,1",
        "p:rd vfs_read count=%dx:u64",
        "--", "dd if=/dev/zero of=/dev/null bs=5 count=200 2>/dev/null",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    doc = json.loads(out)
    assert doc["map"] == "rd" and doc["kind"] == "lhist" and doc["dropped"] == 0
    assert {"lo": 5, "hi": 6, "count": 200} in doc["buckets"], doc
    assert doc["total"] == sum(b["count"] for b in doc["buckets"]) == sum(doc["per_cpu"])
    assert len(doc["per_cpu"]) == 2  # a region per vCPU


def test_hist_bad_input_needs_no_guest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "hist", "--boot", "--field", "n", "--linear", "5,1,1", "p x")
    assert code == cli.EXIT_USAGE and "needs MIN < MAX" in err, err
    code, _, err = run(capsys, "count", "--boot", "--by", "stack", "--stack-depth", "0", "vfs_read")
    assert code == cli.EXIT_USAGE and "0 frames: 1..64" in err, err


@pytest.mark.vm
def test_count_by_stack_boot(capsys: pytest.CaptureFixture[str]) -> None:
    """``count --by stack``: dd's reads under their stack as bpftrace prints ``@[kstack]``
    (the probe's address + 1 first, then the callers), ascending; ``--json``: the frames in
    ``stack``, no cut; ``--stack-depth 2``: the same stack cut after two frames, and said."""
    dd = "dd if=/dev/zero of=/dev/null bs=1 count=300 2>/dev/null"
    code, out, err = run(capsys, "count", "--boot", "--by", "stack", "vfs_read", "--", dd)
    assert code == cli.EXIT_OK, err
    blocks = out.split("]: ")
    assert out.startswith("@[\n        vfs_read+1\n        ksys_read+"), out
    counts = [int(b.split("\n", 1)[0]) for b in blocks[1:]]
    assert counts == sorted(counts) and counts[-1] >= 300, out
    assert "        entry_SYSCALL_64_after_hwframe+" in out and "[stack cut" not in out, out
    code, out, err = run(capsys, "count", "--boot", "--json", "--by", "stack", "--stack-depth",
                         "2", "vfs_read", "--", dd)  # fmt: skip
    assert code == cli.EXIT_OK, err
    docs = [json.loads(line) for line in out.splitlines()]
    top = docs[-1]
    assert top["probe"] == "vfs_read" and top["by"] == "stack" and top["count"] >= 300, docs
    assert top["stack"][0] == "vfs_read+1" and top["stack"][1].startswith("ksys_read+"), top
    assert len(top["stack"]) == 2 and top["cut"] == "deeper than the key's frames", top


@pytest.mark.vm
def test_funclatency_boot_on_two_vcpus(capsys: pytest.CaptureFixture[str]) -> None:
    """``funclatency --json`` on 2 vCPUs: five 10 ms sleeps, each timed from entry to
    return in the guest (a sleeper may wake on the other vCPU), all in [8M, 16M) ns."""
    code, out, err = run(
        capsys, "funclatency", "--boot", "--smp", "2", "--json", "hrtimer_nanosleep",
        "--", "for i in 1 2 3 4 5; do sleep 0.01; done",
    )  # fmt: skip
    assert code == cli.EXIT_OK, err
    doc = json.loads(out)
    assert doc["map"] == "nsecs[hrtimer_nanosleep]" and doc["unit"] == "ns", doc
    assert doc["buckets"] == [{"lo": 8 << 20, "hi": 16 << 20, "count": 5}], doc
    assert doc["missed"] == 0 and doc["maxactive"] >= 10 and len(doc["per_cpu"]) == 2


def test_funclatency_bad_input_needs_no_guest(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "funclatency", "--boot", "--maxactive", "-1", "vfs_read")
    assert code == cli.EXIT_USAGE and "--maxactive -1: 0 or more" in err, err
    code, _, err = run(capsys, "funclatency", "--boot", "vfs_read", "vfs_write")
    assert code == cli.EXIT_USAGE and "give one function" in err, err
    code, _, err = run(capsys, "funclatency", "--boot", "--unit", "s", "vfs_read")
    assert code == cli.EXIT_USAGE and "invalid choice: 's'" in err, err
