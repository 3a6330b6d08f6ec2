"""The checks an event meets when it joins the others (the kernel's ``register_trace_kprobe``).

A definition whose GROUP/EVENT is already taken by one of ours joins that event as one
more probe (a multi-probe event), as the kernel's ``append_trace_kprobe`` does, unless:

- the other is a return probe and this one is not, or the reverse: ``DIFF_PROBE_TYPE``;
- the arguments differ in number, name or type: ``DIFF_ARG_TYPE``, at the first that
  differs;
- it probes the same place with the same arguments: ``SAME_PROBE``. Like the kernel, an
  address probe's place is its offset under the symbol "unknown", so two address probes
  with the same arguments in one event are the same probe to it, wherever they point.

A new GROUP/EVENT that names an event the guest's tracefs already has (a tracepoint,
say ``sched/sched_switch``) is ``EVENT_EXIST``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from kprobevm.tracing.errors import probe_error, word_position
from kprobevm.tracing.events import ProbeEvent

__all__ = ["EventRegistry"]


def _first_arg_difference(a: ProbeEvent, b: ProbeEvent) -> int:
    """``trace_probe_compare_arg_type``: 0 if the arguments agree, else the 1-based index."""
    if len(a.args) != len(b.args):
        return min(len(a.args), len(b.args)) + 1
    for i, (x, y) in enumerate(zip(a.args, b.args, strict=True)):
        if x.type_name != y.type_name or x.count != y.count or x.name != y.name:
            return i + 1
    return 0


def _same_probe(a: ProbeEvent, b: ProbeEvent) -> bool:
    """``trace_kprobe_has_same_kprobe`` for one pair: place and every argument's text."""
    return (
        (a.symbol_name or "unknown", a.offset) == (b.symbol_name or "unknown", b.offset)
        and [x.comm for x in a.args] == [y.comm for y in b.args]
    )


@dataclass
class EventRegistry:
    """The events of one session, by (group, event), with the guest's own event names.

    Events join it one at a time, in definition order, so that each is judged against
    those before it as the kernel judges a new line of ``kprobe_events``.
    """

    existing: Collection[tuple[str, str]] = ()
    """GROUP/EVENT names the guest's tracefs already has."""
    events: dict[tuple[str, str], list[ProbeEvent]] = field(default_factory=dict)
    """Each GROUP/EVENT's probes, in the order they joined (several: a multi-probe event)."""

    def add(self, event: ProbeEvent) -> None:
        """Take ``event`` in: a new event, or one more probe of the event it names.

        Raises :class:`~kprobevm.errors.ProbeSyntaxError` as the kernel would log it:
        EVENT_EXIST, DIFF_PROBE_TYPE, DIFF_ARG_TYPE (its caret at the first argument that
        differs) or SAME_PROBE; ``event`` is then not taken in.
        """
        key = (event.group, event.event)
        others = self.events.get(key)
        if others is None:
            if key in self.existing:
                raise probe_error(
                    "EVENT_EXIST", 0, event.command,
                    f"{event.group}/{event.event} is an event of the guest already",
                )  # fmt: skip
            self.events[key] = [event]
            return
        first = others[0]
        if first.is_return != event.is_return:
            raise probe_error(
                "DIFF_PROBE_TYPE", 0, event.command,
                f"{event.group}/{event.event} is a"
                f" {'return' if first.is_return else 'plain'} probe already",
            )  # fmt: skip
        index = _first_arg_difference(event, first)
        if index:
            # the kernel's argv index: the arguments start at word 2
            raise probe_error(
                "DIFF_ARG_TYPE", word_position(event.command, index + 1), event.command,
                f"argument {index} differs from {first.definition()!r}",
            )  # fmt: skip
        if any(_same_probe(other, event) for other in others):
            raise probe_error("SAME_PROBE", 0, event.command, f"same as {first.definition()!r}")
        others.append(event)
