"""The initramfs's parts that need no recipe: the newc archive writer, and kernel modules
put in load order from their own ``.modinfo`` (Debian's kernel package has no modules.dep).
A module the kernel has built in (``modules.builtin``, or its name in the vmlinux's
initcall symbols) needs no file.

The archive is written here, in memory, so that building an image needs no root and no
fakeroot: every entry's owner, mode and device numbers are set directly.
"""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from kprobevm.errors import ImageError

__all__ = ["Cpio", "builtin_modules", "module_order"]


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
    """A module's ELF bytes; Debian ships them as .ko.xz (6.1 and 6.12), others .ko.zst."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        import lzma

        try:
            return lzma.decompress(data)
        except lzma.LZMAError as exc:
            raise ImageError(f"cannot decompress {path}: {exc}", step="modules") from exc
    if path.name.endswith(".zst"):
        try:
            proc = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=False)
        except FileNotFoundError as exc:
            raise ImageError(f"zstd is needed to decompress {path}", step="modules") from exc
        if proc.returncode != 0:
            raise ImageError(f"cannot decompress {path}", step="modules", command="zstd -dc",
                             output=proc.stderr.decode(errors="replace"))
        return proc.stdout
    return data


def _module_name(text: str) -> str:
    return text.rsplit("/", 1)[-1].split(".ko")[0].replace("-", "_")


_INITCALL = re.compile(r"__initcall__kmod_([A-Za-z0-9_]+?)__\d+_\d+_")


def builtin_modules(moddir: Path | None, modinfo: bytes = b"",
                    symbols: Iterable[str] = ()) -> frozenset[str]:
    """Modules the kernel has built in: ``modules.builtin`` in ``moddir`` (Debian ships
    it; ``make modules_install`` writes it), the ``NAME.`` prefixes of ``modinfo`` (a
    ``.modinfo`` section, where a vmlinux keeps one), and the module names in the
    vmlinux's initcall symbols (``__initcall__kmod_virtio_net__...``, since 5.13): a
    self-built kernel whose modules were never installed says so only there."""
    names: set[str] = set()
    for name in symbols:
        match = _INITCALL.match(name)
        if match is not None:
            names.add(match.group(1))
    if moddir is not None:
        try:
            text = (moddir / "modules.builtin").read_text()
        except OSError:
            text = ""
        names.update(_module_name(line.strip()) for line in text.splitlines() if line.strip())
    for item in modinfo.split(b"\0"):
        module, dot, _ = item.decode(errors="replace").partition(".")
        if dot and module:
            names.add(module.replace("-", "_"))
    return frozenset(names)


def module_order(
    moddir: Path | None, wanted: Sequence[str], builtin: frozenset[str] = frozenset()
) -> list[tuple[str, bytes]]:
    """Modules to load, dependencies first (from ``.modinfo`` ``depends=``; no modules.dep).

    A wanted module in ``builtin`` is left out (the kernel has it already); one neither
    built in nor found in ``moddir`` (None: no modules at all) is an error naming both.
    """
    index: dict[str, Path] = {}
    if moddir is not None:
        for path in moddir.rglob("*.ko*"):
            index.setdefault(_module_name(path.name), path)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise ImageError(f"module dependency cycle: {' -> '.join((*chain, name))}",
                             step="modules")
        if name not in index:
            where = f"in {moddir}" if moddir is not None else "(no modules directory given)"
            raise ImageError(f"kernel module {name} is neither built in nor found {where}",
                             step="modules")
        data = _read_module(index[name])
        for dep in filter(None, _modinfo(data).get("depends", "").split(",")):
            visit(dep, (*chain, name))
        seen.add(name)
        order.append((name, data))

    for name in wanted:
        visit(name, ())
    return order
