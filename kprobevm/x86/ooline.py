"""Out-of-line code for an instruction slot: the probed instruction, run somewhere else.

A slot holds ``movb $1, mailbox(%rip)`` (the "pre" store: the host's write watchpoint
on the mailbox stops the vCPU right there, every register as at the probe) and then a
sequence equivalent to the original instruction at its own address, ending in a jump
back. Like the kernel's ``__copy_instruction`` plus ``prepare_boost``, but branches get
an equivalent sequence instead of single-stepping, since nothing in the guest traps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kprobevm.errors import KprobeError, ProbeRefused
from kprobevm.x86 import asm
from kprobevm.x86.asm import rip
from kprobevm.x86.insn import Insn, InsnKind

__all__ = [
    "POST_VALUE",
    "PRE_VALUE",
    "SLOT_SIZE",
    "TB_BREAK",
    "SlotCode",
    "make_slot_code",
    "relocate",
]

SLOT_SIZE = 64
#: The byte the pre store writes to the mailbox (tells a reader which store it saw).
PRE_VALUE = 1
#: The byte the post store writes.
POST_VALUE = 2
_MOVB_LEN = 7
#: ``jmp .+2`` after every watched store. QEMU normally stops a vCPU right after the
#: store; but a vCPU whose earlier hit QEMU folded into another vCPU's stop keeps a
#: stale ``watchpoint_hit``, and its next hit is only raised at the next TB boundary.
#: This jump ends the TB there, so that late stop still lands in the slot, 2 bytes on,
#: with every register untouched (a jump changes no flag).
TB_BREAK = b"\xeb\x00"

#: Kinds whose post-instruction state the slot can reach with a store after them.
#: Returns and indirect branches leave the slot by the instruction itself; a probe
#: with a post_handler on them is emulated on the host (:mod:`kprobevm.x86.emulate`).
POST_STORE_KINDS = frozenset(
    {InsnKind.PLAIN, InsnKind.JMP_REL, InsnKind.JCC_REL, InsnKind.CALL_REL, InsnKind.LOOP,
     InsnKind.JCXZ}
)  # fmt: skip


@dataclass(frozen=True)
class SlotCode:
    """The bytes for one slot and the addresses the host sees while they run."""

    slot_addr: int
    bytes: bytes
    #: RIP right after the pre store (the watchpoint stop's RIP), or None without one.
    pre_store_end: int | None
    #: RIP right after the (first) post store, or None without one.
    post_store_end: int | None
    #: Every post store's end, each with the RIP the original instruction would have
    #: left (the ``regs.ip`` a post_handler sees). Two for conditional branches.
    post_exits: tuple[tuple[int, int], ...]
    #: The code as GNU as source (:class:`~kprobevm.x86.asm.Assembler`).
    listing: str = ""

    @property
    def length(self) -> int:
        """The number of bytes used in the slot."""
        return len(self.bytes)

    def resume_ip(self, stop_rip: int) -> int | None:
        """The original-context RIP for a post stop at ``stop_rip``; None if not a post stop."""
        for end, ip in self.post_exits:
            if end == stop_rip:
                return ip
        return None


def relocate(insn: Insn, new_addr: int) -> bytes:
    """``insn``'s bytes for running at ``new_addr``: the RIP-relative disp32 rewritten.

    Raises :class:`ProbeRefused` (``EINVAL``) when the new displacement does not fit in
    32 bits, as ``__copy_instruction`` refuses it.
    """
    target = insn.rip_target
    if target is None or insn.rip_disp_offset is None:
        return insn.bytes
    try:
        disp = asm.rip_disp32(new_addr + insn.length, target)
    except KprobeError as exc:
        raise ProbeRefused(
            "EINVAL",
            f"the RIP-relative operand ({target:#x}) is out of reach from the slot at"
            f" {new_addr:#x}",
            address=insn.addr,
        ) from exc
    off = insn.rip_disp_offset
    return insn.bytes[:off] + disp + insn.bytes[off + 4 :]


def make_slot_code(
    insn: Insn,
    slot_addr: int,
    *,
    mailbox: int,
    pre_mailbox: int | None = None,
    pre_store: bool = True,
    post_store: bool = False,
    slot_size: int = SLOT_SIZE,
    covers: tuple[Insn, ...] = (),
) -> SlotCode:
    """Generate the slot's code for ``insn`` placed at ``slot_addr``.

    The code after the pre store behaves as ``insn`` executing at ``insn.addr`` and then
    continuing; ``pre_mailbox`` (default ``mailbox``) is where the pre store writes, so
    that a watchpoint of the site's own can name it; ``post_store`` adds a watched store
    after the instruction's effect (on each exit path) for the post_handler. ``covers``
    (plain instructions from ``insn`` on, an optimized probe's jump) are all copied,
    and the code goes on after the last of them; no post store then. Raises
    :class:`ProbeRefused` for REFUSED instructions and for forms that cannot be rebuilt,
    :class:`KprobeError` when a target is out of rel32 reach or the code does not fit.
    """
    insn.check_probeable()
    if post_store and insn.kind not in POST_STORE_KINDS:
        raise ProbeRefused(
            "EOPNOTSUPP",
            f"no post store after `{insn.mnemonic}` ({insn.kind.value}): its exit is the"
            " instruction itself; emulate it on the host for a post_handler",
            address=insn.addr,
        )
    slot = _Slot(asm.Assembler(slot_addr), mailbox if post_store else None)
    pre_end: int | None = None
    if pre_store:
        slot.a.mov(rip(pre_mailbox or mailbox, size=1), PRE_VALUE)
        pre_end = slot.a.here
        slot.a.jmp_next()  # TB_BREAK
    if covers:
        _copy_covered(slot, covers, post_store)
    else:
        _rebuild(slot, insn)
    program = slot.a.assemble()
    if len(program.code) > slot_size:
        raise KprobeError(
            f"slot code for `{insn.mnemonic} {insn.op_str}` takes {len(program.code)} bytes,"
            f" more than the {slot_size}-byte slot",
            address=insn.addr,
        )
    return SlotCode(
        slot_addr=slot_addr,
        bytes=program.code,
        pre_store_end=pre_end,
        post_store_end=slot.exits[0][0] if slot.exits else None,
        post_exits=tuple(slot.exits),
        listing=program.listing,
    )


class _Slot:
    """The slot's assembler, and its post stores so far (none without a post mailbox)."""

    def __init__(self, a: asm.Assembler, post_mailbox: int | None) -> None:
        self.a = a
        self.post_mailbox = post_mailbox
        self.exits: list[tuple[int, int]] = []

    def leave(self, resume: int) -> None:
        """Go on at ``resume`` (the RIP the original would have left), after a post store."""
        if self.post_mailbox is not None:
            self.a.mov(rip(self.post_mailbox, size=1), POST_VALUE)
            self.exits.append((self.a.here, resume))
            self.a.jmp_next()  # TB_BREAK
        self.a.jmp(resume)


def _rebuild(slot: _Slot, insn: Insn) -> None:
    """What follows the pre store: ``insn``'s effect as if run at ``insn.addr``."""
    a, kind, nxt, target = slot.a, insn.kind, insn.next_addr, insn.target
    copied = f"from {insn.addr:#x}: {insn.mnemonic} {insn.op_str}".rstrip()
    if kind is InsnKind.PLAIN:
        a.emit(relocate(insn, a.here), copied)
        slot.leave(nxt)
    elif kind is InsnKind.JMP_REL:
        assert target is not None
        slot.leave(target)
    elif kind is InsnKind.JCC_REL:
        assert target is not None and insn.cc is not None
        if slot.post_mailbox is None:
            a.jcc(insn.cc, target)
            a.jmp(nxt)
        else:  # each way out gets its own post store
            a.jcc(insn.cc, "taken")
            slot.leave(nxt)
            a.label("taken")
            slot.leave(target)
    elif kind is InsnKind.CALL_REL:
        assert target is not None
        a.push_u64(nxt)
        slot.leave(target)
    elif kind in (InsnKind.LOOP, InsnKind.JCXZ):
        # loop/jrcxz only have rel8: branch over the fall-through jump to a far jump.
        assert target is not None
        _rel8_branch(a, insn, "taken")
        slot.leave(nxt)
        a.label("taken")
        slot.leave(target)
    elif kind in (InsnKind.RET, InsnKind.RET_IMM, InsnKind.JMP_INDIRECT_REG):
        a.emit(insn.bytes, copied)  # position-independent: the copy is exact
    elif kind is InsnKind.JMP_INDIRECT_MEM:
        a.emit(relocate(insn, a.here), copied)
    elif kind is InsnKind.CALL_INDIRECT_REG:
        assert insn.reg is not None
        if insn.reg not in asm.REG64 or insn.reg == "rsp":
            raise ProbeRefused(
                "EOPNOTSUPP", f"cannot rebuild `call *%{insn.reg}`", address=insn.addr
            )
        a.push_u64(nxt)
        a.jmp(insn.reg)
    elif kind is InsnKind.CALL_INDIRECT_MEM:
        a.push_u64(nxt)
        a.emit(_call_mem_as_jmp(insn, a.here), f"{copied}, as a jmp")
    else:  # pragma: no cover - every kind is handled above
        raise ProbeRefused("EOPNOTSUPP", f"unhandled kind {kind}", address=insn.addr)


def _copy_covered(slot: _Slot, covers: tuple[Insn, ...], post_store: bool) -> None:
    """Every instruction an optimized probe's jump covers, then back after the last."""
    for insn in covers:
        if insn.kind is not InsnKind.PLAIN or post_store:
            raise ProbeRefused(
                "EOPNOTSUPP", f"an optimized probe's jump cannot cover `{insn.mnemonic}`"
                f" ({insn.kind.value}{', with a post store' if post_store else ''})",
                address=insn.addr,
            )  # fmt: skip
        slot.a.emit(relocate(insn, slot.a.here),
                    f"from {insn.addr:#x}: {insn.mnemonic} {insn.op_str}".rstrip())  # fmt: skip
    slot.a.jmp(covers[-1].next_addr)


def _rel8_branch(a: asm.Assembler, insn: Insn, label: str) -> None:
    """``insn``'s loop or jrcxz/jecxz, to ``label`` instead of its own target."""
    if insn.opcode == 0xE3:
        (a.jecxz if insn.address_size32 else a.jrcxz)(label)
    else:  # e0 loopne, e1 loope, e2 loop; a loop counting in ecx is refused by insn
        (a.loopne, a.loope, a.loop)[insn.opcode - 0xE0](label)


def _call_mem_as_jmp(insn: Insn, at: int) -> bytes:
    """``call *mem`` re-encoded as ``jmp *mem`` (``ff /2`` -> ``ff /4``) to run at ``at``.

    Runs after the return address was pushed, so an operand based on %rsp would read
    8 bytes off: such forms are refused (the kernel's text has none; retpolines call
    thunks directly).
    """
    mem = insn.mem
    assert mem is not None and insn.modrm_offset is not None
    if mem.base == "rsp" or mem.index == "rsp" or mem.base == "esp":
        raise ProbeRefused(
            "EOPNOTSUPP",
            f"cannot rebuild `{insn.mnemonic} {insn.op_str}`: its operand moves with the push",
            address=insn.addr,
        )
    raw = bytearray(insn.bytes)
    raw[insn.modrm_offset] = (raw[insn.modrm_offset] & ~0x38) | (4 << 3)
    # Same length, same operand: relocate() keeps the original RIP-relative target.
    return relocate(dataclasses.replace(insn, bytes=bytes(raw)), at)
