"""The ring follower: records moved out of the guest's ring through shared guest RAM as
the guest writes them, with the VM running.

Copying a record out costs the host about a microsecond (two bulk copies of the ring's
new part, then a walk over the stamps); decoding it and running its handler costs tens,
and a guest that records fast (a ``dd bs=1`` loop) fills the ring's watched mark (384
KiB) in about 25 ms. A thread of this process cannot look that often for sure: it waits
for the interpreter lock, which a full garbage collection holds 20-100 ms on a heap of
decoded hits (measured: every gap over 20 ms of such a thread fell in a collection). So
the follower is a child process (:mod:`kprobevm.kprobes.ringchild`) with its own
interpreter: while it runs it owns the ring's tail, copies complete records into a
host-side buffer (:class:`ChildFeed`) every :data:`FOLLOW_INTERVAL` seconds, and the
recorder's drains decode from that buffer; with the VM stopped a drain first asks the
child for one more look and waits for it (:meth:`ChildFeed.sync`, with a deadline).
When the child ends (close, or no answer in time) the recorder takes the tail back with
everything the child copied. Where no child can reach the RAM, a thread does the copying
as before, said on stderr (:attr:`RingFollower.fallback`).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from kprobevm.errors import VMError
from kprobevm.guest.guestram import RamReader
from kprobevm.kprobes import ringchild
from kprobevm.x86 import record as rec
from kprobevm.x86.constants import PAGE_SIZE

if TYPE_CHECKING:
    from kprobevm.kprobes.recorder import Recorder

__all__ = ["FOLLOW_INTERVAL", "ChildFeed", "RingFollower"]

log = logging.getLogger(__name__)

FOLLOW_INTERVAL = 0.002
"""Seconds between looks at the ring's head: the ring to its watched mark (384 KiB, some
1,800 records of a register snapshot and one number) fills between two looks only past
900,000 records a second; what fills it is a longer gap (:attr:`RingFollower.max_gap`)."""
IDLE_INTERVAL = 0.1
"""Seconds between looks while no recorded probe exists (thread follower)."""
STOP_DEADLINE = 5.0
"""Seconds :meth:`RingFollower.stop` waits for the thread or the child (one look takes
milliseconds)."""
SYNC_DEADLINE = 2.0
"""Seconds a drain with the VM stopped waits for the child's look (it looks every 2 ms
and at once when woken); past it the host copies the ring itself."""
CHILD_BUFFER = 32 << 20
"""Bytes of records the child may hold for the host's decoding: a full buffer stops its
copying, the ring fills, and the guest asks for a stop (the decoding then catches up)."""
_STAMP_SIZE_ID = struct.Struct("<QIH")
_W = {word: i for i, word in enumerate(ringchild.WORDS)}


class ChildFeed:
    """The host's side of the follower child: its buffer of copied records and the
    words it shares with the child."""

    def __init__(self, recorder: Recorder, *, name: str, cap: int = CHILD_BUFFER) -> None:
        """Make the buffer; :meth:`spawn` starts the child once the recorder has handed
        the tail over (:meth:`Recorder.adopt_feed`)."""
        reader = recorder.direct
        ram = reader.ram if isinstance(reader, RamReader) else None
        store = ram.store_fd() if ram is not None else None
        if ram is None or store is None:
            raise VMError("guest RAM is reachable only from this process (no file to share)")
        self.cap, self.name, self.rd = cap, name, 0
        self.process: subprocess.Popen[bytes] | None = None
        self._last: dict[str, int] | None = None  # the words, once the buffer is gone
        self._store, self._fds = store, [store]
        layout = recorder.layout
        self._config: dict[str, object] = {
            "pages": [ram.store_offset(p, PAGE_SIZE) for p in recorder.ring_phys],
            "head": ram.store_offset(recorder.area.phys(layout.head), 8),
            "tail": ram.store_offset(recorder.area.phys(layout.tail), 8),
            "ring_size": layout.ring_size, "pad_bit": rec.PAD_BIT, "cap": cap,
            "interval": FOLLOW_INTERVAL, "parent": os.getpid(),
        }  # fmt: skip
        try:
            self._buffer_fd = os.memfd_create(f"kprobevm-ring-{name}")
            self._fds.append(self._buffer_fd)
            os.ftruncate(self._buffer_fd, ringchild.HEADER + cap)
            self._buffer = mmap.mmap(self._buffer_fd, ringchild.HEADER + cap)
        except OSError as exc:
            self._close_fds()
            raise VMError(f"no buffer for the ring follower's child: {exc}") from exc
        self._hdr = ringchild.header(self._buffer)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)  # a child that reads none must not stall us
        self._fds.append(self._wake_r)

    def begin(self, tail: int) -> None:
        """The ring's tail as the child starts from it."""
        self._hdr[_W["tail"]] = tail

    def spawn(self) -> None:
        """Start the child (the tail is its from now on)."""
        config = self._config | {"store_fd": self._store,
                                 "buffer_fd": self._buffer_fd, "wake_fd": self._wake_r}  # fmt: skip
        try:
            self.process = subprocess.Popen(
                [sys.executable, ringchild.__file__, json.dumps(config)],
                pass_fds=tuple(self._fds), stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise VMError(f"the ring follower's child did not start: {exc}") from exc
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    @property
    def max_gap(self) -> float:
        """The child's longest time between two looks, in seconds."""
        return self._word("max_gap_ns") / 1e9

    @property
    def max_fill(self) -> int:
        """The most bytes a look of the child found waiting in the ring."""
        return self._word("max_fill")

    @property
    def max_stall(self) -> float:
        """The longest the child's looks waited at a record not stamped yet, in seconds:
        a vCPU inside the record program that the host did not run meanwhile (records
        after it wait too, and the ring fills however often the child looks)."""
        return self._word("max_stall_ns") / 1e9

    @property
    def scheduling(self) -> str:
        """How the child is scheduled: ``SCHED_FIFO``, ``normal (why)``, or ``unknown``
        before it has asked."""
        sched = self._word("sched")
        if sched == ringchild.SCHED_FIFO:
            return "SCHED_FIFO"
        if sched == ringchild.SCHED_NORMAL:
            return f"normal ({os.strerror(self._word('sched_errno'))} for SCHED_FIFO)"
        return "unknown"

    @property
    def looks(self) -> int:
        """The child's looks at the ring."""
        return self._word("looks")

    def _word(self, word: str) -> int:
        return int(self._hdr[_W[word]]) if self._last is None else self._last[word]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def sync(self) -> bool:
        """Have the child look once more (the VM is stopped: its head moves no more) and
        wait for that look; False when the child is gone or does not answer in time."""
        hdr = self._hdr
        asked = int(hdr[_W["sync_req"]]) + 1
        hdr[_W["sync_req"]] = asked
        try:
            os.write(self._wake_w, b"s")
        except BlockingIOError:
            pass  # wake-ups wait for it already
        except OSError:
            return False
        deadline = time.monotonic() + SYNC_DEADLINE
        while int(hdr[_W["sync_done"]]) < asked:
            if time.monotonic() > deadline or not self.alive():
                return False
            time.sleep(0.0002)
        return True

    def take(self, tail: int, *, budget: int | None) -> tuple[int, list[tuple[int, int, bytes]]]:
        """The records the child copied since the last take (at most ``budget`` bytes of
        them): (end position, probe id, bytes) each, and the ring position the host has
        them all before (``tail`` when none)."""
        hdr = self._hdr
        ring_tail = int(hdr[_W["tail"]])  # before wr: every record before it is below wr
        wr, rd = int(hdr[_W["wr"]]), self.rd
        n = wr - rd if budget is None else min(wr - rd, max(0, budget))
        data = self._read(rd, n)
        out: list[tuple[int, int, bytes]] = []
        at = 0
        while at + _STAMP_SIZE_ID.size <= len(data):
            stamp, size, probe_id = _STAMP_SIZE_ID.unpack_from(data, at)
            if at + size > len(data):
                break
            out.append((stamp - 1 + size, probe_id, data[at : at + size]))
            at += size
        self.rd = rd + at
        hdr[_W["rd"]] = self.rd
        if self.rd == wr:
            return max(tail, ring_tail), out
        return (out[-1][0] if out else tail), out

    def _read(self, rd: int, n: int) -> bytes:
        start = ringchild.HEADER + rd % self.cap
        first = min(n, ringchild.HEADER + self.cap - start)
        data = self._buffer[start : start + first]
        if first < n:
            data += self._buffer[ringchild.HEADER : ringchild.HEADER + n - first]
        return data

    def end(self) -> None:
        """End the child (asked, then killed past :data:`STOP_DEADLINE`): its last words
        stay readable for the take that hands the tail back."""
        self._hdr[_W["quit"]] = 1
        if self._wake_w >= 0:
            os.close(self._wake_w)  # wakes it; and it would see EOF had we died
            self._wake_w = -1
        process = self.process
        if process is None:
            return
        try:
            process.wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            log.warning("the ring follower's child %d did not end within %g s: killed",
                        process.pid, STOP_DEADLINE)  # fmt: skip
            process.kill()
            process.wait(timeout=STOP_DEADLINE)

    def close(self) -> None:
        """Let go of the buffer (after the last take)."""
        self._last = {word: int(self._hdr[i]) for word, i in _W.items()}
        del self._hdr
        self._buffer.close()


class RingFollower:
    """What follows one recorder's ring (shared guest RAM only): the child process, else
    a thread of this process."""

    def __init__(self, recorder: Recorder, *, name: str = "vm") -> None:
        self.recorder = recorder
        self.name = name
        self.feed: ChildFeed | None = None
        """The child's side, kept after it ends for its figures."""
        self.fallback: str | None = None
        """Why the copying runs in a thread of this process (None: in the child)."""
        self.copies = 0
        """Looks that moved records out (thread follower)."""
        self.copied = 0
        """Records moved out (thread follower)."""
        self._thread_gap = 0.0
        self.error: BaseException | None = None
        """Why the thread ended early (the idle drain goes on without it)."""
        self._quit = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kprobevm-ring-{name}", daemon=True)

    @property
    def max_gap(self) -> float:
        """The longest time between two looks, in seconds (the follower not scheduled,
        or the thread waiting for the interpreter lock): the ring must hold what the guest
        records meanwhile."""
        return self.feed.max_gap if self.feed is not None else self._thread_gap

    def start(self) -> None:
        try:
            feed = ChildFeed(self.recorder, name=self.name)
        except VMError as exc:
            return self._start_thread(str(exc))
        self.recorder.adopt_feed(feed)
        try:
            feed.spawn()
        except VMError as exc:
            self.recorder.end_feed()
            return self._start_thread(str(exc))
        self.feed = feed

    def _start_thread(self, why: str) -> None:
        self.fallback = why
        log.warning("the ring follower runs as a thread of this process (the interpreter "
                    "lock can hold it up past the ring's watched mark, a VM stop): %s",
                    why)  # fmt: skip
        self._thread.start()

    def stop(self, *, touch_guest: bool = True) -> None:
        """End the child or the thread (before the ring goes); ``touch_guest`` False: the
        guest is gone, and the child's records and tail with it."""
        if self.feed is not None:  # (nothing when a drain ended the child already)
            self.recorder.end_feed(touch_guest=touch_guest)
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
                self._thread_gap, last = max(self._thread_gap, now - last), now
                n = recorder.copy_out(running=True)
                if n:
                    self.copies += 1
                    self.copied += n
        except Exception as exc:  # said, and kept: the idle drain still empties the ring
            self.error = exc
            log.warning("the ring follower stopped, the idle drain goes on alone: %s", exc)
