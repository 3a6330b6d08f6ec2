"""kprobevm: Linux kprobes for a QEMU x86_64 guest, driven from the host.

``with kprobevm.boot() as vm: vm.run("uname -r")`` boots the default guest image.
"""

from __future__ import annotations

from kprobevm.errors import *  # noqa: F403 (the error tree is part of the public API)
from kprobevm.errors import __all__ as _errors_all
from kprobevm.events import parse_event
from kprobevm.image import Image, default_image
from kprobevm.kprobes import Kprobe
from kprobevm.launcher import boot
from kprobevm.shell import RunResult
from kprobevm.vm import VM, GuestEndpoints, attach

__all__ = [
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
