"""Closing: the one ``with`` protocol of kprobevm's resources.

A VM, a gdbstub client, a vmlinux view, a guest shell: each is closed by ``close()``,
and leaving a ``with`` block calls it, whatever the block raised.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """``with x:`` yields ``x`` and calls ``x.close()`` on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
