"""The initramfs's parts that need no recipe: the newc archive writer, and kernel modules
put in load order from their own ``.modinfo`` (Debian's kernel package has no modules.dep).

The archive is written here, in memory, so that building an image needs no root and no
fakeroot: every entry's owner, mode and device numbers are set directly.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kprobevm.errors import ImageError

__all__ = ["Cpio", "module_order"]


class Cpio:
    """A newc ("070701") archive in memory: the initramfs format the kernel unpacks."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        name = name.lstrip("/")
        if name in self._names:
            return
        self._names.add(name)
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        self._ino += 1
        out = self._out
        out.write(b"070701" + b"".join(b"%08x" % f for f in fields))
        out.write(encoded)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self._entry("/".join(parts[:i]), stat.S_IFDIR | (mode if i == len(parts) else 0o755),
                        nlink=2)

    def _parent(self, name: str) -> None:
        parent = os.path.dirname(name.strip("/"))
        if parent:
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._parent(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, nlink=1)
        out = self._out
        out.write(b"\0" * (-out.tell() % 512))
        return out.getvalue()


def _modinfo(ko: bytes) -> dict[str, str]:
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    try:
        section = ELFFile(io.BytesIO(ko)).get_section_by_name(".modinfo")
    except ELFError as exc:
        raise ImageError(f"unreadable kernel module: {exc}", step="modules") from exc
    info: dict[str, str] = {}
    if section is not None:
        for item in section.data().split(b"\0"):
            key, _, value = item.decode(errors="replace").partition("=")
            if key and key not in info:
                info[key] = value
    return info


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes; Debian may ship them as .ko.xz or .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma

        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True,
                              check=True).stdout
    return data


def module_order(moddir: Path, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """Modules to load, dependencies first (from ``.modinfo`` ``depends=``; no modules.dep)."""
    index: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        base = path.name.split(".ko")[0].replace("-", "_")
        index.setdefault(base, path)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, name))}",
                             step="modules")
        if name not in index:
            raise ImageError(f"kernel module {name} not found in {moddir}", step="modules")
        data = _read_module(index[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        seen.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name, ())
    return order
