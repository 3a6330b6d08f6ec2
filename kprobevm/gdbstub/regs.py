"""Register layout learnt from the target's XML description, and the ``g``/``P`` codec.

Registers are looked up by name; their number, offset in the ``g`` packet and size come
from ``qXfer:features:read`` (never from a hard-coded table nothing checked). The XML is
parsed with :mod:`xml.etree`, which drops comments: QEMU's ``i386-64bit.xml`` names
``ss_base``/``ds_base``/``es_base`` inside a comment, and a regex would count them.
"""

from __future__ import annotations

import binascii
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from kprobevm.errors import GdbProtocolError, UnknownRegister

__all__ = ["Register", "RegisterLayout"]

_XI_INCLUDE = "{http://www.w3.org/2001/XInclude}include"
MAX_REGISTER_BITS = 4096
"""Widest register a target description may declare (x86's widest, zmm, has 512 bits)."""
MAX_REGNUM = 0xFFFF
_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class Register:
    """One register: its number for ``p``/``P``, and where it sits in the ``g`` packet."""

    name: str
    regnum: int
    offset: int
    """Byte offset in the ``g`` packet (registers are packed in regnum order)."""
    size: int
    """Size in bytes."""
    type: str = ""
    group: str = ""
    feature: str = ""


class RegisterLayout:
    """The target's registers by name, with a fast decoder for ``g`` replies."""

    def __init__(self, registers: Iterable[Register], architecture: str = "") -> None:
        regs = sorted(registers, key=lambda r: r.regnum)
        self.architecture = architecture
        self.registers: tuple[Register, ...] = tuple(regs)
        self._by_name: dict[str, Register] = {r.name: r for r in regs}
        self.g_size = sum(r.size for r in regs)
        """Size in bytes of a ``g`` reply that carries every register."""
        # One struct format for the whole packet: registers of 1/2/4/8 bytes decode in C;
        # wider ones (x87 80-bit, xmm 128-bit) come out as bytes and are converted after.
        fmt = "<" + "".join(_STRUCT_CODES.get(r.size, f"{r.size}s") for r in regs)
        self._struct = struct.Struct(fmt)
        self._names = tuple(r.name for r in regs)
        # The same without the wide registers: pad bytes ('x') skip them in C.
        self._narrow = struct.Struct(
            "<" + "".join(_STRUCT_CODES.get(r.size, f"{r.size}x") for r in regs))
        self._narrow_names = tuple(r.name for r in regs if r.size in _STRUCT_CODES)
        self._wide = tuple(i for i, r in enumerate(regs) if r.size not in _STRUCT_CODES)
        self._ends = tuple(r.offset + r.size for r in regs)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_target_xml(
        cls, xml_text: str | bytes, fetch: Callable[[str], str | bytes] | None = None
    ) -> RegisterLayout:
        """Build the layout from ``target.xml``; ``fetch(annex)`` reads ``xi:include`` files.

        Registers without ``regnum`` follow the previous one; offsets accumulate in
        regnum order, as the ``g`` packet lays them out.
        """
        raw: list[tuple[str, int | None, int, str, str, str]] = []
        arch = ""

        def visit(text: str | bytes, annex: str, depth: int) -> None:
            nonlocal arch
            if depth > 8:
                raise GdbProtocolError(f"xi:include nested too deep at {annex}")
            try:
                root = ET.fromstring(text)
            except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: encoding=
                raise GdbProtocolError(f"target description {annex} is not XML: {exc}") from exc
            feature = root.get("name", "") if root.tag == "feature" else ""
            for el in root.iter():
                if el.tag == "architecture" and el.text:
                    arch = el.text.strip()
                elif el.tag == "feature" and el is not root:
                    feature = el.get("name", "")
                elif el.tag == _XI_INCLUDE or el.tag.endswith("include"):
                    href = el.get("href")
                    if not href:
                        continue
                    if fetch is None:
                        raise GdbProtocolError(f"{annex} includes {href} but nothing can fetch it")
                    visit(fetch(href), href, depth + 1)
                elif el.tag == "reg":
                    raw.append(_reg_fields(el, feature, annex))

        visit(_declare_xi(xml_text), "target.xml", 0)
        if not raw:
            raise GdbProtocolError("target description names no registers")
        registers: list[Register] = []
        next_num = 0
        seen: set[int] = set()
        for name, regnum, bits, rtype, group, feature in raw:
            num = next_num if regnum is None else regnum
            if num in seen:
                raise GdbProtocolError(f"register number {num} ({name}) used twice")
            seen.add(num)
            next_num = num + 1
            registers.append(Register(name, num, 0, (bits + 7) // 8, rtype, group, feature))
        registers.sort(key=lambda r: r.regnum)
        offset = 0
        placed = []
        for r in registers:
            placed.append(Register(r.name, r.regnum, offset, r.size, r.type, r.group, r.feature))
            offset += r.size
        return cls(placed, arch)

    # -- lookup ------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Register:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownRegister(name) from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.registers)

    @property
    def names(self) -> tuple[str, ...]:
        """Register names in regnum order."""
        return self._names

    # -- codec -------------------------------------------------------------------------

    def decode(self, g_reply: bytes | str, *, wide: bool = True) -> dict[str, int]:
        """Decode a ``g`` reply (hex) to name -> value; registers it lacks are left out.

        ``wide=False`` leaves out registers wider than 8 bytes (x87, xmm): half the cost,
        for a probe handler that wants the general-purpose and control registers.
        """
        try:
            data = binascii.unhexlify(g_reply)
        except (binascii.Error, ValueError):
            return self._decode_with_unavailable(g_reply)
        return self.decode_bytes(data, wide=wide)

    def decode_bytes(self, data: bytes, *, wide: bool = True) -> dict[str, int]:
        """Decode the binary ``g`` contents (little-endian registers)."""
        if len(data) >= self.g_size:
            if not wide:
                return dict(zip(self._narrow_names, self._narrow.unpack_from(data),
                                strict=True))
            values = self._struct.unpack_from(data)
            full = dict(zip(self._names, values, strict=True))
            for i in self._wide:
                full[self._names[i]] = int.from_bytes(values[i], "little")
            return full
        out: dict[str, int] = {}
        for r, end in zip(self.registers, self._ends, strict=True):
            if end > len(data):
                break
            out[r.name] = int.from_bytes(data[r.offset:end], "little")
        return out

    def _decode_with_unavailable(self, g_reply: bytes | str) -> dict[str, int]:
        # gdb allows 'xx' for a register the stub cannot read: leave those out.
        text = g_reply.decode("ascii", "replace") if isinstance(g_reply, bytes) else g_reply
        out: dict[str, int] = {}
        for r in self.registers:
            chunk = text[2 * r.offset:2 * (r.offset + r.size)]
            if len(chunk) < 2 * r.size:
                break
            if "x" in chunk:
                continue
            try:
                out[r.name] = int.from_bytes(bytes.fromhex(chunk), "little")
            except ValueError as exc:
                raise GdbProtocolError("malformed hex in g reply",
                                       received=text[:200].encode()) from exc
        return out

    def encode_value(self, name: str, value: int) -> bytes:
        """``value`` as the hex text ``P`` wants (little-endian, the register's size)."""
        reg = self[name]
        return binascii.hexlify((value & ((1 << (8 * reg.size)) - 1)).to_bytes(reg.size, "little"))

    def p_packet(self, name: str, value: int) -> bytes:
        """The ``Pnn=value`` packet that writes one register."""
        return b"P%x=%s" % (self[name].regnum, self.encode_value(name, value))

    def encode(self, values: Mapping[str, int], base: bytes) -> bytes:
        """A full ``G`` payload body: ``base`` (binary g contents) with ``values`` patched in."""
        data = bytearray(base[:self.g_size])
        if len(data) < self.g_size:
            raise ValueError(f"base has {len(data)} bytes, the g packet needs {self.g_size}")
        for name, value in values.items():
            r = self[name]
            data[r.offset:r.offset + r.size] = (value & ((1 << (8 * r.size)) - 1)).to_bytes(
                r.size, "little")
        return binascii.hexlify(bytes(data))


def _reg_fields(
    el: ET.Element, feature: str, annex: str
) -> tuple[str, int | None, int, str, str, str]:
    name = el.get("name")
    bits = el.get("bitsize")
    if not name or not bits:
        raise GdbProtocolError(f"<reg> without name or bitsize in {annex}")
    try:
        regnum = el.get("regnum")
        num = int(regnum, 0) if regnum is not None else None
        size = int(bits, 0)
    except ValueError as exc:
        raise GdbProtocolError(f"bad number in <reg name={name!r}> in {annex}") from exc
    if not 0 < size <= MAX_REGISTER_BITS or (num is not None and not 0 <= num <= MAX_REGNUM):
        raise GdbProtocolError(f"<reg name={name!r}> in {annex}: bitsize {bits} or regnum "
                               f"{regnum} out of range")
    return (name, num, size, el.get("type", ""), el.get("group", ""), feature)


def _declare_xi(text: str | bytes) -> str | bytes:
    # QEMU's target.xml uses the xi: prefix without declaring the namespace; expat refuses
    # unbound prefixes, so declare it on the root element when missing.
    marker: str | bytes
    if isinstance(text, bytes):
        if b"xi:" in text and b"xmlns:xi" not in text:
            marker = b'<target xmlns:xi="http://www.w3.org/2001/XInclude"'
            return text.replace(b"<target", marker, 1)
        return text
    if "xi:" in text and "xmlns:xi" not in text:
        return text.replace("<target", '<target xmlns:xi="http://www.w3.org/2001/XInclude"', 1)
    return text
