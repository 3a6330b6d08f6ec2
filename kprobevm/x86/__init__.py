"""The x86-64 layer: decode and classify, emit, run out of line, emulate, and the #BP stub."""

from kprobevm.x86.insn import Insn, InsnKind, boundaries, check_boundary, decode

__all__ = ["Insn", "InsnKind", "boundaries", "check_boundary", "decode"]
