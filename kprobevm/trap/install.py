"""Which trap channel a guest gets: the fast one when the guest can take it, else the
breakpoint fallback, said on stderr and kept on the channel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from kprobevm.errors import LOST_ERRORS, KprobeVMError
from kprobevm.trap.breakpoint import BreakpointChannel
from kprobevm.trap.channel import ChannelContext, ChannelKind, ReturnProbes, TrapChannel
from kprobevm.trap.watchpoint import WatchpointChannel

if TYPE_CHECKING:
    from kprobevm.kernel.tasks import TaskLayout
    from kprobevm.x86.slotmap import Reserve

__all__ = ["FALLBACK_COST", "install_channel"]

log = logging.getLogger(__name__)

FALLBACK_COST = ("every hit stops the guest on a breakpoint, and QEMU's TCG flushes its whole"
                 " translation cache at each: tens of hits per second instead of thousands,"
                 " and no recorded probes")
"""What the breakpoint fallback costs, said with its reason."""


def install_channel(
    kind: ChannelKind,
    ctx: ChannelContext,
    *,
    reserve: Reserve | None,
    returns: ReturnProbes,
    task_layout: Callable[[], TaskLayout | None],
    reserve_missing: str | None = None,
) -> TrapChannel:
    """The channel ``kind`` asks for, installed in the guest.

    The watchpoint channel falls back to the breakpoint one when the guest cannot take
    it (no reserved memory for slots, a #BP vector someone else owns); the fallback is
    said on stderr and kept in ``fallback_reason``. ``reserve_missing`` says why there is
    no ``reserve`` (the fast channel is then not tried).
    """
    reason = None
    if kind == "watchpoint" and reserve is None and reserve_missing is not None:
        reason = f"no slot memory: {reserve_missing}"
        log.warning("fast trap channel unavailable (%s); using the #BP breakpoint: %s",
                    reason, FALLBACK_COST)  # fmt: skip
    elif kind == "watchpoint":
        try:
            fast = WatchpointChannel.install(
                ctx, reserve=reserve, returns=returns, task_layout=task_layout
            )
        except LOST_ERRORS:
            raise  # no guest to fall back in
        except KprobeVMError as exc:
            reason = str(exc)
            log.warning("fast trap channel unavailable (%s); using the #BP breakpoint: %s",
                        exc, FALLBACK_COST)  # fmt: skip
        else:
            log.info("trap channel: watchpoint (slot area %#x)", fast.pages.stub)
            return fast
    channel = BreakpointChannel.install(ctx)
    channel.fallback_reason = reason
    log.info("trap channel: breakpoint on the #BP vector %#x", channel.vector)
    return channel
