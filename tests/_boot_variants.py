"""Boot variants of the default image's kernel that the variant tests and the
differential harness run on, as ``kprobevm.boot()`` arguments."""

from __future__ import annotations

from kprobevm.guest.launcher import LA57_CPU

BOOT_VARIANTS: dict[str, dict[str, object]] = {
    "kaslr": {"kaslr": True},
    "la57": {"cpu": LA57_CPU},
    "kaslr-la57": {"kaslr": True, "cpu": LA57_CPU},
}
"""KASLR on (the image boots ``nokaslr``), 5-level paging, and both at once."""
