"""What QEMU's gdbstub does with stops, version by version: the facts the client is built on.

The client never asks which behaviour it faces: it is written to be right against all of
them (nothing but ``\\x03`` to a running target, no reliance on a connect-time stop
reply, a crossing ``\\x03`` answered by nothing). These records say why, name the
versions, and let the test suite's fake stub play each one.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "QEMU_7_2", "QEMU_8_1", "QEMU_10_2", "STUB_BEHAVIOURS", "StubBehaviour", "stub_behaviour",
]


@dataclass(frozen=True)
class StubBehaviour:
    """How one range of QEMU versions stops, and says so, in system mode."""

    name: str
    since: tuple[int, int]
    """The first QEMU (major, minor) that behaves so."""
    stop_reply_on_connect: bool
    """Connecting stops a running VM (always); True when a ``T02`` then comes unasked,
    perhaps after the reply to the client's first request. From 8.1 one still comes
    when an earlier client left the VM running after a resume (the permission it gave
    outlives it)."""
    stray_byte_stop_reply: bool
    """A byte other than ``\\x03`` sent while the VM runs stops it (always); True when a
    stop reply follows. False means the VM pauses in silence: a client that waits for
    the stop waits forever."""
    stop_reply_needs_request: bool
    """Stop replies are sent only after a resume, ``?`` or ``\\x03`` asked for one, and
    only one per request: a stop nobody asked for is silent."""
    breakpoint_flushes_translations: bool
    """Under TCG, every breakpoint stop throws away all translated code (tens of ms per
    hit, then re-translation); watchpoint stops never do."""

    def describe(self) -> str:
        """One line for logs: the name and what matters to a trap channel."""
        flush = ("breakpoint stops flush the translation cache"
                 if self.breakpoint_flushes_translations
                 else "breakpoint stops keep the translation cache")
        return f"{self.name} ({flush})"


QEMU_7_2 = StubBehaviour(
    "QEMU 7.2-8.0", (7, 2), stop_reply_on_connect=True, stray_byte_stop_reply=True,
    stop_reply_needs_request=False, breakpoint_flushes_translations=True,
)
# 8.1 added stop-reply filtering; QEMU 10.0.2 was measured to pause silently on a '+'.
QEMU_8_1 = StubBehaviour(
    "QEMU 8.1-10.1", (8, 1), stop_reply_on_connect=False, stray_byte_stop_reply=False,
    stop_reply_needs_request=True, breakpoint_flushes_translations=True,
)
QEMU_10_2 = StubBehaviour(
    "QEMU 10.2+", (10, 2), stop_reply_on_connect=False, stray_byte_stop_reply=False,
    stop_reply_needs_request=True, breakpoint_flushes_translations=False,
)
STUB_BEHAVIOURS = (QEMU_7_2, QEMU_8_1, QEMU_10_2)


def stub_behaviour(version: tuple[int, ...]) -> StubBehaviour:
    """The behaviour of QEMU ``version`` (major, minor, ...); older than 7.2 counts as 7.2."""
    found = QEMU_7_2
    for behaviour in STUB_BEHAVIOURS:
        if tuple(version[:2]) >= behaviour.since:
            found = behaviour
    return found
