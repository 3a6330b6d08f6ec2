"""Where a gdbstub listens, for every client that connects to one."""

from __future__ import annotations

from pathlib import Path

__all__ = ["GdbAddress"]

GdbAddress = str | Path | tuple[str, int]
"""A gdbstub address: a unix socket path, or (host, port)."""
