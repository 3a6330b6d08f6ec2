"""Fetch arguments evaluated against a fake guest, with the kernel's semantics."""

from __future__ import annotations

import time
from dataclasses import replace

from kprobevm.errors import GuestFaultError
from kprobevm.tracing import ProbeEvent, fetch, parse_event
from kprobevm.tracing.fetch import FetchArg, Symbolic, kernel_read_allowed
from kprobevm.x86.addrspace import FIVE_LEVEL, FOUR_LEVEL, AddressSpace

KBASE = 0xFFFF_8880_0000_0000
UBASE = 0x7FFD_0000_0000


class FakeGuest:
    """Registers and page-granular memory; unmapped pages fault as the guest's would."""

    def __init__(self) -> None:
        self.regs = {
            "di": KBASE,
            "si": UBASE,
            "dx": 0,
            "cx": 0,
            "r8": 0,
            "r9": 0,
            "ax": (1 << 64) - 2,
            "sp": KBASE + 0x800,
            "ip": 0xFFFFFFFF81300000,
        }
        self.pages: dict[int, bytearray] = {}
        self.reads = 0
        self.entry: dict[int, int] = {}

    def poke(self, address: int, data: bytes) -> None:
        for i, b in enumerate(data):
            page = self.pages.setdefault((address + i) >> 12, bytearray(4096))
            page[(address + i) & 0xFFF] = b

    def reg(self, name: str) -> int:
        return self.regs[name]

    def read(self, address: int, size: int) -> bytes:
        self.reads += 1
        page = self.pages.get(address >> 12)
        if page is not None and (address & 0xFFF) + size <= 4096:
            return bytes(page[address & 0xFFF : (address & 0xFFF) + size])
        out = bytearray()
        for a in range(address, address + size):
            page = self.pages.get(a >> 12)
            if page is None:
                raise GuestFaultError(a)
            out.append(page[a & 0xFFF])
        return bytes(out)

    def read_user(self, address: int, size: int) -> bytes:
        return self.read(address, size)

    def symbol_address(self, name: str) -> int:
        return {"jiffies": KBASE + 0x100}[name]

    def describe(self, address: int) -> str:
        if 0xFFFFFFFF81300000 <= address < 0xFFFFFFFF81300170:
            return f"vfs_read+0x{address - 0xFFFFFFFF81300000:x}/0x170"
        return f"0x{address:x}"

    def comm(self) -> str:
        return "cat"

    def retval(self) -> int:
        return self.regs["ax"]

    def stack(self, n: int) -> int:
        return int.from_bytes(self.read(self.regs["sp"] + 8 * n, 8), "little")

    def entry_arg(self, n: int) -> int:
        return self.entry[n]


def args_of(text: str) -> dict[str, FetchArg]:
    event = parse_event(text)
    assert isinstance(event, ProbeEvent)
    return {a.name: a for a in event.args}


def show(text: str, guest: FakeGuest) -> dict[str, str]:
    return {name: a.format(a.fetch(guest)) for name, a in args_of(text).items()}


def test_registers_types_and_signedness() -> None:
    g = FakeGuest()
    out = show("p f a=%ax b=%ax:s64 c=%ax:s8 d=%ax:u16 e=%ax:x8 f=%ip:symbol g=%ip:symstr", g)
    assert out == {
        "a": "0xfffffffffffffffe",
        "b": "-2",
        "c": "-2",
        "d": "65534",
        "e": "0xfe",
        "f": "vfs_read+0x0/0x170",
        "g": '"vfs_read+0x0/0x170"',
    }


def test_kernel_string_and_user_string() -> None:
    g = FakeGuest()
    g.poke(KBASE, b"kernel\0")
    g.poke(UBASE, b"/etc/hostname\0")
    out = show("p f k=+0(%di):string u=+0(%si):ustring uu=+u0(%si):string", g)
    assert out == {"k": '"kernel"', "u": '"/etc/hostname"', "uu": '"/etc/hostname"'}


def test_plain_string_of_a_user_pointer_faults_on_x86_64() -> None:
    # copy_from_kernel_nofault() refuses the user half: 6.1 prints (fault) here.
    g = FakeGuest()
    g.poke(UBASE, b"/etc/hostname\0")
    assert show("p f s=+0(%si):string", g) == {"s": "(fault)"}
    assert not kernel_read_allowed(UBASE)
    assert kernel_read_allowed(KBASE)


def test_faults_and_partial_strings() -> None:
    g = FakeGuest()
    g.regs["di"] = KBASE + 0x1000 - 3
    g.poke(g.regs["di"], b"abc")  # no NUL before the next, unmapped, page: a fault
    out = show("p f s=+0(%di):string n=+8(%di):u32 ok=+0(%di):u8", g)
    assert out == {"s": "(fault)", "n": "(fault)", "ok": "97"}
    g.poke(KBASE + 0x1000, b"d\0")  # map the next page: the string runs across pages
    assert show("p f s=+0(%di):string", g) == {"s": '"abcd"'}
    g.regs["di"] = KBASE + 0x1000 - 1
    g.poke(g.regs["di"], b"\0")  # a NUL just before a page end reads nothing beyond
    del g.pages[(KBASE + 0x1000) >> 12]
    assert show("p f s=+0(%di):string", g) == {"s": '""'}


def test_long_string_is_cut_at_4095_bytes() -> None:
    g = FakeGuest()
    g.poke(KBASE, b"x" * 5000 + b"\0")
    (arg,) = args_of("p f +0(%di):string").values()
    value = arg.fetch(g)
    assert isinstance(value, bytes) and len(value) == 4095


def test_nested_deref_stack_args_and_immediates() -> None:
    g = FakeGuest()
    g.poke(KBASE + 0x10, (KBASE + 0x40).to_bytes(8, "little"))
    g.poke(KBASE + 0x48, (1234).to_bytes(4, "little"))
    g.poke(g.regs["sp"], (0xFFFFFFFF81000000).to_bytes(8, "little"))
    g.poke(g.regs["sp"] + 8, (77).to_bytes(8, "little"))
    g.poke(KBASE + 0x100, (5).to_bytes(8, "little"))
    g.regs["dx"] = 9
    out = show(
        "p f a=+8(+16(%di)):u32 b=$stack0 c=$stack1:u8 d=$stack e=$arg3:u8 f=$arg7:u8 "
        'g=\\-5:s32 h=\\"imm" i=$comm j=@jiffies:u64',
        g,
    )
    assert out == {
        "a": "1234",
        "b": "0xffffffff81000000",
        "c": "77",
        "d": f"0x{KBASE + 0x800:x}",
        "e": "9",
        "f": "77",
        "g": "-5",
        "h": '"imm"',
        "i": '"cat"',
        "j": "5",
    }


def test_retval() -> None:
    g = FakeGuest()
    g.regs["ax"] = (1 << 64) - 2
    assert show("r f rv=$retval:s32 raw=$retval", g) == {"rv": "-2", "raw": "0xfffffffffffffffe"}


def test_entry_arguments_at_a_return_read_what_the_entry_saved() -> None:
    """An EntryArg reads the saved value, not the register's value at the return; a
    dereference of it reads memory at the return."""
    g = FakeGuest()
    g.poke(KBASE + 0x40, b"saved\0")
    g.regs["di"] = 7  # clobbered by the function
    g.entry = {1: KBASE + 0x40, 2: (1 << 64) - 3}
    a = FetchArg("a", "$arg1", fetch.EntryArg(1))
    s = FetchArg("s", "+0($arg1):string", fetch.Deref(0, fetch.EntryArg(1)),
                 type=fetch.FETCH_TYPES["string"])  # fmt: skip
    n = FetchArg("n", "$arg2:s32", fetch.EntryArg(2), type=fetch.FETCH_TYPES["s32"])
    assert [x.format(x.fetch(g)) for x in (a, s, n)] == [hex(KBASE + 0x40), '"saved"', "-3"]
    g.regs.update(di=KBASE + 0x40, si=(1 << 64) - 3)
    assert [fetch.read_arg(g, i) for i in (1, 2)] == [KBASE + 0x40, (1 << 64) - 3]


def test_bitfields() -> None:
    g = FakeGuest()
    g.poke(KBASE, bytes([0b1011_0110, 0, 0, 0]))
    out = show("p f a=+0(%di):b4@4/8 b=+0(%di):b3@1/32 c=+0(%di):b1@0/8", g)
    assert out == {"a": "11", "b": "3", "c": "0"}


def test_arrays() -> None:
    g = FakeGuest()
    g.poke(KBASE + 0x1000 - 3, bytes([1, 2, 3]))  # the 4th byte is on an unmapped page
    g.poke(KBASE + 0x20, (KBASE + 0x40).to_bytes(8, "little"))
    g.poke(KBASE + 0x28, (KBASE + 0x50).to_bytes(8, "little"))
    g.poke(KBASE + 0x40, b"one\0")
    g.poke(KBASE + 0x50, b"two\0")
    out = show("p f a=+4093(%di):u8[4] b=+32(%di):string[2] c=+32(%di):x64[2]", g)
    assert out == {
        "a": "{1,2,3,(fault)}",
        "b": '{"one","two"}',
        "c": f"{{0x{KBASE + 0x40:x},0x{KBASE + 0x50:x}}}",
    }


def test_symbol_value_type() -> None:
    g = FakeGuest()
    (arg,) = args_of("p f %ip:symbol").values()
    assert arg.fetch(g) == Symbolic(0xFFFFFFFF81300000, "vfs_read+0x0/0x170")


def test_evaluation_is_cheap() -> None:
    # The CLI's budget: 2,000 lines/s with two string args; fetching must be far below it.
    g = FakeGuest()
    g.poke(KBASE, b"/etc/hostname\0")
    g.poke(UBASE, b"/etc/passwd\0")
    args = list(args_of("p f a=+0(%di):string b=+0(%si):ustring c=%dx:s32").values())
    start = time.perf_counter()
    for _ in range(2000):
        for a in args:
            a.fetch(g)
    assert time.perf_counter() - start < 10.0  # a hang guard (about 0.05 s)


def test_five_level_paging_moves_the_kernel_half_and_task_size() -> None:
    """With LA57 the kernel's stacks and vmalloc live below 0xffff800000000000 (the
    4-level kernel half) and user space reaches past 1 << 47: reads follow the guest's
    split, as its copy_from_kernel_nofault_allowed() and access_ok() do."""
    g = FakeGuest()
    stack5 = 0xFFA0_0000_1234_0000  # a 5-level vmalloc'd kernel stack
    user5 = 0x7F_0000_0000_0000  # a user mapping above 47 bits
    g.poke(stack5, (0x8000).to_bytes(8, "little"))
    g.poke(user5, b"/high\0")
    g.regs["dx"], g.regs["si"] = stack5, user5
    text = "p f fl=+0(%dx):x64 s=+0(%si):string u=+0(%si):ustring"
    four = {name: a.format(a.fetch(g)) for name, a in args_of(text).items()}
    assert four == {"fl": "(fault)", "s": "(fault)", "u": "(fault)"}
    five = {name: a.format(replace(a, split=FIVE_LEVEL, mixed=True).fetch(g))
            for name, a in args_of(text).items()}  # fmt: skip
    assert five == {"fl": "0x8000", "s": '"/high"', "u": '"/high"'}
    assert AddressSpace.from_cr4(0x16B0) == FIVE_LEVEL
    assert AddressSpace.from_cr4(0x6B0) == FOUR_LEVEL
    assert FIVE_LEVEL.task_size_max == (1 << 56) - 4096
    assert FIVE_LEVEL.kernel_start == 0xFF00_0000_0000_0000
    assert FOUR_LEVEL.kernel_start == 0xFFFF_8000_0000_0000
    assert kernel_read_allowed(stack5, FIVE_LEVEL) and not kernel_read_allowed(stack5)
