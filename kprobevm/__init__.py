"""kprobevm: Linux kprobes for a QEMU x86_64 guest, driven from the host.

``with kprobevm.boot() as vm: vm.run("uname -r")`` boots the default guest image.
"""

from __future__ import annotations

from kprobevm.errors import *  # noqa: F403 (the error tree is part of the public API)
from kprobevm.errors import __all__ as _errors_all
from kprobevm.guest.image import Image, default_image
from kprobevm.guest.launcher import DEFAULT_CPU, LA57_CPU, boot
from kprobevm.guest.shell import RunResult
from kprobevm.guest.vm import VM, GuestEndpoints, attach
from kprobevm.kprobes.core import Kprobe
from kprobevm.tracing import parse_event

__all__ = [
    "DEFAULT_CPU",
    "LA57_CPU",
    "VM",
    "GuestEndpoints",
    "Image",
    "Kprobe",
    "RunResult",
    "attach",
    "boot",
    "default_image",
    "parse_event",
    *_errors_all,
]
