"""The kallsyms tables found and decoded in an image: synthetic tables in each layout
scripts/kallsyms has emitted (a codec test: the real kernels are in test_attach_memory)."""

from __future__ import annotations

import struct

import pytest

from kprobevm.errors import SymbolError
from kprobevm.kernel.kallsyms_tables import find_kallsyms_tables, kallsyms_from_image

TEXT = 0xFFFFFFFFA4000000
SYMBOLS = [(TEXT + 0x40 * i, "Tt"[i % 2], f"func_{i}_x") for i in range(1, 700)]
SYMBOLS[0] = (TEXT, "T", "_text")


def _align(buf: bytearray) -> None:
    buf.extend(bytes(-len(buf) % 8))


def _tables(
    symbols: list[tuple[int, str, str]],
    *,
    new_order: bool,
    seqs: int,
    encoding: str = "absolute_percpu",
) -> bytes:
    """kallsyms tables as scripts/kallsyms lays them out: names with one token per
    character (every code not used by a name gets a token of its own), addresses as
    ``encoding`` says (base-relative offsets with absolute per-CPU, plain base-relative,
    or absolute pointers); ``new_order`` puts the addresses after the token index (6.4+),
    ``seqs`` bytes per symbol of kallsyms_seqs_of_names (0: none)."""
    chars = {ord(c) for _, t, n in symbols for c in t + n}
    tokens = [bytes([c]) if c in chars else b"#%d#" % c for c in range(256)]
    names = bytearray()
    markers = []
    for i, (_, t, n) in enumerate(symbols):
        if i % 256 == 0:
            markers.append(len(names))
        names += bytes([len(t) + len(n)]) + (t + n).encode()
    base = symbols[0][0]
    if encoding == "absolute":
        addresses = bytearray(b"".join(struct.pack("<Q", a) for a, _, _ in symbols))
    else:
        relative = encoding == "relative"
        addresses = bytearray(
            b"".join(
                struct.pack("<I", a - base) if relative else struct.pack("<i", base - a - 1)
                for a, _, _ in symbols
            )
        )
        _align(addresses)
        addresses += struct.pack("<Q", base)
    out = bytearray(b"\xcc" * 4096)  # some "text" before
    if not new_order:
        out += addresses
        _align(out)
    out += struct.pack("<Ixxxx", len(symbols)) + names
    _align(out)
    out += b"".join(struct.pack("<I", m) for m in markers)
    _align(out)
    out += bytes((i * 7919) & 0xFF for i in range(seqs * len(symbols)))  # name order
    _align(out)
    index = []
    table = bytearray()
    for tok in tokens:
        index.append(len(table))
        table += tok + b"\0"
    out += table
    _align(out)
    out += struct.pack("<256H", *index)
    _align(out)
    if new_order:
        out += addresses
    return bytes(out + bytes(64))


@pytest.mark.parametrize("new_order", [False, True], ids=["6.1-order", "6.4-order"])
@pytest.mark.parametrize("seqs", [0, 3, 4])
def test_decode_every_layout(new_order: bool, seqs: int) -> None:
    image = _tables(SYMBOLS, new_order=new_order, seqs=seqs)
    syms, tables = kallsyms_from_image(image, TEXT)
    assert tables.encoding == "absolute_percpu"
    assert tables.count == len(SYMBOLS)
    assert [(s.address, s.type, s.name) for s in syms] == SYMBOLS


@pytest.mark.parametrize("new_order", [False, True], ids=["6.1-order", "6.4-order"])
@pytest.mark.parametrize("encoding", ["relative", "absolute"])
def test_decode_other_address_encodings(new_order: bool, encoding: str) -> None:
    """Per-CPU symbols not absolute (plain offsets from the base), and no base-relative
    table at all (``kallsyms_addresses``)."""
    image = _tables(SYMBOLS, new_order=new_order, seqs=3, encoding=encoding)
    syms, tables = kallsyms_from_image(image, TEXT)
    assert tables.encoding == encoding
    assert (tables.relative_base is None) is (encoding == "absolute")
    assert [(s.address, s.type, s.name) for s in syms] == SYMBOLS


def test_no_tables_is_a_clear_error() -> None:
    with pytest.raises(SymbolError, match="no kallsyms token table"):
        find_kallsyms_tables(bytes(1 << 16), TEXT)


def test_text_elsewhere_is_refused() -> None:
    """Tables that put _text where the page tables do not are someone else's."""
    image = _tables(SYMBOLS, new_order=True, seqs=0)
    with pytest.raises(SymbolError, match=r"699 names at .*: no address table$"):
        kallsyms_from_image(image, TEXT + 0x200000)
