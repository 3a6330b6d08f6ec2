"""vmlinux extraction on synthetic bzImages: each compression, wrapped in junk, and the
boot-header path; no kernel needed."""

from __future__ import annotations

import gzip
import lzma
import os
import shutil
import struct
import subprocess

import pytest

from kprobevm.errors import VmlinuxError
from kprobevm.guest.bzimage import COMPRESSIONS, extract_vmlinux, find_payload


def fake_elf(body: bytes = b"") -> bytes:
    """An ELF64 header whose section header table (2 entries) lies at the end of the data."""
    body = body or os.urandom(3000) + b"kernel text" * 500
    shoff = 64 + len(body)
    header = bytearray(64)
    header[0:4] = b"\x7fELF"
    header[4] = 2  # ELFCLASS64
    header[5] = 1  # little endian
    struct.pack_into("<Q", header, 0x28, shoff)
    struct.pack_into("<HH", header, 0x3A, 64, 2)
    return bytes(header) + body + bytes(128)


def compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    if kind == "xz":
        return lzma.compress(data, format=lzma.FORMAT_XZ)
    tool = {"lz4": ["lz4", "-l", "-c"], "zstd": ["zstd", "-c", "-q"]}[kind]
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} is not installed")
    return subprocess.run(tool, input=data, capture_output=True, check=True).stdout


JUNK_BEFORE = b"MZ" + b"\x00\x11setup code" * 300
# The kernel's build appends the decompressed size after the payload; junk stands for it.
JUNK_AFTER = b"\x78\x56\x34\x12" + b"\xee" * 61


@pytest.mark.parametrize("kind", sorted(COMPRESSIONS))
def test_each_compression_is_found_and_decompressed_through_junk(kind: str) -> None:
    elf = fake_elf()
    blob = JUNK_BEFORE + compress(kind, elf) + JUNK_AFTER
    payloads = find_payload(blob)
    assert payloads[0].compression == kind
    assert payloads[0].offset == len(JUNK_BEFORE)
    assert extract_vmlinux(blob) == elf


def fake_bzimage(payload: bytes, prefix: bytes, *, setup_sects: int = 3) -> bytes:
    """Boot sector + setup (setup_sects sectors) + decompressor code (``prefix``) + payload."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    struct.pack_into("<II", setup, 0x248, len(prefix), len(payload))
    return bytes(setup) + prefix + payload + JUNK_AFTER


def test_boot_header_names_the_payload_even_with_a_decoy_magic_before_it() -> None:
    elf = fake_elf()
    # A zstd magic inside the decompressor code: a scan alone would try it first.
    code = b"\x90" * 100 + COMPRESSIONS["zstd"] + b"not a zstd frame" * 4
    image = fake_bzimage(compress("xz", elf), code)
    first = find_payload(image)[0]
    assert first.compression == "xz" and first.length is not None
    assert extract_vmlinux(image) == elf


def test_a_decoy_magic_is_skipped_when_scanning() -> None:
    elf = fake_elf()
    blob = b"junk" + COMPRESSIONS["gzip"] + b"garbage" * 10 + compress("gzip", elf)
    assert [p.compression for p in find_payload(blob)][:2] == ["gzip", "gzip"]
    assert extract_vmlinux(blob) == elf


def test_an_elf_is_returned_unchanged() -> None:
    elf = fake_elf()
    assert extract_vmlinux(elf) == elf


def test_no_payload_is_an_error() -> None:
    with pytest.raises(VmlinuxError, match="no LZ4"):
        extract_vmlinux(b"\x00" * 4096)


def test_a_truncated_payload_is_an_error_not_a_short_vmlinux() -> None:
    packed = compress("xz", fake_elf())
    with pytest.raises(VmlinuxError, match="whole ELF"):
        extract_vmlinux(b"junk" + packed[: len(packed) // 2])


def test_a_payload_that_is_not_an_elf_is_an_error() -> None:
    with pytest.raises(VmlinuxError, match="whole ELF"):
        extract_vmlinux(b"junk" + gzip.compress(b"just text, no ELF header" * 100))
