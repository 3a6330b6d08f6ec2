"""The guest kernel's own stack counts: a tracefs kprobe with a ``hist`` trigger keyed by
its stack, for the tests that hold ``count --by stack`` against it.

The kernel's key is ``stacktrace`` (``common_stacktrace`` since 6.5, which still takes the
old name and prints the new one). It is taken inside the trigger (``stack_trace_save``,
not from the probe's registers), so it begins with the kprobe's own frames (the ftrace
handler and trampoline on an ftrace-based kprobe) and the probed function's frame at its
call of them: the frames compared are the probed function's callers, after that frame.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kprobevm.guest.vm import VM
from kprobevm.kprobes.aggregations import MapSnapshot, StackKey

TRACEFS = "/sys/kernel/tracing"
HIST_DEPTH = 16
"""Frames the kernel's stack key keeps (``HIST_STACKTRACE_DEPTH``)."""
_ENTRY = re.compile(r"\{ (?:common_)?stacktrace:\n(.*?)\n\} hitcount: +(\d+)", re.S)

Callers = tuple[str, ...]


@dataclass
class GuestHist:
    """A tracefs kprobe on ``function`` whose hits the guest counts by stack."""

    vm: VM
    function: str
    event: str = "stackcmp/st"
    key: str = ""
    """The key's name as the guest prints it (``stacktrace`` on 6.1, ``common_stacktrace``
    since 6.5), read back with the counts."""

    def start(self) -> None:
        trigger = f"{TRACEFS}/events/{self.event}/trigger"
        self.vm.run(f"echo 'p:{self.event} {self.function}' >> {TRACEFS}/kprobe_events &&"
                    f" echo 'hist:keys=stacktrace' > {trigger}", check=True)  # fmt: skip

    def pause(self) -> None:
        # (the old name works on the kernels that renamed it, as an alias)
        trigger = f"{TRACEFS}/events/{self.event}/trigger"
        self.vm.run(f"echo 'hist:keys=stacktrace:pause' >> {trigger}", check=True)

    def read(self) -> tuple[dict[Callers, int], int]:
        """Hits by the probed function's callers, and hits whose frames do not show
        the probed function (the key ran out of frames before it)."""
        text = self.vm.run(f"cat {TRACEFS}/events/{self.event}/hist", check=True).stdout
        shown = re.search(r"hist:keys=(\w+)", text)
        assert shown is not None, text
        self.key = shown[1]
        counts: dict[Callers, int] = {}
        unplaced = 0
        for frames_text, hits in _ENTRY.findall(text):
            frames = [f.strip() for f in frames_text.splitlines()]
            at = next((i for i, f in enumerate(frames) if f.startswith(f"{self.function}+")),
                      None)  # fmt: skip
            if at is None:
                unplaced += int(hits)
                continue
            callers = tuple(frames[at + 1 :])
            counts[callers] = counts.get(callers, 0) + int(hits)
        return counts, unplaced

    def remove(self) -> None:
        trigger = f"{TRACEFS}/events/{self.event}/trigger"
        self.vm.run(f"echo '!hist:keys=stacktrace' >> {trigger};"
                    f" echo '-:{self.event}' >> {TRACEFS}/kprobe_events")  # fmt: skip


def our_callers(vm: VM, key: StackKey) -> Callers:
    """A key's frames after the first (the probe's address + 1), as ``%pS`` prints them."""
    return tuple(vm.symbols.describe(addr) for addr in key.frames[1:])


def counts_between(before: MapSnapshot, after: MapSnapshot) -> dict[StackKey, int]:
    """Hits per stack counted between two snapshots of one map."""
    earlier = dict(before.counts)
    out: dict[StackKey, int] = {}
    for key, n in after.counts:
        assert isinstance(key, StackKey), key
        if n - earlier.get(key, 0):
            out[key] = n - earlier.get(key, 0)
    return out
