"""Run control of one guest through its gdbstub: who may talk to the stub, and when.

The gdbstub is one socket and QEMU answers nothing but an interrupt while the VM runs,
so exactly one party talks to it at a time. While probes are armed a trap thread owns
it: it waits for stop replies and hands each to the trap handler with the VM stopped.
Any other thread that must touch the guest (register a probe, read memory) calls
:meth:`Target.stopped`: the trap thread stops the VM, lends the client, and continues
the VM when the caller is done. Handlers run on the trap thread, where ``stopped()``
is reentrant. This is the role of the kernel's ``kprobe_mutex`` plus ``stop_machine``.

Lock order, outermost first (a thread takes them in this order only):

1. ``VM._lock``: builds the VM's parts on first use; never held across a wait on the
   guest or on another thread (``close`` lets go of it before restoring the guest).
2. ``KprobeManager._mutex`` (the kernel's ``kprobe_mutex``): the probe table. Its holder
   may wait for the trap thread to hand over the VM, so the trap thread never takes it,
   nor lock 1: handlers must not register or unregister probes (the kernel forbids it
   too), and the trap thread's own table change (a module going) needs the VM stopped,
   which it already is.
3. ``Target._turn``: held by the one thread (never the trap thread) that holds the VM
   stopped, for as long as it does: borrowers take turns, since the trap thread's
   pause serves all that wait for it at once, and they share one client.
4. ``Target._lock``: the conversation with the stub; the trap thread holds it while it
   handles one stop, a borrower while it holds the VM stopped.
5. ``Target._cond``: the hand-over between a borrower and the trap thread.
6. ``Target._loss_lock``: held while a loss is explained (the facade's callback waits
   briefly for QEMU's exit status); takes no other lock.
7. ``Journal._lock``: one record appended at a time.

Every wait on another thread has a deadline (the hand-over, the trap thread's end), and
so does every wait on the guest (a stop reply, a reply).

A VM that goes away (QEMU exits on a guest reboot or panic and says ``W``, or its
gdbstub hangs up) is *lost*: the first party to notice it keeps a :class:`VMLost` in
:attr:`Target.lost`, the trap thread ends with it, and every later ``stopped()`` raises
it at once. Nothing is resumed or written after that; there is nothing left to restore.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterator

from kprobevm.errors import (
    LOST_ERRORS,
    GdbConnectionClosed,
    GdbError,
    GdbErrorReply,
    VMError,
    VMLost,
)
from kprobevm.gdbstub.packet import StopReply, parse_thread_id
from kprobevm.gdbstub.transport import GdbTransport

__all__ = [
    "IDLE_HALT",
    "LossExplainer",
    "StopHandler",
    "Target",
    "cpu_of_thread",
    "halted_in_idle",
    "vcpu_quiescent",
    "vcpu_rips",
]

log = logging.getLogger(__name__)

HANDOVER_DEADLINE = 30.0
"""Seconds a thread waits for the trap thread to hand it the VM (a stop is handled in
milliseconds; only a handler that hangs takes this long)."""

StopHandler = Callable[[StopReply], None]
"""Called on the trap thread, VM stopped, for every stop the trap thread sees."""

LossExplainer = Callable[[str, bool], VMLost]
"""``explain(why, exited)``: the :class:`VMLost` for a lost VM, with the facts its owner
knows (QEMU's exit status, the serial log's tail); ``exited`` when QEMU said it exits."""


@functools.lru_cache(maxsize=256)
def cpu_of_thread(thread: str | None) -> int:
    """vCPU index of a gdbstub thread id (``p01.02`` -> 1)."""
    if not thread:
        return 0
    return max(parse_thread_id(thread)[1] - 1, 0)


IDLE_HALT = b"\xfb\xf4"
"""``sti; hlt``: how the kernel's idle loop halts (``safe_halt``). A 0xf4 alone before RIP
is no proof: it ends many instructions (``mov %r12,%rsi``, a disp8 of -12), and a vCPU
stopped right after one of those was taken for an idle one."""


def vcpu_rips(client: GdbTransport) -> list[int]:
    """Every vCPU's RIP (VM stopped)."""
    return list(client.read_register_each("rip", client.threads()).values())


def halted_in_idle(client: GdbTransport, rip: int) -> bool:
    """The kernel-mode vCPU at ``rip`` sits right after the idle loop's ``sti; hlt``
    (VM stopped). Bytes before RIP that cannot be read (RIP at the start of a page whose
    predecessor is unmapped) mean "not known": False, never an error."""
    try:
        return client.read_memory(rip - len(IDLE_HALT), len(IDLE_HALT)) == IDLE_HALT
    except GdbErrorReply:
        return False


def vcpu_quiescent(client: GdbTransport, thread: str, ours: Callable[[int], bool]) -> bool:
    """The vCPU ``thread`` holds no kernel context now (VM stopped): it runs user code,
    or sits halted in the idle loop outside our code (:func:`halted_in_idle`)."""
    regs = client.read_registers(thread=thread, wide=False)
    rip = regs["rip"]
    if regs["cs"] & 3:
        return True
    if ours(rip):
        return False
    return halted_in_idle(client, rip)


class Target:
    """Serialises access to a gdbstub client and runs the trap thread."""

    def __init__(
        self, client: GdbTransport, *, name: str = "vm", explain_loss: LossExplainer | None = None
    ) -> None:
        """``explain_loss`` makes the error for a lost VM (default: the reason alone)."""
        self.client = client
        self.name = name
        self._explain_loss = explain_loss or self._plain_loss
        self.lost: VMLost | None = None
        """Why the VM is gone, once it is (the first reason noticed)."""
        self._loss_lock = threading.Lock()
        self._closed = False
        self._start_when_released = False
        self.before_resume: list[bytes] = []
        """Packets (register writes) to send with the next resume, in the same write."""
        self._writes_before_resume: list[tuple[int, bytes]] = []
        self.write_backs = 0
        """How many times queued writes went out: a write queued when it was N has
        reached the guest once it is past N."""
        self.on_stop: StopHandler | None = None
        self.on_idle: Callable[[], None] | None = None
        """Called on the trap thread every ``idle_interval`` s: when the guest is quiet, in
        a stop of its own, or with the VM running when ``idle_needs_stop`` is false; else
        in the next hit's stop (a guest that stops all the time must still have its
        recorded hits drained)."""
        self.idle_interval = 1.0
        self.idle_needs_stop = True
        self._last_idle = 0.0
        self.stops = 0
        """Times the VM stopped: a trap reported, or an interrupt of ours."""
        self._idle_running: int | None = None  # the trap thread, in a running idle call
        self.stop_timeout = 10.0
        """Seconds an interrupt waits for the VM's stop reply."""
        self._turn = threading.Lock()  # held by the thread that holds the VM stopped
        self._lock = threading.RLock()  # held by whoever talks to the stub
        self._owner: int | None = None  # thread ident that holds the VM stopped
        self._depth = 0
        self._thread: threading.Thread | None = None
        self._quit = False
        self._wake_r, self._wake_w = os.pipe()
        self._pause_requests = 0
        self._cond = threading.Condition()
        self._paused = False
        self.error: BaseException | None = None

    # -- stopping the VM for a caller --------------------------------------------------

    @contextlib.contextmanager
    def stopped(self) -> Iterator[GdbTransport]:
        """The VM is stopped for the body, which may use the yielded client."""
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            try:
                yield self.client
            finally:
                self._depth -= 1
            return
        self._raise_if_lost()
        if self._idle_running == me:
            # the trap thread's idle call, VM running: a handler in it wants a stop (it
            # takes no turn: a thread with the turn may be waiting for this one)
            with self._lost_on_hang_up(), self._stopped_by_trap_thread():
                yield self.client
            return
        if not self._turn.acquire(timeout=HANDOVER_DEADLINE):
            raise VMError(f"{self.name}: another thread held the VM stopped for"
                          f" {HANDOVER_DEADLINE:g} s")
        try:
            self._raise_if_lost()  # it may have gone while we waited our turn
            with self._lost_on_hang_up():
                if self._thread is not None and self._thread.is_alive():
                    with self._borrow_from_trap_thread():
                        yield self.client
                    return
                with self._lock:
                    was_running = self.running
                    if was_running:
                        self._stop_vm()
                    self._owner = me
                    try:
                        yield self.client
                    finally:
                        self._owner = None
                        start, self._start_when_released = self._start_when_released, False
                        if was_running and self._reachable:
                            self._resume_vm()
                if start:
                    self.start()
        finally:
            self._turn.release()

    @property
    def holds_here(self) -> bool:
        """This thread holds the VM stopped, or is the trap thread: it cannot let the
        guest run and wait for it."""
        me = threading.get_ident()
        thread = self._thread
        return self._owner == me or (thread is not None and thread.ident == me)

    # -- a lost VM ---------------------------------------------------------------------

    @property
    def _reachable(self) -> bool:
        """Neither lost nor hung up: the stub can still be spoken to."""
        return self.lost is None and not self.client.closed

    def _plain_loss(self, why: str, exited: bool) -> VMLost:
        return VMLost(f"{self.name}: {why}", qemu_exited=exited)

    def _lose(self, why: str, *, exited: bool = False,
              cause: BaseException | None = None) -> VMLost:
        """Note that the VM is gone (the first reason noticed is kept) and return the
        error to raise for it."""
        with self._loss_lock:
            if self.lost is None:
                lost = self._explain_loss(why, exited)
                lost.__cause__ = cause
                self.lost = lost
                log.warning("%s", lost.reason)
            return self.lost.again()

    def _raise_if_lost(self) -> None:
        if self.lost is not None:
            raise self.lost.again()

    @contextlib.contextmanager
    def _lost_on_hang_up(self) -> Iterator[None]:
        """A connection the stub closed (not we) means the VM is lost: QEMU is exiting,
        or its gdbstub went away."""
        try:
            yield
        except GdbConnectionClosed as exc:
            if self._closed:
                raise
            raise self._lose("the gdbstub closed the connection", cause=exc) from exc

    @property
    def running(self) -> bool:
        return self.client.running

    def _stop_vm(self) -> None:
        """Interrupt the running VM; a trap that raced the interrupt is handled first."""
        self.stops += 1
        stop = self.client.interrupt(timeout=self.stop_timeout)
        if stop is not None:
            self._dispatch(stop)
            # the caller may switch threads before we resume: write back now
            before = self._take_before_resume()
            for payload, reply in zip(before, self.client.pipeline(before), strict=True):
                if reply != b"OK":
                    raise GdbError("register write failed", sent=payload, received=reply)

    def queue_write(self, address: int, data: bytes) -> None:
        """Write guest virtual memory with the next resume (trap thread, VM stopped)."""
        self._writes_before_resume.append((address, data))

    def _take_before_resume(self) -> list[bytes]:
        """The queued writes as packets; the memory mode is settled now, at sending time
        (a physical write in between must not turn them physical)."""
        packets: list[bytes] = []
        self.write_backs += 1
        if self._writes_before_resume:
            packets += self.client.mode_packets(False)
            for address, data in self._writes_before_resume:
                packets += self.client.memory_write_packets(address, data)
            self._writes_before_resume = []
        packets += self.before_resume
        self.before_resume = []
        return packets

    def _resume_vm(self) -> None:
        self.client.cont(before=self._take_before_resume(), defer=True)

    def _dispatch(self, stop: StopReply) -> None:
        if stop.exited:
            # QEMU says so as it exits (a guest reboot or panic under -no-reboot)
            code = stop.exit_status if stop.kind == "W" else stop.signal
            raise self._lose(
                f"the guest exited ({stop.raw.decode(errors='replace')},"
                f" {'status' if stop.kind == 'W' else 'signal'} {code})", exited=True,
            )  # fmt: skip
        handler = self.on_stop
        if handler is None:
            return
        owner, self._owner = self._owner, threading.get_ident()
        try:
            handler(stop)
        finally:
            self._owner = owner

    def resume(self) -> None:
        """Let a stopped VM run (when nobody holds it stopped)."""
        self._raise_if_lost()
        with self._lock, self._lost_on_hang_up():
            if not self.running:
                self._resume_vm()

    # -- the trap thread ---------------------------------------------------------------

    def start(self) -> None:
        """Start the trap thread; the VM runs from now on.

        Called by a thread that holds the VM stopped (a batch registration), it starts
        when that hold ends: resuming now would pull the VM from under the holder.
        """
        if self._thread is not None and self._thread.is_alive():
            return
        if self._owner == threading.get_ident():
            self._start_when_released = True
            return
        self._raise_if_lost()
        self._quit = False
        self.error = None
        self._thread = threading.Thread(
            target=self._loop, name=f"kprobevm-trap-{self.name}", daemon=True
        )
        with self._lock, self._lost_on_hang_up():
            if not self.running:
                self._resume_vm()
        self._thread.start()

    def stop(self) -> None:
        """End the trap thread, leaving the VM running under nobody's watch."""
        thread = self._thread
        if thread is None:
            return
        self._quit = True
        os.write(self._wake_w, b"q")
        thread.join(timeout=HANDOVER_DEADLINE)
        if thread.is_alive():
            raise VMError(f"{self.name}: the trap thread did not end within"
                          f" {HANDOVER_DEADLINE:g} s (a handler still running?)")
        self._thread = None
        # The thread does not resume once told to quit: it may have stopped the VM (a
        # trap, or a pause just served) right before. Resume, with any register writes
        # (a lost VM has nothing to resume).
        with self._lock, self._lost_on_hang_up():
            if self._owner is None and not self.running and self._reachable:
                self._resume_vm()

    @contextlib.contextmanager
    def _borrow_from_trap_thread(self) -> Iterator[None]:
        deadline = time.monotonic() + HANDOVER_DEADLINE
        with self._cond:
            self._pause_requests += 1
            os.write(self._wake_w, b"p")
            while not self._paused:
                thread = self._thread
                if self.error is not None or thread is None or not thread.is_alive():
                    self._pause_requests -= 1
                    self._raise_if_lost()
                    raise VMLost(f"{self.name}: trap thread died") from self.error
                if time.monotonic() > deadline:
                    self._pause_requests -= 1
                    raise VMError(f"{self.name}: the trap thread did not hand the VM over"
                                  f" within {HANDOVER_DEADLINE:g} s (a handler still running?)")
                self._cond.wait(timeout=0.1)
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            with self._cond:
                self._pause_requests -= 1
                self._cond.notify_all()

    def _loop(self) -> None:
        sock = self.client.fileno()
        try:
            while not self._quit:
                if self.client.closed:
                    # hung up under another thread's request (a borrower's): its socket
                    # is closed, and select() on it would fail, or watch a reused fd
                    raise GdbConnectionClosed("the stub closed the connection")
                # A stop reply can come in the same read as the replies to the register
                # writes sent with the last resume (GdbClient.cont reads those after the
                # "c"): it then waits in the client's buffer and the socket stays quiet.
                buffered = self.client.running and self.client.stop_buffered
                idle = self.on_idle
                wait = 1.0
                if idle is not None:
                    wait = max(0.0, self._last_idle + self.idle_interval - time.monotonic())
                readable, _, _ = select.select(
                    [sock, self._wake_r], [], [], 0.0 if buffered else wait,
                )  # fmt: skip
                if not readable and not buffered and idle is not None:
                    self._serve_idle(idle)
                    continue
                if self._wake_r in readable:
                    os.read(self._wake_r, 64)
                if sock in readable or buffered:
                    with self._lock:
                        stop = self.client.poll_stop()
                        if stop is not None:
                            self.stops += 1
                            self._dispatch(stop)
                            idle = self.on_idle  # due while hits keep the VM stopping?
                            if idle is not None and not self._quit and (
                                    time.monotonic() - self._last_idle >= self.idle_interval):
                                self._run_idle(idle)
                            if not self._quit and not self._pause_requests:
                                self._resume_vm()
                if self._pause_requests:
                    self._serve_pause()
        except (GdbError, VMLost, OSError) as exc:
            if isinstance(exc, GdbConnectionClosed) and not self._closed:
                self._lose("the gdbstub closed the connection", cause=exc)
            if self.lost is not None and isinstance(exc, LOST_ERRORS):
                self.error = self.lost  # said once, by _lose
            else:
                log.error("%s: trap thread stopped: %s", self.name, exc)
                self.error = exc
            with self._cond:
                self._cond.notify_all()
        except Exception as exc:  # a handler's own bug: still say why the thread is gone
            log.exception("%s: trap thread stopped", self.name)
            self.error = exc
            with self._cond:
                self._cond.notify_all()

    @contextlib.contextmanager
    def _stopped_by_trap_thread(self) -> Iterator[None]:
        self._stop_vm()
        self._owner = threading.get_ident()
        try:
            yield
        finally:
            self._owner = None
            if not self._quit and self._reachable:
                self._resume_vm()

    def _serve_idle(self, idle: Callable[[], None]) -> None:
        """The idle callback (a drain of recorded hits), with the VM stopped for it unless
        it can do without (shared guest RAM)."""
        with self._lock:
            if self._quit or self._pause_requests or not self.running:
                self._last_idle = time.monotonic()  # not due again at once: no busy loop
                return
            if not self.idle_needs_stop:
                self._idle_running = threading.get_ident()
                try:
                    idle()
                finally:
                    self._idle_running = None
                    self._last_idle = time.monotonic()
                return
            self._stop_vm()
            self._run_idle(idle)
            if not self._quit and not self._pause_requests and self._reachable:
                self._resume_vm()

    def _run_idle(self, idle: Callable[[], None]) -> None:
        """The idle callback, on the trap thread with the VM stopped."""
        owner, self._owner = self._owner, threading.get_ident()
        try:
            idle()
        finally:
            self._owner = owner
            self._last_idle = time.monotonic()

    def _serve_pause(self) -> None:
        with self._lock:
            if self.running:
                self._stop_vm()
            with self._cond:
                self._paused = True
                self._cond.notify_all()
                while self._pause_requests:
                    self._cond.wait()
                self._paused = False
            if not self._quit and self._reachable:
                self._resume_vm()

    def close(self) -> None:
        """End the trap thread; from now on a closed connection is ours, not a loss."""
        try:
            self.stop()
        finally:
            self._closed = True
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
