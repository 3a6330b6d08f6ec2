"""The generic kprobes engine, after the kernel's ``kernel/kprobes.c``.

The probe table and aggregate probes (:mod:`.core`), return probes (:mod:`.kretprobes`),
the instruction-slot cache (:mod:`.slots`), recorded probes (:mod:`.recorder`), and the
write journal with its recovery (:mod:`.journal`, :mod:`.recover`). What is particular
to x86 lives in :mod:`kprobevm.x86`; how a trap reaches the host, in :mod:`kprobevm.trap`.
"""

from kprobevm.kprobes.core import Kprobe, KprobeManager, PostHandler, PreHandler, ProbeSite
from kprobevm.kprobes.kretprobes import Kretprobe, KretprobeInstance

__all__ = [
    "Kprobe",
    "KprobeManager",
    "Kretprobe",
    "KretprobeInstance",
    "PostHandler",
    "PreHandler",
    "ProbeSite",
]
