"""Numbers of the x86-64 machine that every room uses: the word mask, the page size."""

from __future__ import annotations

__all__ = ["MASK64", "PAGE_SIZE"]

MASK64 = (1 << 64) - 1
"""A 64-bit register or address, as the CPU wraps it."""
PAGE_SIZE = 4096
"""The base page: the unit of mapping, protection and faults."""
