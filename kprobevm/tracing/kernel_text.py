"""Command text as the kernel reads it: its character classes and number parsers.

``lib/ctype.c`` and ``lib/kstrtox.c`` decide what a kprobe_events word means: what splits
words, what a C identifier is, which numbers parse. The kernel works on bytes, so text
is carried here as *kernel text*: one character per byte of its UTF-8 encoding
(:func:`to_kernel_text`), which makes every position a byte offset as the kernel counts it.
"""

from __future__ import annotations

import re

from kprobevm.x86.constants import MASK64

__all__ = [
    "SPACE_RE",
    "UINT_MAX",
    "from_kernel_text",
    "is_good_name",
    "isdigit",
    "kernel_words",
    "kstrtol",
    "kstrtouint",
    "kstrtoul",
    "simple_strtoul",
    "to_kernel_text",
]

UINT_MAX = (1 << 32) - 1
_LONG_MAX = (1 << 63) - 1

# isspace() in lib/ctype.c: the C whitespace plus Latin-1 NBSP (0xa0), which is why a
# UTF-8 byte 0xa0 splits a word in the kernel too.
SPACE_RE = re.compile("[ \t\n\v\f\r\xa0]+")


def _isalpha(ch: str) -> bool:
    # Latin-1 letters count in the kernel's ctype table (0xc0-0xff less 0xd7 and 0xf7).
    o = ord(ch)
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z") or (0xC0 <= o <= 0xFF and o not in (0xD7, 0xF7))


def isdigit(ch: str) -> bool:
    """isdigit(): an ASCII digit (the empty string is none)."""
    return "0" <= ch <= "9"


def _isxdigit(ch: str) -> bool:
    return isdigit(ch) or "a" <= ch.lower() <= "f"


def is_good_name(name: str, hash_ok: bool = False) -> bool:
    """is_good_name(): a C identifier (group names may also hold '-')."""
    if not name:
        return False
    first = name[0]
    if not (_isalpha(first) or first == "_" or (hash_ok and first == "-")):
        return False
    return all(_isalpha(c) or isdigit(c) or c == "_" or (hash_ok and c == "-") for c in name[1:])


def _fixup_radix(s: str, base: int) -> tuple[str, int]:
    if base == 0:
        if s[:1] == "0":
            base = 16 if s[1:2].lower() == "x" and _isxdigit(s[2:3] or "g") else 8
        else:
            base = 10
    if base == 16 and s[:1] == "0" and s[1:2].lower() == "x":
        s = s[2:]
    return s, base


def _parse_digits(s: str, base: int) -> tuple[int, int, bool]:
    """_parse_integer(): (value mod 2**64, digits used, overflowed)."""
    value, used, overflow = 0, 0, False
    for ch in s:
        if isdigit(ch):
            d = ord(ch) - 48
        elif "a" <= ch.lower() <= "f":
            d = ord(ch.lower()) - 87
        else:
            break
        if d >= base:
            break
        value = value * base + d
        if value > MASK64:
            overflow = True
            value &= MASK64
        used += 1
    return value, used, overflow


def _kstrtoull_raw(s: str, base: int) -> int | None:
    s, base = _fixup_radix(s, base)
    value, used, overflow = _parse_digits(s, base)
    if overflow or used == 0:
        return None
    rest = s[used:]
    if rest in ("", "\n"):
        return value
    return None


def kstrtoul(s: str, base: int = 0) -> int | None:
    """kstrtoul() on 64-bit: an unsigned long, or None where the kernel says -EINVAL/-ERANGE."""
    if s[:1] == "+":
        s = s[1:]
    return _kstrtoull_raw(s, base)


def kstrtouint(s: str, base: int = 0) -> int | None:
    """kstrtouint(): as :func:`kstrtoul` but at most UINT_MAX."""
    value = kstrtoul(s, base)
    return None if value is None or value > UINT_MAX else value


def kstrtol(s: str, base: int = 0) -> int | None:
    """kstrtol(): a signed long (a leading '-' or '+'), or None."""
    if s[:1] == "-":
        value = _kstrtoull_raw(s[1:], base)
        if value is None or value > _LONG_MAX + 1:
            return None
        return -value
    value = kstrtoul(s, base)
    return None if value is None or value > _LONG_MAX else value


def simple_strtoul(s: str) -> tuple[int, int]:
    """simple_strtoul(s, &end, 0): (value, index of the first unparsed character)."""
    rest, base = _fixup_radix(s, 0)
    value, used, _ = _parse_digits(rest, base)
    return value, len(s) - len(rest) + used


def to_kernel_text(text: str) -> str:
    """One character per byte of the UTF-8 text, as the kernel sees it."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def from_kernel_text(text: str) -> str:
    """The text again from kernel text (the inverse of :func:`to_kernel_text`)."""
    return text.encode("latin-1").decode("utf-8", "surrogateescape")


def kernel_words(text: str) -> list[str]:
    """``text`` as kernel text split into words at the kernel's white space (argv_split)."""
    return [w for w in SPACE_RE.split(to_kernel_text(text)) if w]
