"""Boot variants the conformance subset runs on, as ``kprobevm.boot()`` arguments: the
default image's kernel with another layout, and other Debian kernels."""

from __future__ import annotations

from kprobevm.guest.launcher import LA57_CPU

BOOT_VARIANTS: dict[str, dict[str, object]] = {
    "kaslr": {"kaslr": True},
    "la57": {"cpu": LA57_CPU},
    "kaslr-la57": {"kaslr": True, "cpu": LA57_CPU},
}
"""KASLR on (the image boots ``nokaslr``), 5-level paging, and both at once."""

KERNEL_VARIANTS: dict[str, dict[str, object]] = {
    "6.1-rt": {"kernel_package": "linux-image-rt-amd64"},
    "6.12-cloud": {"kernel_package": "linux-image-6.12-cloud-amd64"},
    "6.12-rt": {"kernel_package": "linux-image-6.12-rt-amd64"},
}
"""Other Debian kernels through the whole subset: 6.1 PREEMPT_RT, and 6.12 cloud and
PREEMPT_RT (IBT, CALL_PADDING, their own blacklist, BTF arguments, a return probe's
arguments)."""
