"""The ring follower's child process: it copies records out of the guest's ring with
the VM running and owns the tail while it lives; a child that is gone hands the tail
back with every record it copied, said on stderr, and no hit is lost or counted twice.
The child's copy rules run first over a ring laid out in a plain file."""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import subprocess
import sys
import tempfile
import time

import pytest

from kprobevm.guest.vm import VM
from kprobevm.kprobes import ringchild
from kprobevm.kprobes.core import Kprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.kprobes.ringfollow import RingFollower
from kprobevm.x86.record import PAD_BIT

_LOOP = "i=0; while [ $i -lt {n} ]; do read x </etc/passwd; i=$((i+1)); done"
PAGE = 4096
RING = 2 * PAGE  # two pages, laid out in reverse order in the store
HEAD, TAIL = 0, 8  # the control words, in the store's first page
PAGES = [3 * PAGE, 2 * PAGE]


def _record(pos: int, size: int, probe_id: int, fill: int) -> bytes:
    return struct.pack("<QIH", pos + 1, size, probe_id) + bytes([fill]) * (size - 14)


def _store_put(store: int, pos: int, data: bytes) -> None:
    for i in range(len(data)):  # byte by byte: the ring's pages are not in order
        at = (pos + i) % RING
        os.pwrite(store, data[i : i + 1], PAGES[at // PAGE] + at % PAGE)


def test_the_child_copies_whole_records_skips_padding_and_ends_with_its_parent() -> None:
    """Records before an incomplete one are copied (the padding at the wrap left out),
    the tail moves past them in the store and in the header, and the child ends when the
    wake pipe's writer goes (as when its parent dies)."""
    with tempfile.TemporaryFile() as f:
        store = f.fileno()
        os.ftruncate(store, 4 * PAGE)
        start = RING - 300  # the first record fits, the second wraps after padding
        first = _record(start, 200, 7, 0xAA)
        second = _record(RING, 120, 9, 0xBB)
        unfinished = struct.pack("<QIH", 0, 100, 5)  # its stamp not written yet
        _store_put(store, start, first)
        _store_put(store, start + 200, struct.pack("<Q", (start + 200 + 1) | PAD_BIT))
        _store_put(store, RING, second)
        _store_put(store, RING + 120, unfinished)
        os.pwrite(store, struct.pack("<Q", RING + 220), HEAD)
        cap = 1 << 16
        buffer_fd = os.memfd_create("test-ring")
        os.ftruncate(buffer_fd, ringchild.HEADER + cap)
        buffer = mmap.mmap(buffer_fd, ringchild.HEADER + cap)
        hdr = ringchild.header(buffer)
        hdr[ringchild.index("tail")] = start
        wake_r, wake_w = os.pipe()
        config = {"store_fd": store, "pages": PAGES, "head": HEAD, "tail": TAIL,
                  "ring_size": RING, "pad_bit": PAD_BIT, "cap": cap, "interval": 0.002,
                  "parent": os.getpid(), "buffer_fd": buffer_fd, "wake_fd": wake_r}  # fmt: skip
        child = subprocess.Popen([sys.executable, ringchild.__file__, json.dumps(config)],
                                 pass_fds=(store, buffer_fd, wake_r))  # fmt: skip
        os.close(wake_r)
        try:
            deadline = time.monotonic() + 10
            while hdr[ringchild.index("tail")] != RING + 120 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert hdr[ringchild.index("tail")] == RING + 120
            assert hdr[ringchild.index("wr")] == 320
            # it asked for a real-time priority before its first look, got or refused
            assert hdr[ringchild.index("sched")] in (ringchild.SCHED_FIFO, ringchild.SCHED_NORMAL)
            base = ringchild.HEADER
            assert buffer[base : base + 320] == first + second
            assert struct.unpack("<Q", os.pread(store, 8, TAIL))[0] == RING + 120
            # the unfinished record holds the tail: the child's looks time the wait
            while not hdr[ringchild.index("max_stall_ns")] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert hdr[ringchild.index("max_stall_ns")] > 0
            assert child.poll() is None
            os.close(wake_w)  # the parent "dies"
            assert child.wait(timeout=5) == 0
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            del hdr
            buffer.close()
            os.close(buffer_fd)


def test_the_child_follows_and_a_dead_child_hands_the_tail_back(
    vm: VM, caplog: pytest.LogCaptureFixture
) -> None:
    """A recorded probe's hits come out through the child with no VM stop of their own;
    then the child is killed mid-run: the next drain with the VM stopped finds it gone,
    says so, takes the tail back and copies the ring itself. Every hit is counted once."""
    seen: list[int] = []
    kp = Kprobe(symbol_name="vfs_read", pre_handler=lambda kp, regs: seen.append(1),
                record=RecordSpec())  # fmt: skip
    vm.register_kprobe(kp)
    channel = vm.kprobes.channel
    follower: RingFollower = channel.follower  # type: ignore[attr-defined]
    recorder = channel.recorder  # type: ignore[attr-defined]
    try:
        assert follower.fallback is None and follower.feed is not None
        assert follower.feed.alive() and recorder.feed is follower.feed
        vm.run(_LOOP.format(n=2000), check=True, timeout=120)
        vm.flush_records()
        assert follower.feed.looks > 0 and len(seen) == kp.nhit >= 2000
        assert follower.max_gap > 0
        assert follower.feed.scheduling != "unknown"
        process = follower.feed.process
        assert process is not None
        process.kill()
        process.wait(timeout=5)
        with caplog.at_level(logging.WARNING, logger="kprobevm.kprobes.recorder"):
            vm.run(_LOOP.format(n=1000), check=True, timeout=120)
            vm.flush_records()
        assert "did not answer" in caplog.text
        assert recorder.feed is None
        assert len(seen) == kp.nhit >= 3000
    finally:
        vm.unregister_kprobe(kp)
        vm.settle_records()
        # the session's guest gets a follower child again for the tests after this one
        follower.stop()
        channel.follower = RingFollower(recorder, name="session")  # type: ignore[attr-defined]
        channel.follower.start()  # type: ignore[attr-defined]
    assert kp.nhit + kp.nmissed == kp.guest_hits
    assert recorder.late == 0
