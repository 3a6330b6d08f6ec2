"""Btf: the .BTF reader on synthetic type sections (and on the real vmlinux when cached)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kprobevm.gdbstub.client import GdbClient
from kprobevm.guest.vm import VM
from kprobevm.kernel.btf import (
    BTF_MAGIC,
    Btf,
    BtfError,
    BtfKind,
    current_task_location,
)
from kprobevm.kernel.kallsyms import KernelSymbols


class BtfBuilder:
    """Writes BTF the way pahole does (little-endian), so tests describe types in Python."""

    def __init__(self) -> None:
        self.strings = bytearray(b"\0")
        self.types: list[bytes] = []

    def s(self, name: str) -> int:
        if not name:
            return 0
        off = len(self.strings)
        self.strings += name.encode() + b"\0"
        return off

    def add(
        self,
        kind: BtfKind,
        name: str,
        size_or_type: int,
        vlen: int = 0,
        kflag: bool = False,
        trailer: bytes = b"",
    ) -> int:
        info = (int(kflag) << 31) | (int(kind) << 24) | vlen
        self.types.append(struct.pack("<III", self.s(name), info, size_or_type) + trailer)
        return len(self.types)

    def int_(self, name: str, size: int) -> int:
        return self.add(BtfKind.INT, name, size, trailer=struct.pack("<I", size * 8))

    def struct(
        self,
        kind: BtfKind,
        name: str,
        size: int,
        members: list[tuple[str, int, int, int]],
        kflag: bool = False,
    ) -> int:
        body = b""
        for mname, mtype, bit_off, bits in members:
            word = (bits << 24) | bit_off if kflag else bit_off
            body += struct.pack("<III", self.s(mname), mtype, word)
        return self.add(kind, name, size, len(members), kflag, body)

    def array(self, elem: int, index: int, n: int) -> int:
        return self.add(BtfKind.ARRAY, "", 0, trailer=struct.pack("<III", elem, index, n))

    def build(self) -> bytes:
        types = b"".join(self.types)
        hdr = struct.pack(
            "<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(self.strings)
        )
        return hdr + types + bytes(self.strings)


def task_btf() -> bytes:
    """A cut-down task_struct with the shapes the kernel uses: typedefs, anonymous unions,
    bitfields (kind_flag), arrays, pointers, FWD, const, a per-CPU DATASEC."""
    b = BtfBuilder()
    i32 = b.int_("int", 4)
    char = b.int_("char", 1)
    u32 = b.int_("unsigned int", 4)
    pid_t = b.add(BtfKind.TYPEDEF, "pid_t", i32)
    const_pid = b.add(BtfKind.CONST, "", pid_t)
    comm = b.array(char, i32, 16)
    fwd = b.add(BtfKind.FWD, "task_struct", 0)
    ptr_task = b.add(BtfKind.PTR, "", fwd)
    inner = b.struct(BtfKind.STRUCT, "", 8, [("pid", pid_t, 0, 0), ("tgid", const_pid, 32, 0)])
    anon_union = b.struct(BtfKind.UNION, "", 8, [("", inner, 0, 0), ("both", i32, 0, 0)])
    flags = b.struct(
        BtfKind.STRUCT,
        "",
        4,
        [("in_execve", u32, 0, 1), ("in_iowait", u32, 1, 1), ("brk", u32, 8, 8)],
        kflag=True,
    )
    task = b.struct(
        BtfKind.STRUCT,
        "task_struct",
        64,
        [
            ("__state", u32, 0, 0),
            ("", flags, 32, 0),
            ("", anon_union, 64, 0),
            ("real_parent", ptr_task, 128, 0),
            ("comm", comm, 192, 0),
        ],
    )
    hot = b.struct(
        BtfKind.STRUCT,
        "pcpu_hot",
        16,
        [("current_task", b.add(BtfKind.PTR, "", task), 0, 0), ("cpu", i32, 64, 0)],
    )
    var = b.add(BtfKind.VAR, "pcpu_hot", hot, trailer=struct.pack("<I", 1))
    b.add(
        BtfKind.DATASEC, ".data..percpu", 0x20000, 1, trailer=struct.pack("<III", var, 0x1F300, 16)
    )
    b.add(BtfKind.ENUM, "e", 4, 2, trailer=struct.pack("<IiIi", b.s("A"), 0, b.s("B"), 1))
    b.add(BtfKind.ENUM64, "e64", 8, 1, trailer=struct.pack("<III", b.s("C"), 1, 2))
    proto = b.add(BtfKind.FUNC_PROTO, "", i32, 1, trailer=struct.pack("<II", b.s("x"), i32))
    func = b.add(BtfKind.FUNC, "do_sys_openat2", proto, 1)
    b.add(BtfKind.DECL_TAG, "tag", func, trailer=struct.pack("<i", -1))
    b.add(BtfKind.TYPE_TAG, "user", i32)
    b.add(BtfKind.FLOAT, "double", 8)
    return b.build()


def test_member_offsets_through_anonymous_unions_and_structs() -> None:
    btf = Btf(task_btf())
    assert btf.struct_member_offset("task_struct", "__state") == 0
    assert btf.struct_member_offset("task_struct", "pid") == 8
    assert btf.struct_member_offset("task_struct", "tgid") == 12
    assert btf.struct_member_offset("task_struct", "both") == 8
    assert btf.struct_member_offset("task_struct", "real_parent") == 16
    assert btf.struct_member_offset("task_struct", "comm") == 24
    assert btf.struct_member_offset("pcpu_hot", "cpu") == 8


def test_bitfields_with_kind_flag() -> None:
    btf = Btf(task_btf())
    m = btf.member("task_struct", "in_iowait")
    assert (m.bit_offset, m.bitfield_size) == (33, 1)
    brk = btf.member("task_struct", "brk")
    assert (brk.bit_offset, brk.bitfield_size, brk.offset) == (40, 8, 5)
    with pytest.raises(BtfError, match="bitfield"):
        btf.struct_member_offset("task_struct", "in_execve")


def test_types_sizes_and_names() -> None:
    btf = Btf(task_btf())
    assert btf.type_size("task_struct") == 64
    assert btf.type_size("pid_t") == 4
    comm = btf.member_type("task_struct", "comm")
    assert btf.type_size(comm.id) == 16
    assert btf.type_name(comm.id) == "char[16]"
    assert btf.type_name(btf.member_type("task_struct", "tgid").id) == "const pid_t"
    assert btf.type_name(btf.member_type("task_struct", "real_parent").id) == "struct task_struct *"
    # A forward declaration never hides the complete struct.
    assert btf.find("task_struct").kind == BtfKind.STRUCT
    assert btf.find("do_sys_openat2").kind == BtfKind.FUNC


def test_missing_things_are_errors() -> None:
    btf = Btf(task_btf())
    with pytest.raises(BtfError, match="no member 'nope'"):
        btf.struct_member_offset("task_struct", "nope")
    with pytest.raises(BtfError, match="no BTF type"):
        btf.struct_member_offset("mm_struct", "pgd")
    with pytest.raises(BtfError, match="no BTF variable"):
        btf.find_var("current_task")


def test_percpu_variable_and_current_task_location() -> None:
    btf = Btf(task_btf())
    var = btf.find_var("pcpu_hot")
    assert (var.section, var.offset, var.size) == (".data..percpu", 0x1F300, 16)
    loc = current_task_location(None, btf)
    assert (loc.variable, loc.percpu_offset, loc.member_offset) == ("pcpu_hot", 0x1F300, 0)
    # kallsyms, when given, is the per-CPU offset's source.
    syms = KernelSymbols.from_text("000000000001f300 D pcpu_hot\nffffffff81000000 T _text\n")
    assert current_task_location(syms, btf).offset == 0x1F300


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"\xeb\x9f" + d[2:], "big-endian"),
        (lambda d: d[:2] + b"\x02" + d[3:], "version"),
        (lambda d: d[:10], "shorter than its header"),
        (lambda d: d[:-40], "overrun"),
    ],
)
def test_malformed_btf(mutate: object, message: str) -> None:
    data = task_btf()
    with pytest.raises(BtfError, match=message):
        Btf(mutate(data))  # type: ignore[operator]


def test_unknown_kind_is_refused() -> None:
    b = BtfBuilder()
    b.add(BtfKind.INT, "int", 4, trailer=struct.pack("<I", 32))
    b.types.append(struct.pack("<III", 0, 25 << 24, 0))
    with pytest.raises(BtfError, match="unknown BTF kind 25"):
        Btf(b.build())


def _default_vmlinux() -> Path | None:
    from kprobevm.guest.image import cache_dir

    found = sorted(cache_dir().glob("images/*/vmlinux"))
    return found[-1] if found else None


@pytest.mark.skipif(_default_vmlinux() is None, reason="default guest image not built")
def test_real_vmlinux_task_struct() -> None:
    from kprobevm.kernel.vmlinux import Vmlinux

    path = _default_vmlinux()
    assert path is not None
    with Vmlinux(path) as vm:
        btf = Btf.from_vmlinux(vm)
    comm = btf.member("task_struct", "comm")
    assert btf.type_name(comm.type_id) == "char[16]"
    pid = btf.struct_member_offset("task_struct", "pid")
    assert btf.struct_member_offset("task_struct", "tgid") == pid + 4
    assert btf.type_size("task_struct") > comm.offset
    loc = current_task_location(None, btf)
    assert loc.variable in ("pcpu_hot", "current_task")


@pytest.mark.vm
def test_current_task_read_from_the_host(vm: VM) -> None:
    """current_task_location() + GS base + task_struct offsets name the running task.

    An idle guest stopped from outside is almost always in its idle task, ``swapper/0``
    (pid 0); any other task must have a printable name and a positive pid.
    """
    assert vm.vmlinux is not None
    btf = Btf.from_vmlinux(vm.vmlinux)
    loc = current_task_location(vm.symbols, btf)
    comm_off = btf.struct_member_offset("task_struct", "comm")
    pid_off = btf.struct_member_offset("task_struct", "pid")
    with vm.target.stopped() as client:
        assert isinstance(client, GdbClient)  # the register layout is the RSP client's
        layout = client.layout
        # QEMU 7.2's register XML has no IDTR/GDTR (why kaslr reads the IDT at its alias).
        assert "idtr" not in layout.names
        regs = client.read_registers()
        # In user mode the kernel's GS base sits in KERNEL_GS_BASE until swapgs.
        gs = regs["gs_base"] if regs["cs"] & 3 == 0 else regs["k_gs_base"]
        task = int.from_bytes(vm.read(gs + loc.offset, 8), "little")
        comm = vm.read(task + comm_off, 16).split(b"\0", 1)[0].decode()
        pid = int.from_bytes(vm.read(task + pid_off, 4), "little", signed=True)
    assert task >= 1 << 63, f"current task pointer {task:#x} is not a kernel address"
    if pid == 0:
        assert comm == "swapper/0"
    else:
        assert pid > 0 and comm.isprintable() and comm
