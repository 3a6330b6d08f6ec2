"""The #BP stub: every outcome run in unicorn, encodings checked with capstone."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable

import capstone
import pytest
import unicorn
import unicorn.x86_const as ux

from kprobevm.errors import KprobeError
from kprobevm.x86.stub import (
    EMPTY,
    ENTRY_SIZE,
    TOMBSTONE,
    Int3Stub,
    build_int3_stub,
    probe_sequence,
    stub_hash,
    table_image,
)
from tests._x86_unicorn import GPRS, KERNEL_CS, KERNEL_SS, USER_CS, Machine

STUB = 0xFFFFFFFFA0100000
TABLE = 0xFFFFFFFFA0102000
SLOTS = 16
REAL = 0xFFFFFFFF81F00000  # stands for asm_exc_int3
TEXT = 0xFFFFFFFF81000000
SLOT_PAGE = 0xFFFFFFFFA0200000
VANISHED = 0xFFFFFFFFA0103FF8
STACK = 0xFFFFC90000004000
GDT = 0xFFFFFFFFFF000000
ENTRY_FLAGS = 0x2 | 0x1 | 0x40 | 0x80 | 0x800  # CF ZF SF OF set, IF clear (interrupt gate)
FRAME_FLAGS = 0x246
CR0_WP = 1 << 16
CR4_CET = 1 << 23


def _stub(slots: int = SLOTS) -> Int3Stub:
    return build_int3_stub(STUB, table=TABLE, table_slots=slots, real_handler=REAL,
                           vanished=VANISHED)  # fmt: skip


def _disasm(code: bytes, base: int) -> list[capstone.CsInsn]:
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return list(md.disasm(code, base))


def test_hash_is_the_top_bits_of_a_fibonacci_product() -> None:
    addr = 0xFFFFFFFF81234567
    assert stub_hash(addr, 16) == ((addr * 0x9E3779B97F4A7C15) % 2**64) >> 60
    assert all(0 <= stub_hash(TEXT + i, 1024) < 1024 for i in range(0, 5000, 7))
    seq = list(probe_sequence(addr, 8))
    assert sorted(seq) == list(range(8)) and seq[0] == stub_hash(addr, 8)


@pytest.mark.parametrize("slots", [0, 1, 3, 12, 1 << 31])
def test_table_size_must_be_a_power_of_two(slots: int) -> None:
    with pytest.raises(KprobeError, match="power of two"):
        _stub(slots)


def test_table_image_places_keys_on_their_probe_sequence() -> None:
    entries = {TEXT + i * 0x40: SLOT_PAGE + i * 64 for i in range(12)}
    image = table_image(entries, SLOTS)
    assert len(image) == SLOTS * ENTRY_SIZE
    table = [struct.unpack_from("<QQ", image, i * 16) for i in range(SLOTS)]
    for addr, slot in entries.items():
        for index in probe_sequence(addr, SLOTS):
            key, value = table[index]
            assert key != EMPTY, "a lookup would stop before reaching the key"
            if key == addr:
                assert value == slot
                break
    with pytest.raises(KprobeError, match="full"):
        table_image({TEXT + i: 1 for i in range(3)}, 2)
    with pytest.raises(KprobeError, match="cannot be a key"):
        table_image({TOMBSTONE: 5}, SLOTS)


def test_stub_disassembles_to_the_intended_instructions() -> None:
    stub = _stub()
    code = stub.code[: stub.offsets["real_handler_ptr"]].rstrip(b"\xcc")  # drop the padding
    insns = _disasm(code, STUB)
    assert sum(i.size for i in insns) == len(code), "every byte decodes"
    text = [f"{i.mnemonic} {i.op_str}".strip() for i in insns]
    assert text[0] == "pushfq"
    assert text[1] == "test byte ptr [rsp + 0x10], 3"
    assert "imul rcx, rax" in text
    assert "shr rcx, 0x3c" in text  # 64 - log2(16)
    assert f"movabs rsi, {TABLE:#x}" in text
    assert "cmp qword ptr [rsi + rcx*8], rax" in text
    assert "cmp byte ptr [rax], 0xcc" in text
    assert "lock or byte ptr [rax], 0" in text
    assert text.count("iretq") == 1
    (far,) = [i for i in insns if i.bytes[:2] == b"\xff\x25"]  # jmp *disp(%rip)
    disp = struct.unpack_from("<i", far.bytes, 2)[0]
    assert far.address + far.size + disp == stub.real_handler_ptr
    assert stub.real_handler_ptr % 8 == 0
    assert struct.unpack_from("<Q", stub.code, stub.offsets["real_handler_ptr"])[0] == REAL


# --- running it -------------------------------------------------------------------


class StubWorld:
    """A machine with the stub, its table, kernel text (read-only, CR0.WP set, as in a
    kernel) and a #BP frame on the stack."""

    def __init__(self, entries: dict[int, int], raw_table: bytes | None = None) -> None:
        self.stub = _stub()
        m = Machine()
        m.map(STUB, 0x1000, b"\xcc")
        m.map(TABLE, SLOTS * ENTRY_SIZE)
        m.map(VANISHED, 8)
        m.map(TEXT, 0x2000, b"\x90", writable=False)
        m.map(REAL, 0x1000, b"\xf4")
        m.map(SLOT_PAGE, 0x1000, b"\xf4")
        m.map(STACK - 0x2000, 0x3000)
        m.start_paging(GDT)
        m.uc.reg_write(ux.UC_X86_REG_CR0, m.uc.reg_read(ux.UC_X86_REG_CR0) | CR0_WP)
        m.write(STUB, self.stub.code)
        m.write(TABLE, raw_table if raw_table is not None else table_image(entries, SLOTS))
        self.m = m
        rng = random.Random(3)
        self.entry_regs = {r: rng.getrandbits(64) for r in GPRS if r != "rsp"}

    def trap(self, addr: int, *, cs: int = KERNEL_CS, byte: int = 0xCC) -> dict[str, int]:
        """int3 at ``addr`` just trapped: run the stub, return the registers after."""
        self.m.write(addr, bytes((byte,)))
        self.frame_rsp = STACK + 0x100  # the interrupted context's stack pointer
        frame = struct.pack("<5Q", addr + 1, cs, FRAME_FLAGS, self.frame_rsp, KERNEL_SS)
        self.entry_rsp = STACK - 0x200
        self.m.write(self.entry_rsp, frame)
        self.m.set_regs({**self.entry_regs, "rsp": self.entry_rsp, "eflags": ENTRY_FLAGS})
        self.executed = self.m.run(STUB, inside=(STUB, STUB + self.stub.length))
        return self.m.regs()

    def assert_untouched(self, after: dict[str, int]) -> None:
        for name, value in self.entry_regs.items():
            assert after[name] == value, name


def _probe_addrs(count: int) -> list[int]:
    return [TEXT + 0x10 + 0x23 * i for i in range(count)]


def test_found_redirects_the_frame_to_the_slot_and_irets() -> None:
    addrs = _probe_addrs(5)
    world = StubWorld({a: SLOT_PAGE + 64 * i for i, a in enumerate(addrs)})
    for i, addr in enumerate(addrs):
        after = world.trap(addr)
        assert after["rip"] == SLOT_PAGE + 64 * i
        assert after["rsp"] == world.frame_rsp  # iretq restored the context's stack
        assert after["eflags"] & 0xFFF == FRAME_FLAGS & 0xFFF
        world.assert_untouched(after)


def test_found_past_collisions_and_tombstones() -> None:
    # Find three addresses with the same first index; a tombstone sits in the first entry.
    home = stub_hash(TEXT + 0x100, SLOTS)
    same = [a for a in range(TEXT + 0x100, TEXT + 0x1F00) if stub_hash(a, SLOTS) == home][:3]
    assert len(same) == 3
    table = bytearray(SLOTS * ENTRY_SIZE)
    seq = list(probe_sequence(same[0], SLOTS))
    struct.pack_into("<QQ", table, seq[0] * 16, TOMBSTONE, 0xDEAD)
    struct.pack_into("<QQ", table, seq[1] * 16, same[1], SLOT_PAGE + 64)
    struct.pack_into("<QQ", table, seq[2] * 16, same[2], SLOT_PAGE + 128)
    world = StubWorld({}, raw_table=bytes(table))
    assert world.trap(same[2])["rip"] == SLOT_PAGE + 128
    assert world.trap(same[1])["rip"] == SLOT_PAGE + 64


def test_full_table_without_the_key_ends_after_one_lap() -> None:
    table = b"".join(struct.pack("<QQ", TOMBSTONE, 0) for _ in range(SLOTS))
    world = StubWorld({}, raw_table=table)
    after = world.trap(TEXT + 0x40)
    assert after["rip"] == REAL  # not found, int3 still there: forwarded
    assert len(world.executed) < 20 * SLOTS


def _stores_to(world: StubWorld, addr: int, run: Callable[[], object]) -> list[int]:
    """The values ``run`` stored to the byte at ``addr``."""
    stored: list[int] = []
    phys = world.m.phys(addr)

    def hook(_uc: object, _access: int, at: int, _size: int, value: int, _data: object) -> None:
        if at == phys:
            stored.append(value)

    handle = world.m.uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, hook)
    try:
        run()
    finally:
        world.m.uc.hook_del(handle)
    return stored


def test_not_found_and_int3_gone_reexecutes_the_address_after_storing_its_byte() -> None:
    # The store of the byte as it is (what makes QEMU drop a translation that still
    # holds the int3) goes through read-only text with CR0.WP cleared just for it.
    world = StubWorld({TEXT + 0x500: SLOT_PAGE})
    world.m.write(TEXT + 0x40, b"\x55")
    cr0 = world.m.uc.reg_read(ux.UC_X86_REG_CR0)
    stored = _stores_to(world, TEXT + 0x40, lambda: world.trap(TEXT + 0x40, byte=0x55))
    after = world.m.regs()
    assert stored == [0x55]
    assert world.m.read(TEXT + 0x40, 1) == b"\x55"
    assert world.m.u64(VANISHED) == 1
    assert world.m.uc.reg_read(ux.UC_X86_REG_CR0) == cr0
    assert after["rip"] == TEXT + 0x40
    assert after["rsp"] == world.frame_rsp
    assert after["eflags"] & 0xFFF == FRAME_FLAGS & 0xFFF
    world.assert_untouched(after)


def test_with_cet_on_a_vanished_int3_is_reexecuted_with_no_store() -> None:
    world = StubWorld({TEXT + 0x500: SLOT_PAGE})
    world.m.uc.reg_write(ux.UC_X86_REG_CR4, world.m.uc.reg_read(ux.UC_X86_REG_CR4) | CR4_CET)
    if not world.m.uc.reg_read(ux.UC_X86_REG_CR4) & CR4_CET:
        pytest.skip("this unicorn keeps CR4.CET clear")
    stored = _stores_to(world, TEXT + 0x40, lambda: world.trap(TEXT + 0x40, byte=0x55))
    assert stored == []
    assert world.m.regs()["rip"] == TEXT + 0x40


def test_not_ours_goes_to_the_real_handler_with_every_register_as_delivered() -> None:
    world = StubWorld({TEXT + 0x500: SLOT_PAGE})
    after = world.trap(TEXT + 0x40)
    assert after["rip"] == REAL
    assert after["rsp"] == world.entry_rsp  # the CPU's frame is where the handler expects
    assert after["eflags"] == ENTRY_FLAGS
    world.assert_untouched(after)
    frame = struct.unpack("<5Q", world.m.read(world.entry_rsp, 40))
    assert frame == (TEXT + 0x41, KERNEL_CS, FRAME_FLAGS, world.frame_rsp, KERNEL_SS)


def test_user_mode_trap_is_forwarded_before_any_lookup() -> None:
    # Even an address that is in the table: from user mode it is never ours.
    world = StubWorld({TEXT + 0x40: SLOT_PAGE})
    after = world.trap(TEXT + 0x40, cs=USER_CS)
    assert after["rip"] == REAL
    assert after["rsp"] == world.entry_rsp
    assert after["eflags"] == ENTRY_FLAGS
    world.assert_untouched(after)
    assert len(world.executed) == 5  # pushfq, testb, jne, popfq, jmp


def test_an_entry_removed_between_key_and_value_is_looked_up_again() -> None:
    """The host may stop the VM after the stub matched a key and before it loads the
    value, and remove the probe meanwhile (int3 byte restored, entry TOMBSTONE/0). The
    stub must not iretq to that 0: the key no longer matches, so it looks again, finds
    nothing, and re-executes the original instruction."""
    addr = TEXT + 0x40
    world = StubWorld({addr: SLOT_PAGE})
    found = STUB + world.stub.offsets["found"]
    index = next(i for i in probe_sequence(addr, SLOTS))

    def remove_probe(uc: object, at: int, size: int, _data: object) -> None:
        if at == found:
            world.m.write(TABLE + index * ENTRY_SIZE, struct.pack("<QQ", TOMBSTONE, 0))
            world.m.write(addr, b"\x55")  # the original byte is back

    handle = world.m.uc.hook_add(unicorn.UC_HOOK_CODE, remove_probe)
    try:
        after = world.trap(addr)
    finally:
        world.m.uc.hook_del(handle)
    assert after["rip"] == addr
    assert after["rsp"] == world.frame_rsp
    world.assert_untouched(after)
