"""IDT gate descriptors: where a 64-bit interrupt gate points, and the same gate
pointed elsewhere (selector, IST and type kept)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "BP_VECTOR",
    "GATE_SIZE",
    "GateHook",
    "decode_idt_gate",
    "encode_idt_gate",
    "gate_address",
]

BP_VECTOR = 3
"""#BP, the vector an int3 raises."""
GATE_SIZE = 16
"""A long-mode gate descriptor: offset 15..0, selector, IST/type, offset 31..16, 63..32."""
_GATE = struct.Struct("<HHHHII")


def gate_address(idt_table: int, vector: int) -> int:
    """The address of ``vector``'s gate in the IDT at ``idt_table``."""
    return idt_table + vector * GATE_SIZE


def decode_idt_gate(gate: bytes) -> int:
    """The handler address of a 64-bit IDT gate descriptor."""
    lo, _sel, _ist, mid, hi, _ = _GATE.unpack(gate)
    handler: int = (hi << 32) | (mid << 16) | lo
    return handler


def encode_idt_gate(gate: bytes, handler: int) -> bytes:
    """``gate`` with its handler address replaced (selector, IST, type kept)."""
    _lo, sel, ist, _mid, _hi, rsv = _GATE.unpack(gate)
    return _GATE.pack(handler & 0xFFFF, sel, ist, (handler >> 16) & 0xFFFF, handler >> 32, rsv)


@dataclass(frozen=True)
class GateHook:
    """A gate pointed at a handler of ours: where it is, what it held, what it holds."""

    addr: int
    original: bytes
    replacement: bytes

    @property
    def original_handler(self) -> int:
        """Where the vector went before the hook (the guest's own handler)."""
        return decode_idt_gate(self.original)
