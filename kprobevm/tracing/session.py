"""A tracing session: kprobe_events definitions placed in a guest, one hit per line.

What ``kprobevm trace`` and ``kprobevm count`` (and the pytest plugin's ``events``) run:
:func:`plan_events` resolves parsed definitions against the guest's symbols and
instruction boundaries with the kernel's registration checks, touching nothing
(:mod:`kprobevm.tracing.plan`); :class:`TraceSession` places them (kprobes for ``p``,
kretprobes for ``r``), records each hit as an :class:`~kprobevm.tracing.EventHit` on the
engine's trap thread (:mod:`kprobevm.tracing.hits`) and hands it over through a queue,
so printing never holds the guest stopped.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Self

from kprobevm.closing import Closing
from kprobevm.errors import KprobeError
from kprobevm.kernel.stacktrace import DEFAULT_STACK_SIZE
from kprobevm.kprobes.kretprobes import Kretprobe
from kprobevm.kprobes.recorder import RecordSpec
from kprobevm.tracing.capture import DEFAULT_STRING_SIZE, MODES
from kprobevm.tracing.fetch import ArgValue
from kprobevm.tracing.format import EventHit
from kprobevm.tracing.hits import HitBuilder, HitContext, PlacedEvent
from kprobevm.tracing.kernel_rules import kernel_rules
from kprobevm.tracing.plan import (
    PlannedProbe,
    check_definitions,
    fetch_plan,
    guest_event_names,
    plan_events,
    record_specs,
)
from kprobevm.tracing.resolve import lookup_symbol

if TYPE_CHECKING:
    from kprobevm.guest.vm import VM

# Planning and hit building live in their own modules; their names stay importable here.
__all__ = [
    "TIMESTAMP_NOTE",
    "HitContext",
    "PlannedProbe",
    "TraceSession",
    "args_of",
    "check_definitions",
    "fetch_plan",
    "guest_event_names",
    "plan_events",
    "record_specs",
]

log = logging.getLogger(__name__)

TIMESTAMP_NOTE = (
    "timestamps are host monotonic time since the probes were placed: the guest's trace "
    "clock (local_clock) cannot be read from the host"
)


def args_of(hit: EventHit) -> dict[str, ArgValue]:
    """A hit's argument values by name (``bytes`` for strings, ``None`` for a fault)."""
    return {arg.name: value for arg, value in hit.args}


@dataclass(eq=False)
class TraceSession(Closing):
    """Planned events placed in ``vm``; hits are queued as :class:`EventHit` values.

    ``plan`` comes from :func:`plan_events` for the same ``vm``. ``count_only`` records
    nothing but the counts (no fetch, the cheapest handler). ``on_hit``, when given,
    receives each hit on the trap thread (keep it short) instead of the queue; what it
    raises is kept as a handler error. ``clock`` stamps the hits that stop the guest
    (nanoseconds). ``mode`` is one of :data:`~kprobevm.tracing.capture.MODES`. Use as a
    context manager: entering starts the session, leaving stops it.
    """

    vm: VM
    plan: Sequence[PlannedProbe]
    count_only: bool = False
    on_hit: Callable[[EventHit], None] | None = None
    clock: Callable[[], int] = time.monotonic_ns
    mode: str = "auto"
    string_size: int = DEFAULT_STRING_SIZE
    """Bytes a recorded string keeps (its NUL included)."""
    stacktrace: bool = False
    """Each hit carries the kernel stack (``EventHit.stack``), as tracefs prints it with
    ``options/stacktrace``; entry probes only."""
    stack_size: int = DEFAULT_STACK_SIZE
    """With ``stacktrace``, bytes of stack a recorded hit copies (from ``sp`` up)."""
    recorded: bool = field(default=False, init=False)
    """Whether the events are recorded by the guest (decided in :meth:`start`)."""
    record_refused: str | None = field(default=None, init=False)
    """In ``auto`` mode, why the events stop the guest at each hit instead of being
    recorded (a return probe, an argument the guest cannot read ahead, a record program
    too large for its cell, ...); None when they are recorded or ``stop`` was asked for."""
    _specs: list[RecordSpec | None] = field(default_factory=list, init=False, repr=False)
    _tsc_khz: int = field(default=0, init=False, repr=False)
    hits: queue.SimpleQueue[EventHit] = field(default_factory=queue.SimpleQueue, init=False)
    placed: list[PlacedEvent] = field(default_factory=list, init=False)
    finished: list[PlacedEvent] = field(default_factory=list, init=False)
    started_ns: int = field(default=0, init=False)
    _comms: dict[int, str] = field(default_factory=dict, init=False, repr=False)
    """Each pid's comm at its latest hit drained (what the trace file prints for it)."""

    def start(self) -> None:
        """Place every probe, recorded or stopping as ``mode`` decides.

        Raises :class:`~kprobevm.errors.KprobeError` for an unknown ``mode``, for
        ``mode="record"`` when an event cannot be recorded, or as the engine refuses a
        probe; on any failure the probes already placed are removed first.
        """
        vm = self.vm
        stacktrace = self.stacktrace and not self.count_only
        if stacktrace:
            returns = [f"{p.event.group}/{p.event.event}" for p in self.plan if p.event.is_return]
            if returns:
                raise KprobeError(
                    f"stack traces are for entry probes; {', '.join(returns)} is a return probe"
                )
            vm.stack_tracer  # noqa: B018 (read now, on this thread: it reads the guest)
        # Filled now, on this thread: the handlers must never reach for SSH.
        symbols, layout = vm.symbols, vm.task_layout
        if layout is None:
            log.warning("no kernel BTF (vmlinux): comm and pid of hits are unknown")
        self._choose_mode(layout is not None)
        self.started_ns = self.clock()
        rules = kernel_rules(vm)
        trampoline = lookup_symbol(symbols, rules.rethook_trampoline or "")
        builder = HitBuilder(
            symbols=symbols, layout=layout, sink=self.on_hit or self.hits.put,
            clock=self.clock, started_ns=self.started_ns, count_only=self.count_only,
            tsc_khz=self._tsc_khz,
            kernel_trampoline=trampoline or 0, kretprobed=rules.kretprobed,
            stacktrace=stacktrace,
        )  # fmt: skip
        placed = [
            builder.place(p, spec, hijacked=self._hijacked(i, rules.newest_first))
            for i, (p, spec) in enumerate(zip(self.plan, self._specs, strict=True))
        ]
        # The engine runs the probes of one address in the order they were registered;
        # the kernel runs the newest definition first (the newest_first rule), so the
        # probes go in last definition first.
        order = list(reversed(placed)) if rules.newest_first else placed
        # One registration per probe: vm.register_kprobes() (one stop for the batch)
        # fails on the 6.1 engine when the first probe installs the trap channel.
        try:
            for p in order:
                if isinstance(p.probe, Kretprobe):
                    vm.register_kretprobe(p.probe)
                    p.entry = p.probe.kp
                else:
                    vm.register_kprobe(p.probe)
                self.placed.append(p)
        except BaseException:
            self.stop()
            raise
        self.placed.sort(key=placed.index)
        self._alias_trampoline(builder)

    def _hijacked(self, index: int, newest_first: bool) -> bool:
        """Whether a return probe on the same function runs before entry event ``index``
        in the kernel (defined after it when the newest runs first), having replaced the
        return address by the time this event reads it."""
        p = self.plan[index]
        if p.event.is_return:
            return False
        others = self.plan[index + 1 :] if newest_first else self.plan[:index]
        return any(q.event.is_return and q.resolved.address == p.resolved.address
                   for q in others)  # fmt: skip

    def _alias_trampoline(self, builder: HitBuilder) -> None:
        """A stack word holding our return trampoline reads as the kernel's own."""
        if not any(p.event.is_return for p in self.plan):
            return
        name = kernel_rules(self.vm).rethook_trampoline
        ours = self.vm.kretprobes.trampoline
        if name is not None and ours:
            builder.stack_aliases[ours] = self.vm.symbols[name]

    def _choose_mode(self, have_btf: bool) -> None:
        """Record every event when ``mode`` allows and each can be; else stop at each hit."""
        if self.mode not in MODES:
            raise KprobeError(f"trace mode {self.mode!r} is not one of {', '.join(MODES)}")
        specs, why = record_specs(
            self.vm, self.plan, count_only=self.count_only, string_size=self.string_size,
            have_btf=have_btf, stack_size=self.stack_size if self.stacktrace else 0,
        )  # fmt: skip
        if self.mode == "record" and why:
            raise KprobeError(f"cannot record these events: {why}")
        self.recorded = self.mode != "stop" and not why
        if self.mode == "auto" and why:
            self.record_refused = why
            log.info("the events stop the guest at each hit: %s", why)
        self._specs = [*specs] if self.recorded else [None] * len(self.plan)
        if self.recorded and not self.count_only:
            raw = self.vm.read(self.vm.symbols["tsc_khz"], 4)
            self._tsc_khz = int.from_bytes(raw, "little")

    def flush(self) -> None:
        """Bring every hit the guest has recorded so far into the queue (or ``on_hit``)."""
        if self.recorded and self.placed:
            self.vm.flush_records()

    def stop(self) -> None:
        """Unregister everything placed; idempotent, and calls in flight still return safely.

        Every probe is tried; the first exception the engine raised is then re-raised.
        Counts, misses and handler errors stay readable after.
        """
        placed, self.placed = self.placed, []
        self.finished = placed
        errors: list[BaseException] = []
        for p in reversed(placed):
            try:
                if isinstance(p.probe, Kretprobe):
                    if p.probe.registered:
                        self.vm.unregister_kretprobe(p.probe)
                elif p.probe.registered:
                    self.vm.unregister_kprobe(p.probe)
            except BaseException as exc:  # try the others, then report the first
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """:meth:`stop`: what leaving the ``with`` block does."""
        self.stop()

    def counts(self) -> list[tuple[PlannedProbe, int]]:
        """Each planned event with its hits so far (or in the end, once stopped), in plan
        order; empty before :meth:`start`."""
        placed = self.placed or self.finished
        if self.recorded and self.count_only:  # counted by the guest
            return [(p.plan, p.probe.nhit) for p in placed]
        return [(p.plan, p.hits) for p in placed]

    def missed(self) -> int:
        """Hits the engine could not record (kretprobe maxactive reached, the record ring
        full, or a recorded probe hit inside another record on the same CPU)."""
        placed = self.placed or self.finished
        return sum(p.probe.nmissed for p in placed)

    def handler_errors(self) -> list[str]:
        """The exceptions the handlers raised, formatted, entry and return probes alike.

        The engine catches them and goes on, keeping the last few of each probe; an empty
        list means no handler raised. Still readable after :meth:`stop`.
        """
        placed = self.placed or self.finished
        return [error for p in placed for error in p.handler_errors()]

    def drain(self) -> Iterator[EventHit]:
        """Yield the hits queued so far, without waiting for more (none with ``on_hit``);
        then, while probes are placed in a guest that is gone (rebooted, panicked), raise
        :class:`~kprobevm.errors.VMLost`: a tracer waiting for hits learns it here.

        Each hit's ``comm`` is its pid's comm at the latest hit drained so far: the trace
        file prints a pid's last saved comm, not the one at the hit, so a line from
        before an exec shows the program the pid became (``$comm`` keeps the old one).
        """
        hits: list[EventHit] = []
        while True:
            try:
                hits.append(self.hits.get_nowait())
            except queue.Empty:
                break
        comms = self._comms
        for hit in hits:
            if hit.pid > 0:
                comms[hit.pid] = hit.comm
        for hit in hits:
            comm = comms.get(hit.pid, hit.comm)
            yield hit if comm == hit.comm else replace(hit, comm=comm)
        lost = self.vm.lost if self.placed else None
        if lost is not None:
            raise lost.again()

    def __enter__(self) -> Self:
        self.start()
        return self
