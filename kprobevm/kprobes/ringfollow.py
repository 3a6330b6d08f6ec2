"""The ring follower: a host thread that moves recorded hits out of the guest's ring
through shared guest RAM as the guest writes them, with the VM running.

Copying a record out costs the host about a microsecond (two bulk copies of the ring's
new part, then a walk over the stamps); decoding it and running its handler costs tens,
and a guest that records fast (a ``dd bs=1`` loop) fills the ring faster than the trap
thread's idle drain decodes it, which then costs a VM stop on the ring's watched mark.
The follower only copies (:meth:`Recorder.copy_out`) and moves the ring's tail, every
:data:`FOLLOW_INTERVAL` seconds; the records wait in the host's backlog for the idle
drain, which decodes them in batches. It takes no lock but the
recorder's copy lock, held for no wait.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from kprobevm.errors import VMError

if TYPE_CHECKING:
    from kprobevm.kprobes.recorder import Recorder

__all__ = ["FOLLOW_INTERVAL", "RingFollower"]

log = logging.getLogger(__name__)

FOLLOW_INTERVAL = 0.002
"""Seconds between looks at the ring's head: the ring to its watched mark (384 KiB, some
1,800 records of a register snapshot and one number) fills between two looks only past
900,000 records a second; what fills it is a longer gap (:attr:`RingFollower.max_gap`)."""
IDLE_INTERVAL = 0.1
"""Seconds between looks while no recorded probe exists."""
STOP_DEADLINE = 5.0
"""Seconds :meth:`RingFollower.stop` waits for the thread (one copy takes milliseconds)."""


class RingFollower:
    """The thread that follows one recorder's ring (shared guest RAM only)."""

    def __init__(self, recorder: Recorder, *, name: str = "vm") -> None:
        self.recorder = recorder
        self.copies = 0
        """Looks that moved records out."""
        self.copied = 0
        """Records moved out."""
        self.max_gap = 0.0
        """The longest time between two looks, in seconds (the process not scheduled, or
        waiting for the interpreter lock): the ring must hold what the guest records
        meanwhile."""
        self.error: BaseException | None = None
        """Why the thread ended early (the idle drain goes on without it)."""
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kprobevm-ring-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the thread (before the ring goes)."""
        self._quit.set()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_DEADLINE)
            if self._thread.is_alive():
                raise VMError(f"the ring follower did not end within {STOP_DEADLINE:g} s")

    def _run(self) -> None:
        recorder = self.recorder
        last = time.monotonic()
        try:
            while not self._quit.wait(FOLLOW_INTERVAL):
                if not (recorder.probes or recorder.retiring):
                    self._quit.wait(IDLE_INTERVAL)  # nothing records: look rarely
                    last = time.monotonic()
                    continue
                now = time.monotonic()
                self.max_gap, last = max(self.max_gap, now - last), now
                n = recorder.copy_out(running=True)
                if n:
                    self.copies += 1
                    self.copied += n
        except Exception as exc:  # said, and kept: the idle drain still empties the ring
            self.error = exc
            log.warning("the ring follower stopped, the idle drain goes on alone: %s", exc)
