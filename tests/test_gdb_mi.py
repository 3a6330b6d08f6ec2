"""The gdb/MI adapters against a scripted fake gdb (no gdb, no QEMU).

The fake answers the MI commands the adapters send as gdb 13 does on QEMU's gdbstub,
with two vCPUs, a few registers and a little memory, and logs every command.
"""

from __future__ import annotations

import os
import select
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kprobevm.errors import GdbError, GdbErrorReply, GdbProtocolError
from kprobevm.gdbstub.gdbmi import GdbMiTransport
from kprobevm.gdbstub.gdbmi_client import GdbMiClient
from kprobevm.gdbstub.mi import BASE_SETTINGS
from kprobevm.gdbstub.packet import BreakpointKind, WatchHit

pytest.importorskip("pygdbmi")

FAKE_GDB = r'''
import os, re, sys

log = open(os.environ["FAKEGDB_LOG"], "a", buffering=1)
names = ["rax", "rbx", "", "rip", "eflags"]
remote = {0: 0, 1: 1, 3: 16, 4: 17}  # gdb number -> remote number
regs = {"1": [0x10, 0x11, 0, 0xFFF0, 0x2], "2": [0x20, 0x21, 0, 0xE05B, 0x46]}
ram = bytearray(range(256)) * 16  # virtual 0x1000..
phys = bytearray(b"\xaa") * 4096  # physical 0x2000..
state = {"connected": False, "phys": False, "current": "1", "running": False, "bp": 0}
breaks = {}

def emit(*lines):
    sys.stdout.write("".join(line + "\n" for line in lines) + "(gdb) \n")
    sys.stdout.flush()

def cstr(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

def stopped(reason, thread, extra=""):
    return f'*stopped,reason="{reason}",{extra}thread-id="{thread}",stopped-threads="all"'

def packet(p):
    if p.startswith("Qqemu.PhyMemMode:"):
        state["phys"] = p.endswith("1")
        return "OK"
    if p.startswith("m") and state["phys"]:
        addr, n = (int(x, 16) for x in p[1:].split(","))
        return phys[addr - 0x2000:addr - 0x2000 + n].hex()
    if p.startswith("M") and state["phys"]:
        head, data = p[1:].split(":")
        addr, n = (int(x, 16) for x in head.split(","))
        phys[addr - 0x2000:addr - 0x2000 + n] = bytes.fromhex(data)
        return "OK"
    return "E22"

def values(thread, nums):
    items = [f'{{number="{i}",value="{hex(v)}"}}' for i, v in enumerate(regs[thread])
             if names[i] and (not nums or i in nums)]
    return "^done,register-values=[" + ",".join(items) + "]"

def serve(token, cmd):
    m = re.match(r"(\S+)(?: --thread (\d+))?(.*)", cmd)
    op, thread, rest = m[1], m[2] or state["current"], m[3].strip()
    if op == "-gdb-set":
        if rest.startswith("scheduler-locking") and not state["connected"]:
            return emit(token + '^error,msg="Target \'None\' cannot support this command."')
        return emit(token + "^done")
    if op == "-target-select":
        state["connected"] = True
        return emit(token + "^connected")
    if op == "-data-list-register-names":
        return emit(token + "^done,register-names=[" + ",".join(f'"{n}"' for n in names) + "]")
    if op == "-interpreter-exec":
        cli = rest[len('console "'):-1]
        if cli == "maint print remote-registers":
            lines = ["Name Nr Rmt Nr g/G Offset\n"] + [
                f"{names[g]:<5}{g:<3}{r:>6} {8 * g}\n" for g, r in remote.items()]
            return emit(*("~" + cstr(x) for x in lines), token + "^done")
        if cli.startswith("maint packet "):
            p = cli[len("maint packet "):]
            return emit("~" + cstr(f'sending: "{p}"\n'),
                        "~" + cstr(f'received: "{packet(p)}"\n'), token + "^done")
        return emit(token + "^done")
    if op == "-thread-info":
        return emit(token + '^done,threads=[{id="1",target-id="Thread 1.1 (CPU#0)"},'
                    '{id="2",target-id="Thread 1.2 (CPU#1)"}],current-thread-id="1"')
    if op == "-thread-select":
        state["current"] = rest
        return emit(token + "^done")
    if op == "-data-list-register-values":
        nums = [int(x) for x in rest.replace("--skip-unavailable", "").split()[1:]]
        return emit(token + values(thread, nums))
    if op == "-data-write-register-values":
        words = rest.split()[1:]
        for num, value in zip(words[::2], words[1::2]):
            regs[thread][int(num)] = int(value, 16)
        return emit(token + "^done")
    if op == "-data-read-memory-bytes":
        addr, n = (int(x, 0) for x in rest.split())
        if not 0x1000 <= addr < addr + n <= 0x1000 + len(ram):
            return emit(token + f'^error,msg="Unable to read memory at {addr:#x}."')
        data = ram[addr - 0x1000:addr - 0x1000 + n].hex()
        return emit(token + f'^done,memory=[{{begin="{addr:#x}",offset="0x0",'
                    f'end="{addr + n:#x}",contents="{data}"}}]')
    if op == "-data-write-memory-bytes":
        addr, data = rest.split()
        addr = int(addr, 0)
        ram[addr - 0x1000:addr - 0x1000 + len(data) // 2] = bytes.fromhex(data)
        return emit(token + "^done")
    if op in ("-break-insert", "-break-watch"):
        state["bp"] += 1
        number = str(state["bp"])
        addr = re.search(r"0x[0-9a-f]+", rest)[0]
        breaks[number] = addr
        if op == "-break-insert":
            return emit(token + f'^done,bkpt={{number="{number}",type="breakpoint",addr="{addr}"}}')
        key = {"-a": "hw-awpt", "-r": "hw-rwpt"}.get(rest.split()[0], "wpt")
        return emit(token + f'^done,{key}={{number="{number}",exp="{rest}"}}')
    if op == "-break-list":
        body = ",".join(f'bkpt={{number="{n}",addr="{a}"}}' for n, a in breaks.items())
        return emit(token + f'^done,BreakpointTable={{nr_rows="{len(breaks)}",body=[{body}]}}')
    if op == "-break-delete":
        for number in rest.split():
            breaks.pop(number)
        return emit(token + "^done")
    if op == "-exec-continue":
        state["running"] = True
        out = [token + "^running", '*running,thread-id="all"']
        watch = next((n for n, a in breaks.items() if a == "0x1234"), None)
        if watch is not None:  # the guest hits the watched byte at once
            state["running"] = False
            out.append(stopped("access-watchpoint-trigger", "2",
                               f'hw-awpt={{number="{watch}",exp="x"}},value={{new="1"}},'))
        return emit(*out)
    if op == "-exec-step-instruction":
        return emit(token + "^running", '*running,thread-id="all"',
                    stopped("end-stepping-range", thread))
    if op == "-exec-interrupt":
        if not state["running"]:
            return emit(token + '^error,msg="The program is not being run."')
        state["running"] = False
        return emit(token + "^done", stopped("signal-received", "1",
                                             'signal-name="SIGINT",'))
    if op == "-target-detach":
        return emit(token + "^done")
    if op == "-gdb-exit":
        emit(token + "^exit")
        sys.exit(0)
    emit(token + f'^error,msg="Undefined MI command: {op}"')

for line in sys.stdin:
    m = re.match(r"(\d*)(.*)", line.rstrip("\n"))
    log.write(m[2] + "\n")
    serve(m[1], m[2])
'''


@pytest.fixture
def fake_gdb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An executable fake gdb, and the log of the MI commands it was sent."""
    gdb = tmp_path / "gdb"
    gdb.write_text(f"#!{sys.executable}\n{FAKE_GDB}")
    gdb.chmod(gdb.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "commands.log"
    monkeypatch.setenv("FAKEGDB_LOG", os.fspath(log))
    yield os.fspath(gdb), log


def sent(log: Path) -> list[str]:
    return log.read_text().splitlines()


def test_client_setup_registers_and_register_packets(fake_gdb: tuple[str, Path]) -> None:
    gdb, log = fake_gdb
    with GdbMiClient(tmp_sock(), gdb=gdb, timeout=5.0) as c:
        cmds = sent(log)
        # scheduler-locking only once connected: gdb refuses it before
        assert cmds.index("-gdb-set scheduler-locking step") > cmds.index(
            "-target-select remote /tmp/fake.sock")
        assert c.threads() == ["p01.01", "p01.02"]
        assert c.read_registers() == {"rax": 0x10, "rbx": 0x11, "rip": 0xFFF0, "eflags": 0x2}
        assert c.read_registers("p01.02", wide=False)["rip"] == 0xE05B
        assert sent(log)[-1] == "-data-list-register-values --thread 2 --skip-unavailable x 0 1 3 4"
        assert c.read_register("rip", thread="p01.02") == 0xE05B
        assert c.read_register_each("rax", ["p01.01", "p01.02"]) == {"p01.01": 0x10,
                                                                     "p01.02": 0x20}
        # P packets in remote numbering; the pipeline writes them through gdb itself
        packets = c.register_write_packets({"rip": 0x1234}, thread="p01.02")
        assert packets == [b"P10=3412000000000000"]
        assert c.pipeline(packets) == [b"OK"]
        assert sent(log)[-1] == "-data-write-register-values x 3 0x1234"
        assert c.read_register("rip", thread="p01.02") == 0x1234
        values, rips = c.read_registers_and_each("rip", ["p01.01", "p01.02"], "p01.02")
        assert values["rip"] == 0x1234 and rips == {"p01.01": 0xFFF0, "p01.02": 0x1234}
        assert c.read_along([b"Qqemu.PhyMemMode:0"], "p01.02") == [b"OK"]
        assert c.write_registers({"rax": 5, "rbx": 6}) == 2
        values, replies = c.read_registers_along([b"Qqemu.PhyMemMode:0"], "p01.02")
        assert values["rax"] == 5 and replies == [b"OK"]
        with pytest.raises(GdbError, match="no register"):
            c.read_register("xmm9")


def test_client_memory_virtual_and_physical(fake_gdb: tuple[str, Path]) -> None:
    gdb, log = fake_gdb
    with GdbMiClient(tmp_sock(), gdb=gdb, timeout=5.0) as c:
        assert c.read_memory(0x1010, 4) == bytes([0x10, 0x11, 0x12, 0x13])
        c.write_memory(0x1010, b"hey", thread="p01.02")
        assert c.read_memory(0x1010, 4) == b"hey\x13"
        with pytest.raises(GdbErrorReply) as exc:
            c.read_memory(0x900000, 8)
        assert exc.value.code == 0x0E
        assert c.read_phys(0x23FE, 4) == b"\xaa" * 4
        c.write_phys(0x2000, b"\x01\x02")
        assert c.read_phys(0x2000, 3) == b"\x01\x02\xaa"
        raw = [x for x in sent(log) if "maint packet" in x]
        assert raw[:4] == ['-interpreter-exec console "maint packet Qqemu.PhyMemMode:1"',
                           '-interpreter-exec console "maint packet m23fe,2"',
                           '-interpreter-exec console "maint packet m2400,2"',
                           '-interpreter-exec console "maint packet Qqemu.PhyMemMode:0"']
        assert c.phys_mode is False and c.mode_packets(False) == []
        assert c.memory_write_packets(0x3FF, b"\x01\x02") == [b"M3ff,1:01", b"M400,1:02"]


def test_client_watchpoint_stops_interrupt_and_step(fake_gdb: tuple[str, Path]) -> None:
    gdb, log = fake_gdb
    with GdbMiClient(tmp_sock(), gdb=gdb, timeout=5.0) as c:
        c.insert_breakpoint(BreakpointKind.WRITE_WATCH, 0x1234, 1)
        assert sent(log)[-1] == '-break-watch -a "*(char *)0x1234"'  # awatch: see module
        c.cont()
        assert c.running
        if not c.stop_buffered:  # the stop follows ^running, perhaps in the same read
            select.select([c.fileno()], [], [], 5.0)
        stop = c.poll_stop()
        assert stop is not None and not c.running and not c.stop_buffered
        assert stop.watch == WatchHit("watch", 0x1234) and stop.thread == "p01.02"
        c.cont()  # the guest hits the watchpoint again at once
        with pytest.raises(GdbError, match="running"):
            c.cont()
        stop = c.interrupt()  # the stop that raced the interrupt: no -exec-interrupt
        assert stop is not None and stop.watch is not None
        assert "-exec-interrupt" not in sent(log)
        c.remove_breakpoint(BreakpointKind.WRITE_WATCH, 0x1234, 1)
        with pytest.raises(GdbErrorReply):
            c.remove_breakpoint(BreakpointKind.WRITE_WATCH, 0x1234, 1)
        c.cont()
        assert c.poll_stop() is None and c.running
        stop = c.interrupt()
        assert stop is not None and stop.signal == 2 and stop.thread == "p01.01"
        assert c.interrupt() is None  # stopped: nothing sent
        stop = c.step("p01.02")
        assert stop is not None and stop.thread == "p01.02" and not c.running
        assert sent(log)[-1] == "-exec-step-instruction --thread 2"
        c.detach()
        assert c.closed and sent(log)[-1] == "-target-detach"


def test_errors_name_the_command(fake_gdb: tuple[str, Path]) -> None:
    gdb, _ = fake_gdb
    with GdbMiClient(tmp_sock(), gdb=gdb, timeout=5.0) as c:
        with pytest.raises(GdbProtocolError, match="Undefined MI command") as exc:
            c.command("-no-such-thing")
        assert exc.value.sent == b"-no-such-thing"
        with pytest.raises(GdbError, match="cannot be queued"):
            c.mode_packets(True)
    assert c.closed
    with pytest.raises(GdbError):
        c.command("-thread-info")


def test_transport_as_a_user_drives_gdb(fake_gdb: tuple[str, Path]) -> None:
    gdb, log = fake_gdb
    with GdbMiTransport(tmp_sock(), gdb=gdb, timeout=5.0) as mi:
        assert sent(log)[:len(BASE_SETTINGS)] == [f"-gdb-set {s}" for s in BASE_SETTINGS]
        assert "-gdb-set scheduler-locking step" not in sent(log)
        assert mi.read_registers()["rip"] == 0xFFF0 and mi.read_register("rbx") == 0x11
        mi.write_memory(0x1000, b"GDB")
        assert mi.read_memory(0x1000, 4) == b"GDB\x03"
        mi.insert_breakpoint(BreakpointKind.HARDWARE, 0xFFFF0)
        assert sent(log)[-1] == "-break-insert -h *0xffff0"
        mi.insert_breakpoint(BreakpointKind.WRITE_WATCH, 0x2000, 4)
        assert sent(log)[-1] == '-break-watch "*(int *)0x2000"'  # gdb's own watch
        mi.remove_breakpoint(BreakpointKind.HARDWARE, 0xFFFF0)
        assert sent(log)[-1] == "-break-delete 1"
        with pytest.raises(GdbError, match="no gdb breakpoint"):
            mi.remove_breakpoint(BreakpointKind.HARDWARE, 0xFFFF0)
        mi.cont()
        stop = mi.interrupt()
        assert stop is not None and stop.signal == 2 and stop.thread == "1"
        assert not mi.running


def tmp_sock() -> Path:
    """The address the fake gdb is told to connect to (it connects nowhere)."""
    return Path("/tmp/fake.sock")
