"""vmlinux extraction from a bzImage: find the compressed payload, detect how it is packed.

The x86 boot header (``Documentation/arch/x86/boot.rst``) names the payload's offset and
length; when it is absent (a synthetic blob) the payload is found by its magic instead.
The result must be a whole ELF file (section headers inside the data), so a truncated
decompression is an error rather than a silently short vmlinux.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass

from kprobevm.errors import VmlinuxError

__all__ = ["COMPRESSIONS", "Payload", "extract_vmlinux", "find_payload"]

ELF_MAGIC = b"\x7fELF"

COMPRESSIONS: dict[str, bytes] = {
    # LZ4 "legacy" frames, which is what the kernel's `lz4c -l` writes.
    "lz4": b"\x02\x21\x4c\x18",
    "zstd": b"\x28\xb5\x2f\xfd",
    "gzip": b"\x1f\x8b\x08",
    "xz": b"\xfd\x37\x7a\x58\x5a\x00",
}


@dataclass(frozen=True)
class Payload:
    """Where the compressed kernel sits in the bzImage and how it is compressed."""

    offset: int
    length: int | None
    compression: str


def _header_payload(data: bytes) -> Payload | None:
    """Read payload_offset/payload_length from the boot header (protocol >= 2.08)."""
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        return None
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        return None
    setup_sects = data[0x1F1] or 4  # 0 means 4, a rule from the oldest boot loaders
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    end = start + payload_length
    if payload_length == 0 or end > len(data):
        return None
    for name, magic in COMPRESSIONS.items():
        if data.startswith(magic, start):
            return Payload(start, payload_length, name)
    return None


def find_payload(data: bytes) -> list[Payload]:
    """Candidate payloads: the boot header's first, then every magic found, by position."""
    found: list[Payload] = []
    header = _header_payload(data)
    if header is not None:
        found.append(header)
    scanned: list[Payload] = []
    for name, magic in COMPRESSIONS.items():
        at = data.find(magic)
        while at != -1:
            scanned.append(Payload(at, None, name))
            at = data.find(magic, at + 1)
    scanned.sort(key=lambda p: p.offset)
    found.extend(p for p in scanned if header is None or p.offset != header.offset)
    return found


def _run_tool(tool: str, blob: bytes) -> bytes:
    """Decompress with a command-line tool; trailing junk may make it complain at the end."""
    path = shutil.which(tool)
    if path is None:
        raise VmlinuxError(f"the {tool!r} command is needed to decompress this kernel")
    proc = subprocess.run([path, "-dc"], input=blob, capture_output=True, check=False)
    # A non-zero status after a complete output is the trailing-junk complaint; the ELF
    # completeness check below decides whether the output is usable.
    return proc.stdout


def _decompress(payload: Payload, data: bytes) -> bytes:
    end = None if payload.length is None else payload.offset + payload.length
    blob = data[payload.offset : end]
    if payload.compression == "gzip":
        return zlib.decompressobj(wbits=31).decompress(blob)
    if payload.compression == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)
    return _run_tool(payload.compression, blob)


def _whole_elf(image: bytes) -> bool:
    """An ELF64 whose section header table lies inside the data (so not truncated)."""
    if not image.startswith(ELF_MAGIC) or len(image) < 64 or image[4] != 2:
        return False
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    return bool(shoff + shentsize * shnum <= len(image))


def extract_vmlinux(data: bytes) -> bytes:
    """Return the vmlinux ELF inside a bzImage (LZ4, ZSTD, gzip or xz payload)."""
    if data.startswith(ELF_MAGIC):
        return data
    candidates = find_payload(data)
    if not candidates:
        raise VmlinuxError("no LZ4, ZSTD, gzip or xz payload found in the bzImage")
    tried: list[str] = []
    for payload in candidates:
        try:
            image = _decompress(payload, data)
        except (zlib.error, lzma.LZMAError, EOFError) as exc:
            tried.append(f"{payload.compression}@{payload.offset:#x}: {exc}")
            continue
        if _whole_elf(image):
            return image
        tried.append(f"{payload.compression}@{payload.offset:#x}: not a whole ELF")
    raise VmlinuxError("no payload decompressed to a whole ELF: " + "; ".join(tried[:8]))
