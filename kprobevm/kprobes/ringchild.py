"""The ring follower's child process: it copies complete records out of the guest's
ring into a host-side buffer and moves the ring's tail, outside the host's interpreter.

Run as a script (``python ringchild.py CONFIG``; standard library only, so it starts
without the package). The parent, :mod:`kprobevm.kprobes.ringfollow`, hands it the
guest RAM store (the shared RAM file, or ``/proc/PID/mem`` of an attached QEMU), the
store offsets of the ring's pages and of its head and tail words, a memfd for the
buffer and a pipe's read end. While it runs it is the one owner of the ring's tail.

The buffer's first page is a header of u64 words (:data:`WORDS`); records follow in a
byte ring of ``cap`` bytes, in the guest ring's order, without its padding. The child
writes a record's bytes, then ``wr``, then ``tail``, then the guest's tail: whatever it
has told the parent is in the buffer, and the guest's tail never passes ``tail``.
It ends when ``quit`` is set, when the pipe's write end closes (the parent is gone), or
when its parent changes.

The child asks for ``SCHED_FIFO`` at the lowest real-time priority: under the host's
ordinary scheduling a loaded host left it unscheduled for 15-58 ms, time in which a
``dd bs=1`` loop fills the ring to its mark and the guest stops for a drain. A look takes
about a millisecond every 2 ms, so the priority takes little from anyone. Where the
host refuses it (no ``CAP_SYS_NICE``, no ``RLIMIT_RTPRIO``) the child says so on stderr
and runs on at normal priority (the ``sched`` word says which).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import select
import signal
import struct
import sys
import time

WORDS = (
    "wr", "tail", "sync_done", "max_gap_ns", "looks", "max_fill", "max_stall_ns", "sched",
    "sched_errno", "rd", "sync_req", "quit",
)  # fmt: skip
"""The header's words: the first nine the child writes, the last three the parent
(``max_fill``: the most bytes a look found between the tail and the head;
``max_stall_ns``: the longest the tail waited at a record not stamped yet, as two looks
saw it: a vCPU inside the record program that the host did not run, with every record
after it held back too; ``sched``:
:data:`SCHED_FIFO` or :data:`SCHED_NORMAL` once the child has asked, with the refusal's
errno in ``sched_errno``)."""
SCHED_FIFO = 1
SCHED_NORMAL = 2
HEADER = 4096
_U64 = struct.Struct("<Q")
_SIZE_ID = struct.Struct("<IH")
PAGE = 4096


def header(buffer: mmap.mmap) -> ctypes.Array[ctypes.c_uint64]:
    """The header words over ``buffer``: each an aligned 8-byte store and load, so no
    side sees a word half written."""
    return (ctypes.c_uint64 * len(WORDS)).from_buffer(buffer)


def index(word: str) -> int:
    return WORDS.index(word)


class _Follower:
    """One child's state: the store, the buffer, and the positions it owns."""

    def __init__(self, cfg: dict[str, object]) -> None:
        self.store = int(cfg["store_fd"])  # type: ignore[call-overload]
        self.pages = [int(p) for p in cfg["pages"]]  # type: ignore[attr-defined]
        self.head_at, self.tail_at = int(cfg["head"]), int(cfg["tail"])  # type: ignore[call-overload]
        self.ring_size, self.pad = int(cfg["ring_size"]), int(cfg["pad_bit"])  # type: ignore[call-overload]
        self.cap = int(cfg["cap"])  # type: ignore[call-overload]
        self.buffer = mmap.mmap(int(cfg["buffer_fd"]), HEADER + self.cap)  # type: ignore[call-overload]
        self.hdr = header(self.buffer)
        self.tail = int(self.hdr[index("tail")])
        self.wr = int(self.hdr[index("wr")])
        self.stalled: tuple[int, int] | None = None  # (position, since) of an unstamped record

    def u64(self, at: int) -> int:
        return int(_U64.unpack(os.pread(self.store, 8, at))[0])

    def ring_copy(self, tail: int, head: int) -> bytes:
        """The ring's bytes from ``tail`` to ``head``, one read per run of pages that lie
        one after the other in the store."""
        mask, pages, parts = self.ring_size - 1, self.pages, []
        at, n = tail & mask, head - tail
        while n:
            start = pages[at >> 12] + (at & (PAGE - 1))
            chunk = min(n, PAGE - (at & (PAGE - 1)))
            while (
                chunk < n
                and (at + chunk) & mask
                and (pages[((at + chunk) & mask) >> 12] == start + chunk)
            ):
                chunk = min(n, chunk + PAGE)
            parts.append(os.pread(self.store, chunk, start))
            at, n = (at + chunk) & mask, n - chunk
        return b"".join(parts)

    def look(self) -> None:
        """Copy the complete records after the tail (as room in the buffer allows)."""
        tail = self.tail
        head = self.u64(self.head_at)
        if head == tail:
            return
        if head - tail > self.hdr[index("max_fill")]:
            self.hdr[index("max_fill")] = head - tail
        # a record whose stamp (the guest's last store) is complete in the first copy
        # was complete before the second began: its bytes come from the second
        stamps = self.ring_copy(tail, head)
        data = self.ring_copy(tail, head)
        mask, pos, wr = self.ring_size - 1, tail, self.wr
        room = self.cap - (wr - int(self.hdr[index("rd")]))
        spans: list[list[int]] = []  # runs of whole records in ``data``, the padding left out
        unstamped = False
        while pos < head:
            at = pos - tail
            stamp = _U64.unpack_from(stamps, at)[0]
            if stamp == pos + 1:
                size = _SIZE_ID.unpack_from(data, at + 8)[0]
                if size > room:
                    break
                if spans and spans[-1][1] == at:
                    spans[-1][1] = at + size
                else:
                    spans.append([at, at + size])
                room, pos = room - size, pos + size
            elif stamp == (pos + 1) | self.pad:
                pos = (pos | mask) + 1
            else:
                unstamped = True
                break
        self._note_stall(pos if unstamped else None)
        view = memoryview(data)
        for start, end in spans:
            self._put(wr, view[start:end])
            wr += end - start
        if pos == tail:
            return
        self.hdr[index("wr")] = self.wr = wr
        self.hdr[index("tail")] = self.tail = pos
        os.pwrite(self.store, _U64.pack(pos), self.tail_at)

    def _note_stall(self, pos: int | None) -> None:
        """The tail waits at ``pos``, a record not stamped yet (None: it waits at none)."""
        if pos is None:
            self.stalled = None
            return
        now = time.monotonic_ns()
        if self.stalled is None or self.stalled[0] != pos:
            self.stalled = (pos, now)
            return
        stall = now - self.stalled[1]
        if stall > self.hdr[index("max_stall_ns")]:
            self.hdr[index("max_stall_ns")] = stall

    def _put(self, wr: int, data: memoryview) -> None:
        at = HEADER + wr % self.cap
        first = min(len(data), HEADER + self.cap - at)
        self.buffer[at : at + first] = data[:first]
        if first < len(data):
            self.buffer[HEADER : HEADER + len(data) - first] = data[first:]


def _realtime(hdr: ctypes.Array[ctypes.c_uint64]) -> None:
    """Ask for the lowest real-time priority; say on stderr when refused."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError as exc:
        hdr[index("sched_errno")] = exc.errno or 0
        hdr[index("sched")] = SCHED_NORMAL
        print(f"kprobevm: the ring follower's child runs at normal priority ({exc.strerror}"
              " for SCHED_FIFO): a loaded host can hold it up until the ring fills to its"
              " mark, a VM stop", file=sys.stderr, flush=True)  # fmt: skip
        return
    hdr[index("sched")] = SCHED_FIFO


def main() -> int:
    cfg = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we end
    follower = _Follower(cfg)
    _realtime(follower.hdr)
    wake, parent, interval = int(cfg["wake_fd"]), int(cfg["parent"]), float(cfg["interval"])
    hdr, last = follower.hdr, time.monotonic()
    while not hdr[index("quit")]:
        readable, _, _ = select.select([wake], [], [], interval)
        if readable and not os.read(wake, 4096):
            break  # the parent is gone
        if os.getppid() != parent:
            break
        asked = int(hdr[index("sync_req")])
        now = time.monotonic()
        hdr[index("max_gap_ns")] = max(int(hdr[index("max_gap_ns")]), int((now - last) * 1e9))
        last = now
        follower.look()
        hdr[index("looks")] += 1
        hdr[index("sync_done")] = asked
    del hdr
    follower.hdr = None  # type: ignore[assignment]
    return 0


if __name__ == "__main__":
    sys.exit(main())
